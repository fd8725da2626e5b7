"""Resolve every input of a build once, and validate it, before any work.

:func:`resolve` reads nothing heavy: the target profile, its backend and the backend's typed options,
the calibration recipe, the output folder, and every combination a request cannot honour (a backend
option the backend lacks, ``--fallback`` on a backend without per-layer fallback or for a non-INT8
build, an arm64 check on a target without arm64 CPU profiles, a missing cross toolchain). What it
returns is frozen; :func:`load_inputs` then loads the model and the data once, under the output
folder's lock, and the stages only read both.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel

from edgemix import devices, outdir
from edgemix.backends.base import Backend, get_backend
from edgemix.config import BuildConfig, CalibRecipe, TargetProfile, resolve_recipe, resolve_target
from edgemix.data import ImageSet, check_labels, load_dataset, stratified_indices, to_model_input
from edgemix.errors import UsageError


@dataclass(frozen=True)
class BuildContext:
    cfg: BuildConfig
    target: TargetProfile
    backend: Backend
    options: BaseModel  # the backend's typed options, parsed from cfg.backend_options
    recipe: CalibRecipe
    out: Path
    threads: int
    isa: bool  # verify the .pte on arm64 kernels under qemu (phone targets)
    devices: dict  # edgemix.devices.plan: which device runs the reference, calibration, QAT


def resolve(cfg: BuildConfig) -> BuildContext:
    target = resolve_target(cfg.target)
    backend = get_backend(target.backend)
    backend.check_request(target, cfg.precision, cfg.qat_epochs)
    options = backend.parse_options(cfg.backend_options)
    if cfg.fallback:
        if not backend.supports_fallback:
            raise UsageError(f"--fallback keeps layers in FP32 in the QDQ ONNX of tensorrt targets; target "
                             f"{target.name} uses {target.backend}, which has no per-layer fallback")
        if cfg.precision != "int8":
            raise UsageError(f"--fallback keeps some layers of an INT8 build in FP32; this build is {cfg.precision}")
    profiles = backend.isa_profiles(target)
    if cfg.isa_check and not profiles:
        raise UsageError(f"--isa-check runs the .pte on the arm64 CPU profiles of a phone target; target "
                         f"{target.name} has none", hint="leave --isa-check out for this target")
    isa = bool(profiles) and cfg.isa_check is not False
    if isa:
        backend.check_isa_toolchain()
    return BuildContext(cfg=cfg, target=target, backend=backend, options=options, recipe=resolve_recipe(cfg.calib),
                        out=outdir.final_path(cfg.out), threads=cfg.threads or target.threads, isa=isa,
                        devices=devices.plan(cfg.device))


@dataclass(frozen=True)
class BuildInputs:
    model: torch.nn.Module  # the FP32 reference, eval mode, CPU; carries .spec
    spec: object  # MixerSpec for the zoo, ModuleSpec for a user's module
    weights: dict  # provenance: path, format, sha256
    calib_set: ImageSet
    calib_inputs: torch.Tensor
    eval_set: ImageSet
    train_set: ImageSet | None
    fingerprint: str


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def _data(source, split: str, given: ImageSet | None) -> ImageSet:
    return given if given is not None else load_dataset(source, split)


def load_inputs(ctx: BuildContext, module: torch.nn.Module | None = None, calib_data: ImageSet | None = None,
                eval_data: ImageSet | None = None, train_data: ImageSet | None = None) -> BuildInputs:
    """The model (a zoo alias with its weights, or ``module`` with a spec), the calibration,
    evaluation and QAT data (named sources, or the ImageSets given), all checked against each other."""
    from edgemix import cache
    from edgemix.verify import report as rep

    cfg, recipe = ctx.cfg, ctx.recipe
    if module is not None:
        from edgemix.models.module import check_ops

        model, spec = module, module.spec
        check_ops(model, spec, ctx.target.backend)  # ops the backend cannot take: refused before any work
        weights = {"path": None, "format": "module", "sha256": cache.model_digest(model), "reset": [], "meta": {}}
    else:
        from edgemix.models import load_model

        model, weights = load_model(cfg.model, cfg.weights, img_size=cfg.image_size, num_classes=cfg.num_classes,
                                    reset_head=cfg.reset_head, random_init=cfg.random_weights)
        spec = model.spec
    calib_set = _data(recipe.data, recipe.split, calib_data)
    calib_set = calib_set.subset(stratified_indices(calib_set.labels, recipe.images, recipe.seed))
    eval_set = _data(cfg.eval_data, cfg.eval_split, eval_data)
    if cfg.eval_limit:
        eval_set = eval_set.subset(stratified_indices(eval_set.labels, cfg.eval_limit, 0))
    check_labels(eval_set, spec.num_classes, eval_set.source)
    train_set = _data(cfg.train_data, "train", train_data) if cfg.qat_epochs else None
    if train_set is not None:
        check_labels(train_set, spec.num_classes, train_set.source)
    fingerprint = hashlib.sha256(json.dumps({
        "weights": weights["sha256"], "calib": tensor_sha256(calib_set.images), "recipe": recipe.model_dump(),
        "target": ctx.target.model_dump(), "config": cfg.model_dump(exclude={"force", "out", "cache"}),
        "spec": spec.to_dict(), "versions": rep.library_versions(), "eval": tensor_sha256(eval_set.images),
        "train": tensor_sha256(train_set.images) if train_set is not None else None,
    }, sort_keys=True, default=str).encode()).hexdigest()[:32]
    return BuildInputs(model=model, spec=spec, weights=weights, calib_set=calib_set,
                       calib_inputs=to_model_input(calib_set.images, spec), eval_set=eval_set, train_set=train_set,
                       fingerprint=fingerprint)

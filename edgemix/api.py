"""The public Python API: build, evaluate, gate and bench, each returning a typed result.

    import edgemix
    result = edgemix.build("fmnist", target="phone")                    # a zoo model
    result = edgemix.build(net, target="jetson", input_shape=(1, 28, 28),  # any nn.Module
                           mean=(0.5,), std=(0.5,), eval_data=(images, labels))
    print(result.drift.top1_delta, result.latency.int8_fp32_ratio, result.artifact)

Data arguments take a source name (``"sample"``, ``"fashion-mnist"``), a folder (IDX files or one
sub-folder per class), or tensors: ``(images, labels)`` with images (N, C, H, W) as uint8 or as
floats in [0, 1] and labels (N,) class indices (calibration also takes images alone). edgemix
resizes and normalises them with the model's mean/std, as for files. The command line is a thin
layer over these functions; errors are :class:`edgemix.errors.EdgemixError` subclasses with the same
exit codes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgemix.errors import UsageError

DataArg = Any  # str | Path | ImageSet | (images, labels) | images


@dataclass(frozen=True)
class Drift:
    samples: int
    reference_top1: float
    deployed_top1: float
    top1_delta: float  # points
    agreement: float  # fraction of images where the deployed top-1 equals the FP32 top-1
    cosine_mean: float
    sqnr_db: float


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p90_ms: float
    batch: int
    threads: int
    runs: int
    fp32_p50_ms: float | None = None  # the FP32 artifact of the same target, timed interleaved
    int8_fp32_ratio: float | None = None
    int8_faster: bool | None = None  # the paired sign test


@dataclass(frozen=True)
class BuildResult:
    out: Path  # the artifact folder
    artifact: Path  # the model file a device loads (.pte / .onnx)
    files: dict[str, Path]
    drift: Drift
    latency: Latency
    report: dict = field(repr=False)

    @classmethod
    def from_report(cls, report: dict) -> "BuildResult":
        out = Path(report["artifact"]["dir"])
        files = {role: out / f["name"] for role, f in report["artifact"]["files"].items()}
        d, lat, cmp_ = report["drift"], report["latency_ms"], report.get("fp32_comparison") or {}
        return cls(out=out, artifact=files["model"], files=files,
                   drift=Drift(samples=d["samples"], reference_top1=report["reference"]["top1"],
                               deployed_top1=report["deployed"]["top1"], top1_delta=d["top1_delta"],
                               agreement=d["agreement"], cosine_mean=d["cosine_mean"], sqnr_db=d["sqnr_db"]),
                   latency=Latency(p50_ms=lat["p50"], p90_ms=lat["p90"], batch=lat["batch"], threads=lat["threads"],
                                   runs=lat["runs"], fp32_p50_ms=cmp_.get("fp32_p50_ms"),
                                   int8_fp32_ratio=cmp_.get("latency_ratio"), int8_faster=cmp_.get("int8_faster")),
                   report=report)


def image_set(data: DataArg, what: str, split: str = "test", labels_required: bool = True):
    """A data argument as an ImageSet (see the module docstring for what it may be)."""
    from edgemix.data import ImageSet, load_dataset

    if isinstance(data, ImageSet):
        return data
    if isinstance(data, (str, Path)):
        return load_dataset(data, split)
    images, labels = (data if isinstance(data, (tuple, list)) and len(data) == 2 else (data, None))
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise UsageError(f"{what}: images must be a (N, C, H, W) tensor, got {shape}",
                         hint="pass a source name, a folder, or (images, labels) tensors")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise UsageError(f"{what}: images must be uint8 or floats in [0, 1], got {images.dtype}")
    if labels is None:
        if labels_required:
            raise UsageError(f"{what} needs labels: pass (images, labels)")
        labels = torch.zeros(len(images), dtype=torch.long)
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or len(labels) != len(images) or labels.is_floating_point():
        raise UsageError(f"{what}: labels must be (N,) class indices for the {len(images)} images, "
                         f"got {tuple(labels.shape)} {labels.dtype}")
    labels = labels.long()
    classes = [str(i) for i in range(int(labels.max()) + 1)] if len(labels) else []
    return ImageSet(images.detach().cpu().contiguous(), labels, classes, f"tensors ({len(images)} images)")


def default_train_data() -> str:
    """QAT's training data when none is named: the full Fashion-MNIST set if installed, else the sample."""
    from edgemix.data.idx import DEBIAN_DIR

    return "fashion-mnist" if DEBIAN_DIR.is_dir() else "sample"


def _model_arg(model, input_shape, mean, std, name):
    """(alias or None, wrapped module or None)."""
    if model is None or isinstance(model, str):
        if input_shape is not None or mean is not None or std is not None:
            raise UsageError("input_shape, mean and std describe a torch.nn.Module; a zoo model has its own",
                             hint="use image_size= / num_classes= to reconfigure a zoo model")
        return model, None
    if hasattr(model, "spec") and isinstance(model, torch.nn.Module) and input_shape is None:
        return None, model.eval()  # an edgemix model object (e.g. a Mixer built by edgemix.models)
    from edgemix.models.module import wrap_module

    return None, wrap_module(model, input_shape, mean, std, name)


def build(model: str | torch.nn.Module | None = None, target: str = "phone", *, input_shape=None, mean=None,
          std=None, name: str | None = None, weights: str | Path | None = None, precision: str | None = None,
          calib: str = "default", calib_data: DataArg | None = None, eval_data: DataArg = "sample",
          train_data: DataArg | None = None, out: str | Path | None = None, quiet: bool = False,
          verbose: bool = False, **options) -> BuildResult:
    """Quantize, lower and verify ``model`` for ``target``; returns paths, drift, latency and the report.

    ``model`` is a zoo alias (``edgemix models``) or a torch.nn.Module: then ``input_shape`` (C, H, W) is
    required and ``mean``/``std`` give its input normalisation (default: inputs in [0, 1]).
    ``calib_data`` replaces the recipe's calibration images; ``options`` are the other build settings
    (``qat_epochs``, ``eval_limit``, ``latency_runs``, ``backend_options``, ``force``, ``cache``,
    ``isa_check``, ``fallback``, ... as in ``edgemix build --help``).
    """
    from edgemix import console
    from edgemix.config import build_config, resolve_target
    from edgemix.pipeline import build as run_build
    from edgemix.pipeline import default_out

    alias, module = _model_arg(model, input_shape, mean, std, name)
    if module is None:  # a zoo alias, or None: what the weights file holds, else the shipped fmnist
        from edgemix.models import spec_for

        spec = spec_for(alias, weights, options.get("image_size"), options.get("num_classes"))
    else:
        spec = module.spec
        if weights is not None:
            raise UsageError("weights= loads a checkpoint into a zoo model; a torch.nn.Module brings its own")
    profile = resolve_target(target)
    prec = precision or profile.default_precision
    calib_set = image_set(calib_data, "calib_data", "train", labels_required=False) if calib_data is not None else None
    # named sources and folders travel in the config (and config.resolved.toml); tensors as ImageSets
    eval_set = None if isinstance(eval_data, (str, Path)) else image_set(eval_data, "eval_data")
    if train_data is None:
        train_data = default_train_data()
    train_set = None if isinstance(train_data, (str, Path)) else image_set(train_data, "train_data", "train")
    cfg = build_config(
        model=spec.name, target=target, precision=prec, weights=str(weights) if weights else None, calib=calib,
        eval_data=eval_set.source if eval_set is not None else str(eval_data),
        train_data=train_set.source if train_set is not None else str(train_data),
        out=str(out or default_out(spec.name, profile, prec, (options.get("qat_epochs") or 0) > 0)), **options)
    with console.quieted(quiet), console.capture_noise(verbose):
        report = run_build(cfg, module=module, calib_data=calib_set, eval_data=eval_set, train_data=train_set)
    return BuildResult.from_report(report)


@dataclass(frozen=True)
class EvalResult:
    model: str
    data: str
    samples: int
    device: str
    top1: float
    per_class: list[dict]
    logits: Any = field(repr=False)  # numpy (N, classes)
    result: dict = field(repr=False)


def evaluate(model: str | torch.nn.Module | None = None, data: DataArg = "sample", *, weights=None, split: str = "test",
             limit: int | None = None, batch_size: int | None = None, image_size=None, num_classes=None,
             device: str = "auto", input_shape=None, mean=None, std=None, name=None) -> EvalResult:
    """The FP32 reference: top-1, per-class accuracy and logits, on CUDA when present."""
    from edgemix.verify.reference import evaluate as run_eval

    alias, module = _model_arg(model, input_shape, mean, std, name)
    result, logits = run_eval(alias, weights, image_set(data, "data", split), limit=limit, batch_size=batch_size,
                              image_size=image_size, num_classes=num_classes, device=device, module=module)
    return EvalResult(model=result["model"], data=result["data"], samples=result["samples"], device=result["device"],
                      top1=result["top1"], per_class=result["per_class"], logits=logits, result=result)


@dataclass(frozen=True)
class GateResult:
    passed: bool
    checks: list  # edgemix.verify.gate.Check: name, passed, value, budget, baseline, detail
    report_file: Path

    @property
    def failed(self) -> list:
        return [c for c in self.checks if not c.passed]


def gate(artifact: str | Path, baseline: str | Path | None = None, *, max_top1_drop: float | None = None,
         min_agreement: float | None = None, min_cosine: float | None = None,
         max_latency_ratio: float | None = None, latency_basis: str = "auto", junit: str | Path | None = None,
         update_baseline: bool = False) -> GateResult:
    """Check one build against its target's budgets and an optional baseline. Returns whether every
    check passed (the CLI turns a failure into exit 1); bad arguments raise UsageError."""
    from edgemix.verify import gate as g

    report, file = g.read_report(artifact)
    baseline = Path(baseline) if baseline is not None else None
    junit = Path(junit) if junit is not None else None
    if update_baseline and baseline is None:
        raise UsageError("--update-baseline needs --baseline FILE (where to write it)")
    g.check_output_paths(junit, baseline, update_baseline)
    base = None
    if baseline is not None and (not update_baseline or baseline.is_file()):
        base = g.read_baseline(baseline)
    checks = g.run_checks(report, base, max_top1_drop, min_agreement, max_latency_ratio, min_cosine, latency_basis)
    if junit is not None:
        g.write_junit(junit, checks,
                      f"{g.JUNIT_SUITE_PREFIX}{report['model']}_{report.get('target_alias', report['target'])}")
    if update_baseline:
        g.update_baseline(baseline, report)
    return GateResult(passed=all(c.passed for c in checks), checks=checks, report_file=file)


def bench(artifact: str | Path, target: str, **kwargs):
    """Run a built artifact on the device (ssh, adb or this host); returns the BenchResult and merges it
    into report.json. ``kwargs``: host, port, identity, serial, runner_path, warmup, iterations, threads,
    timeout_s, remote_dir, merge, ... as in ``edgemix bench --help``."""
    from edgemix.runners import bench as run_bench

    return run_bench(target, Path(artifact), **kwargs)

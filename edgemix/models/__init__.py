"""Model zoo: resolve an alias to a spec, build the model, load its weights."""

from __future__ import annotations

from pathlib import Path

import torch

from edgemix import resources
from edgemix.errors import unknown_choice
from edgemix.models.mixer import MixerSpec, MlpMixer, count_params
from edgemix.models.registry import families, family_of, variants

WEIGHTS_DIR = resources.path("weights")


def _zoo():
    """(alias -> spec, alias -> paper name, alias -> shipped checkpoint) over every family."""
    table = variants()
    specs = {alias: spec for alias, (_, spec) in table.items()}
    names = {alias: fam.paper_names.get(alias, alias) for alias, (fam, _) in table.items()}
    weights = {alias: WEIGHTS_DIR / file for fam in families().values()
               for alias, file in (fam.default_weights or {}).items()}
    return specs, names, weights


VARIANTS, PAPER_NAMES, DEFAULT_WEIGHTS = _zoo()  # checkpoints that ship with edgemix: used without --weights


def build_model(spec) -> torch.nn.Module:
    return family_of(spec).build(spec)


def resolve_spec(alias: str, img_size: int | None = None, num_classes: int | None = None):
    key = alias.lower()
    if key not in VARIANTS:  # the Mixer paper's names: Mixer-B/16 -> b16
        key = key.replace("mixer-", "").replace("/", "")
    if key not in VARIANTS:
        raise unknown_choice("model", alias, VARIANTS)
    return VARIANTS[key].with_overrides(img_size=img_size, num_classes=num_classes)


def _alias_of(alias: str | None, stored) -> str:
    """The alias as given; else what an edgemix checkpoint's stored spec names; else the shipped fmnist."""
    if alias is None and stored is not None and stored.name in VARIANTS:
        return stored.name
    return alias or "fmnist"


def spec_for(alias: str | None, weights=None, img_size: int | None = None, num_classes: int | None = None):
    """The spec a build or evaluation will use, without loading weights: what a Keras file or an edgemix
    checkpoint holds when ``alias`` is None (or for a Keras file, always), else the alias's."""
    from edgemix.models.checkpoints import spec_from_checkpoint
    from edgemix.models.keras import is_keras_file, read_keras_mixer

    if weights is not None and is_keras_file(weights) and Path(weights).is_file():
        return read_keras_mixer(weights)[0].with_overrides(img_size=img_size, num_classes=num_classes)
    stored = spec_from_checkpoint(weights) if alias is None and weights is not None else None
    return resolve_spec(_alias_of(alias, stored), img_size, num_classes)


def load_model(alias: str | None, weights: str | Path | None = None, img_size: int | None = None,
               num_classes: int | None = None, reset_head: bool = False, allow_random: bool = False,
               random_init: bool = False):
    """Build a model and load its weights: ``weights``, else the shipped default for the alias.

    ``alias`` may be None when the file itself tells the architecture (an edgemix checkpoint, a
    Keras ``.keras`` / ``.weights.h5`` Mixer); without either it is the shipped ``fmnist``.
    Returns (model in eval mode, provenance dict). A model with no weights is only built when
    ``allow_random`` is set (benchmarks of latency and size do not need trained weights);
    ``random_init`` (``--random-weights``) builds seeded random weights even where a default ships.
    """
    from edgemix.errors import CheckpointError
    from edgemix.models.checkpoints import check_and_load, load_weights, spec_from_checkpoint
    from edgemix.models.keras import is_keras_file, read_keras_mixer

    if random_init and weights is not None:
        from edgemix.errors import UsageError

        raise UsageError(f"--random-weights and --weights {weights} ask for different weights",
                         hint="leave out one of them")
    if weights is not None and is_keras_file(weights):
        from edgemix.fileutil import file_sha256

        path = Path(weights)
        if not path.is_file():
            raise CheckpointError(f"checkpoint '{path}' does not exist")
        spec, sd = read_keras_mixer(path)  # the file's own architecture: --model is not needed
        spec = spec.with_overrides(img_size=img_size, num_classes=num_classes)
        model = build_model(spec)
        reset = check_and_load(model, sd, str(path), [], reset_head)
        return model.eval(), {"path": str(path), "format": "keras", "sha256": file_sha256(path), "reset": reset,
                              "meta": {}}
    stored = spec_from_checkpoint(weights) if weights is not None else None
    alias = _alias_of(alias, stored)
    spec = resolve_spec(alias, img_size, num_classes)
    if weights is None and not random_init and alias in DEFAULT_WEIGHTS and DEFAULT_WEIGHTS[alias].is_file():
        weights = DEFAULT_WEIGHTS[alias]
        stored = spec_from_checkpoint(weights)
    if stored is not None and stored.name == spec.name:
        # an edgemix checkpoint knows its own image size and class count
        spec = stored.with_overrides(img_size=img_size, num_classes=num_classes)
    if weights is None:
        if not (allow_random or random_init):
            raise CheckpointError(
                f"model '{alias}' has no shipped weights and no --weights was given",
                hint="pass --weights FILE (an edgemix .pt, a timm .pth/.safetensors, an official JAX .npz or a "
                     "Keras .keras/.weights.h5), or --random-weights for latency/size work where accuracy does "
                     "not matter")
        with torch.random.fork_rng():  # seeded: a random-weights build is reproducible (and cacheable)
            torch.manual_seed(0)
            model = build_model(spec)
        prov = {"path": None, "format": "random-init", "sha256": None, "reset": [], "meta": {}}
    else:
        model = build_model(spec)
        prov = load_weights(model, weights, reset_head=reset_head)
    return model.eval(), prov


__all__ = ["VARIANTS", "PAPER_NAMES", "MixerSpec", "MlpMixer", "build_model", "count_params",
           "resolve_spec", "load_model", "DEFAULT_WEIGHTS", "families", "family_of"]

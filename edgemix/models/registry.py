"""Model families as plug-ins. A family is one module under edgemix/models/ that registers:

- its spec (a frozen dataclass deriving :class:`SpecBase`: the fields that build one variant, its
  input contract, its cost) and its variant table (aliases -> specs) with the papers' names;
- its model code (``build(spec) -> nn.Module`` whose ``.spec`` is the spec);
- its checkpoint importer (``import_state_dict``: the authors' or timm's state dict -> this package's
  keys, plus what was dropped and why, checked the same way for every family);
- its export form (``export_form``: the same function in ops every edge runtime takes, e.g. no
  standalone BatchNorm, softmax over the last dimension), which the backends apply.

Nothing outside this registry knows which families exist: the CLI, the pipeline and the backends
ask it.
"""

from __future__ import annotations

import functools
from dataclasses import MISSING, asdict, dataclass, fields, replace
from typing import Callable, ClassVar

import torch
from torch import nn

from edgemix.errors import CheckpointError, UsageError

IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))  # the relatives' authors' defaults


class SpecBase:
    """Shared behaviour of every family's spec: (de)serialisation with validation, overrides of the
    image size and class count, the cost per image. Subclasses are frozen dataclasses with at least
    ``name, img_size, in_chans, num_classes, mean, std``."""

    family: ClassVar[str]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update({k: list(v) for k, v in d.items() if isinstance(v, tuple)})
        d["family"] = self.family
        return d

    @classmethod
    def from_dict(cls, d: dict):
        """A spec stored in a checkpoint; an incomplete or malformed one is a usage error naming what is wrong."""
        if not isinstance(d, dict):
            raise CheckpointError(f"the stored model spec is a {type(d).__name__}, not a table of fields")
        d = {k: v for k, v in d.items() if k != "family"}
        known = {f.name: f for f in fields(cls)}
        required = [n for n, f in known.items() if f.default is MISSING and f.default_factory is MISSING]
        missing = [n for n in required if n not in d]
        unknown = sorted(set(d) - set(known))
        if missing or unknown:
            raise CheckpointError("the stored model spec is incomplete or unknown: "
                                  + "; ".join(([f"missing {', '.join(missing)}"] if missing else [])
                                              + ([f"unknown {', '.join(unknown)}"] if unknown else [])),
                                  hint="re-save the checkpoint with `edgemix train`, or pass --model")
        try:
            for n, f in known.items():
                if n not in d:
                    continue
                kind = str(f.type)
                if kind.startswith("tuple"):
                    d[n] = tuple(float(v) if "float" in kind else v for v in d[n])
                elif kind == "int" and (not isinstance(d[n], int) or isinstance(d[n], bool) or d[n] < 1):
                    raise ValueError(f"{n} = {d[n]!r} is not a positive integer")
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"the stored model spec is malformed: {e}") from None
        return cls(**d)

    def with_overrides(self, **kw):
        kw = {k: v for k, v in kw.items() if v is not None}
        for key, option in (("num_classes", "--num-classes"), ("img_size", "--image-size")):
            if key in kw and kw[key] < 1:
                raise UsageError(f"{option} must be >= 1, got {kw[key]}")
        spec = replace(self, **kw)
        spec.validate()
        return spec

    def validate(self) -> None:
        """Raise UsageError when the fields cannot build a model (e.g. an image size the patches do
        not tile)."""

    def macs(self) -> int:
        """Multiply-accumulates per image of the Linear and Conv layers, counted on a meta-device
        forward pass (no memory, no arithmetic)."""
        return _meta_macs(self)

    def summary(self) -> str:
        """One line of what distinguishes this variant, for `edgemix models`."""
        return ""


@functools.lru_cache(maxsize=64)
def _meta_macs(spec) -> int:
    from edgemix.models.module import count_macs

    with torch.device("meta"):
        model = family_of(spec).build(spec)
        x = torch.zeros(1, spec.in_chans, spec.img_size, spec.img_size)
    return count_macs(model, x)


@dataclass(frozen=True)
class Family:
    name: str  # "mixer", "convmixer", ...
    title: str  # "MLP-Mixer"
    spec_cls: type
    variants: dict  # alias -> spec
    paper_names: dict  # alias -> the paper's name
    build: Callable  # spec -> nn.Module carrying .spec
    import_state_dict: Callable  # (foreign state dict, spec) -> (state dict in our keys, dropped keys with reasons)
    export_form: Callable | None = None  # model -> the same function for edge runtimes
    default_weights: dict | None = None  # alias -> shipped checkpoint file name in resources/weights/
    # jetson INT8: also quantize every Conv's output (edgemix.backends.tensorrt.qdq.quantize_conv_outputs),
    # for families whose Convs feed an activation or a branch sum rather than another quantized op
    qdq_conv_outputs: bool = False


FAMILIES: dict[str, Family] = {}


def import_same_keys(sd: dict, spec) -> tuple[dict, list[str]]:
    """The importer of a family whose module names are the authors' (timm's Mixer, ViP): tensors as
    float32 with a leading "model." dropped; anything that is not a tensor is unexpected."""
    out, unexpected = {}, []
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            out[k.removeprefix("model.")] = v.float()
        else:
            unexpected.append(k)
    return out, unexpected


def trunc_normal_init(model: nn.Module, kinds: tuple[type, ...], std: float = 0.02) -> None:
    """The init the ViP and CycleMLP authors use: truncated-normal weights and zero biases for every
    submodule of ``kinds``; the rest keeps PyTorch's."""
    for m in model.modules():
        if isinstance(m, kinds):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


FAMILY_MODULES = ("mixer", "convmixer", "vip", "cyclemlp")  # importing one registers its family; `edgemix models` lists them in this order


@functools.cache
def _load_families() -> None:
    import importlib

    for name in FAMILY_MODULES:
        importlib.import_module(f"edgemix.models.{name}")


def families() -> dict[str, Family]:
    _load_families()
    return {name: FAMILIES[name] for name in FAMILY_MODULES if name in FAMILIES}


def variants() -> dict[str, tuple[Family, object]]:
    """alias -> (family, spec), every family's variants."""
    return {alias: (f, spec) for f in families().values() for alias, spec in f.variants.items()}


def family_of(spec_or_model) -> Family:
    spec = getattr(spec_or_model, "spec", spec_or_model)
    name = getattr(spec, "family", None)
    if name not in families():
        raise UsageError(f"no model family '{name}'")
    return families()[name]


def spec_from_dict(d: dict):
    """A stored spec of any family (checkpoints written before families existed are Mixers)."""
    name = d.get("family", "mixer") if isinstance(d, dict) else "mixer"
    if name not in families():
        raise CheckpointError(f"the stored model spec names an unknown model family '{name}'",
                              hint=f"known families: {', '.join(FAMILIES)}")
    return FAMILIES[name].spec_cls.from_dict(d)


def family_setting(model: nn.Module, name: str, default=None):
    """A field of the model's family (``default`` for a model of no registered family)."""
    fam = FAMILIES.get(getattr(getattr(model, "spec", None), "family", None))
    return default if fam is None else getattr(fam, name)


def export_form(model: nn.Module) -> tuple[nn.Module, str]:
    """The model's family export form, and a line saying what was rewritten ('none' when nothing)."""
    form = family_setting(model, "export_form")
    return (model, "none") if form is None else form(model)

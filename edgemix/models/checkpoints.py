"""Checkpoint import: edgemix's own files, Google's official JAX ``.npz`` (Mixer), and the state dicts
of timm and of each family's authors (each family's importer maps their keys, models/registry.py).

Every format is turned into a state dict in this package's key layout, then checked key by key
against the model: missing, unexpected and wrong-shaped keys are reported together.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from edgemix.errors import CheckpointError
from edgemix.fileutil import file_sha256
from edgemix.models.registry import family_of, spec_from_dict

FORMAT = "edgemix-checkpoint"
FORMAT_VERSION = 1
HEAD_KEYS = ("head.weight", "head.bias")


# ---------------------------------------------------------------- edgemix's own format

def save_checkpoint(path: Path, model: torch.nn.Module, meta: dict, extra: dict | None = None) -> None:
    """Weights + model spec + training metadata; written to a temporary name, then renamed."""
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "spec": model.spec.to_dict(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "meta": meta,
        **(extra or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def _torch_load(path: Path) -> object:
    try:
        # weights_only: a checkpoint is data, never code to run.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated/corrupt zips and pickles
        first_line = (str(e).splitlines() or ["empty file"])[0][:160]
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {first_line})",
            hint="re-download or re-create it; edgemix reads its own .pt, timm .pth/.safetensors and JAX .npz",
        ) from None


def read_edgemix_checkpoint(path: Path, obj: object = None) -> dict:
    """An edgemix checkpoint, checked whole (state dict of tensors, a complete spec); ``obj`` is the
    file's content when the caller already loaded it."""
    obj = _torch_load(path) if obj is None else obj
    if not (isinstance(obj, dict) and obj.get("format") == FORMAT):
        raise CheckpointError(f"{path} is not an edgemix checkpoint")
    if obj.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {obj['format_version']}; this edgemix reads "
            f"up to {FORMAT_VERSION}", hint="upgrade edgemix")
    sd = obj.get("state_dict")
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        found = ", ".join(sorted(map(str, obj))) or "nothing"
        raise CheckpointError(f"edgemix checkpoint {path} has no state_dict of tensors (it holds: {found})",
                              hint="re-save it with `edgemix train`, or pass a complete checkpoint")
    if "spec" not in obj:
        raise CheckpointError(f"edgemix checkpoint {path} has no model spec",
                              hint="re-save it with `edgemix train`")
    try:
        spec_from_dict(obj["spec"])
    except CheckpointError as e:
        raise CheckpointError(f"edgemix checkpoint {path}: {e.message}", hint=e.hint) from None
    return obj


# ---------------------------------------------------------------- Google's JAX .npz

def _jax_to_torch_key(key: str) -> tuple[str, str] | None:
    """Map one flattened JAX parameter name to (torch key, kind of layout change)."""
    key = key.replace(".", "/")
    m = re.fullmatch(r"MixerBlock_(\d+)/(.+)", key)
    if m:
        i, rest = m.groups()
        table = {
            "LayerNorm_0/scale": ("norm1.weight", "copy"), "LayerNorm_0/bias": ("norm1.bias", "copy"),
            "LayerNorm_1/scale": ("norm2.weight", "copy"), "LayerNorm_1/bias": ("norm2.bias", "copy"),
        }
        for jax_mlp, ours in (("token_mixing", "mlp_tokens"), ("channel_mixing", "mlp_channels")):
            for d, fc in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
                table[f"{jax_mlp}/{d}/kernel"] = (f"{ours}.{fc}.weight", "dense")
                table[f"{jax_mlp}/{d}/bias"] = (f"{ours}.{fc}.bias", "copy")
        if rest in table:
            k, kind = table[rest]
            return f"blocks.{i}.{k}", kind
        return None
    top = {
        "stem/kernel": ("stem.proj.weight", "conv"), "stem/bias": ("stem.proj.bias", "copy"),
        "pre_head_layer_norm/scale": ("norm.weight", "copy"), "pre_head_layer_norm/bias": ("norm.bias", "copy"),
        "head/kernel": ("head.weight", "dense"), "head/bias": ("head.bias", "copy"),
    }
    return top.get(key)


def jax_npz_to_state_dict(arrays: dict[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Returns the mapped state dict and the JAX names that have no place in the model."""
    sd, unexpected = {}, []
    for name, arr in arrays.items():
        mapped = _jax_to_torch_key(name)
        if mapped is None:
            unexpected.append(name)
            continue
        key, kind = mapped
        t = torch.from_numpy(np.asarray(arr, dtype=np.float32).copy())
        if kind == "dense" and t.ndim == 2:  # flax Dense kernel is (in, out); nn.Linear wants (out, in)
            t = t.t()
        elif kind == "conv" and t.ndim == 4:  # flax Conv kernel is HWIO; nn.Conv2d wants OIHW
            t = t.permute(3, 2, 0, 1)
        sd[key] = t.contiguous()
    return sd, unexpected


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e})",
                              hint="re-download the .npz") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated (safetensors: {e})") from None


# ---------------------------------------------------------------- loading into a model

def check_and_load(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str,
                   unexpected: list[str] = (), reset_head: bool = False) -> list[str]:
    """Load ``sd`` into ``model`` after checking every key; returns the keys that were reset."""
    own = model.state_dict()
    unexpected = list(unexpected) + sorted(k for k in sd if k not in own)
    missing = sorted(k for k in own if k not in sd)
    wrong = {k: (tuple(sd[k].shape), tuple(own[k].shape)) for k in own if k in sd and sd[k].shape != own[k].shape}
    head_wrong = {k for k in wrong if k in HEAD_KEYS}
    reset = []
    if reset_head:
        # the user asked for a new head: a head of another class count is dropped, not an error
        for k in HEAD_KEYS:
            if k in wrong or k in missing:
                wrong.pop(k, None)
                if k in missing:
                    missing.remove(k)
                reset.append(k)
    if missing or unexpected or wrong:
        lines = []
        if missing:
            lines.append(f"missing keys ({len(missing)}): {', '.join(missing[:12])}" + (" ..." if len(missing) > 12 else ""))
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:12])}"
                         + (" ..." if len(unexpected) > 12 else ""))
        if wrong:
            lines.append("wrong-shaped keys: " + ", ".join(f"{k} is {list(a)} in the file, model expects {list(b)}"
                                                           for k, (a, b) in list(wrong.items())[:12]))
        hint = None
        if head_wrong and set(wrong) == head_wrong and not missing and not unexpected:
            n = sd["head.bias"].shape[0] if "head.bias" in sd else "?"
            hint = (f"the file's head has {n} classes; pass --num-classes {n} to keep it, "
                    "or --reset-head to drop it and start a new head")
        elif wrong:
            hint = "check --model and --image-size: they must match the checkpoint"
        raise CheckpointError(f"{source} does not fit {model.spec.name}: " + "; ".join(lines), hint=hint)
    with torch.no_grad():
        for k, v in sd.items():
            if k not in reset:
                own[k].copy_(v)
        if reset:
            model.head.reset_parameters()
    return reset


def detect_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return "jax"
    if suffix == ".safetensors":
        return "timm"
    if suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return "torch"
    raise CheckpointError(f"unknown checkpoint type '{path.name}'",
                          hint="edgemix reads .pt (edgemix), .pth/.safetensors (timm) and .npz (official JAX)")


# state dicts inside training checkpoints: timm's "state_dict", the CycleMLP/DeiT family's "model",
# ViP's "state_dict_ema" (the EMA weights it reports) when nothing else is there
_CONTAINERS = ("state_dict", "model", "state_dict_ema")


def _unwrap(obj: dict) -> dict:
    for key in _CONTAINERS:
        if isinstance(obj.get(key), dict):
            return obj[key]
    return obj


def load_weights(model: torch.nn.Module, path: str | Path, reset_head: bool = False) -> dict:
    """Load any supported checkpoint into ``model``; returns provenance (format, sha256, meta)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist" if not path.exists()
                              else f"checkpoint '{path}' is not a file")
    fmt = detect_format(path)
    family = family_of(model)
    meta: dict = {}
    if fmt == "jax":
        if family.name != "mixer":
            raise CheckpointError(f"{path} is a JAX .npz (the format of Google's Mixer release); {family.title} "
                                  "checkpoints come as PyTorch .pth/.pt files",
                                  hint="pass the authors' .pth, or a Mixer model with this file")
        sd, unexpected = jax_npz_to_state_dict(_read_npz(path))
    elif fmt == "timm":
        sd, unexpected = family.import_state_dict(_strip_ddp(_read_safetensors(path)), model.spec)
        fmt = "timm" if family.name == "mixer" else "safetensors"
    else:
        obj = _torch_load(path)
        if isinstance(obj, dict) and obj.get("format") == FORMAT:
            obj = read_edgemix_checkpoint(path, obj)
            fmt, meta = "edgemix", obj.get("meta", {})
            sd, unexpected = obj["state_dict"], []
        elif isinstance(obj, dict):
            fmt = "timm" if family.name == "mixer" else "state-dict"
            sd, unexpected = family.import_state_dict(_strip_ddp(_unwrap(obj)), model.spec)
        else:
            raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    reset = check_and_load(model, sd, str(path), unexpected, reset_head)
    return {"path": str(path), "format": fmt, "sha256": file_sha256(path), "reset": reset, "meta": meta}


def _strip_ddp(sd: dict) -> dict:
    """Checkpoints saved from a DistributedDataParallel wrapper prefix every key with 'module.'."""
    return {(k.removeprefix("module.") if isinstance(k, str) else k): v for k, v in sd.items()}


def spec_from_checkpoint(path: str | Path):
    """The model spec stored in an edgemix checkpoint (None for foreign formats)."""
    path = Path(path)
    if path.suffix.lower() not in (".pt", ".pth") or not path.is_file():
        return None
    obj = _torch_load(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return spec_from_dict(read_edgemix_checkpoint(path, obj)["spec"])
    return None

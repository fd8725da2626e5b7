"""A content-addressed cache for the one-time costs of a build, and the one cache root of edgemix:
the native runners (``runners/``), the ExecuTorch SDKs they are built against (``sdk/``) and the
wheels those come from (``wheels/``) live under it too (edgemix.backends.executorch.native).

Two results depend only on what goes in, not on the INT8 work a build does, and cost more than
half of an S/16 build at 224 px on a 2-core host when recomputed each time:

- the FP32 reference logits of the evaluation set (the eager model on 1,000 images: ~60 s), keyed
  by the model's parameters, its spec, the evaluation images, the device and the torch version;
- the FP32 artifact every INT8 build is compared with ("INT8 not faster" check), keyed by the
  model's parameters, the backend, the target profile, the backend options, the example input and
  the library versions.

A key is a SHA-256 over all of that, so a changed weight, image, target setting or library version
is a different entry: the cache can be stale only if the hashed inputs are. Entries are written
under a temporary name and renamed; an entry that cannot be read is removed and recomputed. The
cache never fails a build: when it cannot be written, the build goes on and says so.

Location: ``$EDGEMIX_CACHE_DIR``, else ``$XDG_CACHE_HOME/edgemix``, else ``~/.cache/edgemix``;
``EDGEMIX_CACHE_DIR=off`` (or ``--no-cache``) turns it off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

ENV = "EDGEMIX_CACHE_DIR"


_off = 0  # > 0 inside `disabled()`: --no-cache for everything one build does


@contextlib.contextmanager
def disabled():
    """Switch the cache off for the work in this block (``--no-cache``), every kind of entry alike."""
    global _off
    _off += 1
    try:
        yield
    finally:
        _off -= 1


def root() -> Path | None:
    """The cache folder, or None when caching is switched off."""
    if _off:
        return None
    value = os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "off", "0", "false", "no") else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgemix"


def digest(*parts) -> str:
    """SHA-256 over JSON-able parts, tensors and arrays (by dtype, shape and bytes)."""
    h = hashlib.sha256()

    def feed(obj):
        if isinstance(obj, torch.Tensor):
            obj = obj.detach().cpu().contiguous().numpy()
        if isinstance(obj, np.ndarray):
            h.update(f"array:{obj.dtype}:{obj.shape}:".encode())
            h.update(np.ascontiguousarray(obj).tobytes())
        else:
            h.update(json.dumps(obj, sort_keys=True, default=str).encode())
        h.update(b"\0")

    for part in parts:
        feed(part)
    return h.hexdigest()


def model_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer (name, dtype, shape, bytes) and the spec, if any."""
    state = model.state_dict()
    spec = getattr(model, "spec", None)
    return digest(spec.to_dict() if hasattr(spec, "to_dict") else None,
                  *[x for name in sorted(state) for x in (name, state[name])])


_warned_unwritable = False


def _not_cached(err: OSError) -> None:
    """Say once per process that the cache cannot be written: the build goes on without it, but a
    user who expects the next build to be fast should know why it will not be."""
    global _warned_unwritable
    if _warned_unwritable:
        return
    _warned_unwritable = True
    from edgemix import console

    console.warn(f"the build cache {root()} is not writable ({err.strerror or err}); results are not "
                 f"cached. Set {ENV} to a writable folder, or to 'off'.")


def _entry(kind: str, key: str) -> Path | None:
    base = root()
    return None if base is None else base / kind / key


def load_arrays(kind: str, key: str) -> dict[str, np.ndarray] | None:
    """The arrays stored under (kind, key), or None (absent, cache off, or unreadable: then removed)."""
    path = _entry(kind, key)
    if path is None:
        return None
    path = path.with_suffix(".npz")
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {name: z[name] for name in z.files}
    except Exception:  # a truncated or foreign file: recompute rather than trust it
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        return None


def save_arrays(kind: str, key: str, **arrays: np.ndarray) -> Path | None:
    """Store arrays under (kind, key); returns the file, or None when off or not writable."""
    path = _entry(kind, key)
    if path is None:
        return None
    path = path.with_suffix(".npz")
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, **arrays)
        tmp.replace(path)
        return path
    except OSError as e:
        _not_cached(e)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        return None


def load_folder(kind: str, key: str, required: tuple[str, ...] = ("entry.json",)) -> Path | None:
    """A cached folder holding every file in ``required``, or None."""
    path = _entry(kind, key)
    if path is None or not path.is_dir():
        return None
    if not all((path / name).is_file() for name in required):
        shutil.rmtree(path, ignore_errors=True)
        return None
    return path


def save_folder(kind: str, key: str, files: dict[str, Path], meta: dict) -> Path | None:
    """Copy ``files`` (name in the entry -> source) and ``meta`` (as entry.json, written last) into
    the entry for (kind, key); returns the folder, or None when off or not writable."""
    path = _entry(kind, key)
    if path is None:
        return None
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, src in files.items():
            shutil.copyfile(src, tmp / name)
        (tmp / "entry.json").write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        return path
    except OSError as e:
        _not_cached(e)
        shutil.rmtree(tmp, ignore_errors=True)
        return None

"""Small file helpers shared by every stage: content hashes, write-then-rename, and the rule that
an OSError on a user's path is a user error (exit 2) naming the path, never a traceback."""

from __future__ import annotations

import errno
import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from edgemix.errors import UsageError


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def path_error(path: str | Path, action: str, err: OSError, option: str | None = None) -> UsageError:
    """One paragraph for an OSError on a user's path: the path, what failed and why, what to do."""
    why = err.strerror or str(err)
    if err.filename and str(err.filename) != str(path):
        why += f" ({err.filename})"
    if err.errno in (errno.ENOTDIR, errno.EEXIST):
        blocker = next((p for p in Path(path).parents if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            why = f"{blocker} is a file, not a folder"
    hint = f"choose another {option}" if option else "check the path and its permissions"
    return UsageError(f"cannot {action} {path}: {why}", hint=hint)


@contextmanager
def user_path(path: str | Path, action: str = "write", option: str | None = None) -> Iterator[None]:
    """Turn an OSError raised while touching ``path`` into :func:`path_error`."""
    try:
        yield
    except OSError as e:
        raise path_error(path, action, e, option) from None


def refuse_foreign_file(path: str | Path, is_ours: Callable[[Path], bool], what: str, option: str) -> None:
    """edgemix replaces only files it wrote itself: an existing ``path`` that ``is_ours`` does not
    recognise (or that is not a regular file) is a usage error, and nothing is touched."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_file():
        try:
            ours = is_ours(path)
        except (OSError, ValueError):
            ours = False
        if ours:
            return
        raise UsageError(f"{option} {path} already exists and is not {what} written by edgemix; "
                         "edgemix replaces only files it made itself",
                         hint=f"choose another {option}, or remove the file yourself if you no longer need it")
    raise UsageError(f"{option} {path} exists and is not a regular file",
                     hint=f"choose another {option} (a file path)")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write beside the destination under a hidden name, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)

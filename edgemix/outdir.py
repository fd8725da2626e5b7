"""The output folder of `edgemix build`: what a build may replace, and how it replaces it safely.

A build writes into ``.NAME.staging-PID`` beside the destination and swaps it in at the end. This
module makes that swap lose nothing:

* only a folder that holds an edgemix report (or an empty one) is ever replaced, never a file or a
  user's folder (:func:`check_destination`);
* one build at a time per folder: an ``flock`` on ``.NAME.lock`` beside it, holding the holder's pid
  (:func:`claim`);
* the swap is one atomic ``renameat2(RENAME_EXCHANGE)`` where the kernel and filesystem have it, two
  renames elsewhere (:func:`replace`);
* whatever a killed build left beside the folder is cleaned, and a build it had moved aside is
  restored, by the next build into the same folder (:func:`recover`).

Test hooks (environment): ``EDGEMIX_FAULT_INJECT=<point>`` kills the process with SIGKILL at that
named point of the swap (``before-swap``, ``after-exchange``, ``between-renames``);
``EDGEMIX_NO_RENAME_EXCHANGE=1`` forces the two-rename path.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import json
import os
import platform
import re
import shutil
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgemix import console
from edgemix.errors import UsageError

FAULT_ENV = "EDGEMIX_FAULT_INJECT"
NO_EXCHANGE_ENV = "EDGEMIX_NO_RENAME_EXCHANGE"
FAULT_POINTS = ("before-swap", "after-exchange", "between-renames")

_ANOTHER_OUT = "choose another --out, or remove it yourself if you no longer need it"


def fault_point(name: str) -> None:
    """Die here, as from ``kill -9``, when the test hook names this point: crash-safety is only
    believable if a test can stop the process exactly between two renames, not by timing."""
    if os.environ.get(FAULT_ENV) == name:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------- what is ours

def is_edgemix_artifact(path: str | Path) -> bool:
    """True for a folder holding a report.json with the keys every edgemix report has. Anything
    less (no report, unreadable, someone else's JSON) could be a user's data, so it is not ours."""
    try:
        report = json.loads((Path(path) / "report.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and "schema_version" in report and "provenance" in report


def final_path(out: str | Path) -> Path:
    """The destination with a real last component: siblings are named after it (``.NAME.lock``), so
    ``.`` and ``..`` are made absolute first."""
    out = Path(out)
    if out.name in ("", ".", ".."):
        out = Path(os.path.abspath(out))
    if out.name in ("", ".", ".."):
        raise UsageError(f"--out {out} is not a folder a build can write", hint="choose another --out")
    return out


def check_destination(out: Path) -> None:
    """Refuse, before any work, a destination whose replacement could lose something: a file, a
    symbolic link, a folder edgemix did not write, or a path under a file. Writes nothing."""
    try:
        if out.is_symlink():
            raise UsageError(f"{out} is a symbolic link; a build replaces its output folder, which would "
                             f"replace the link, not the folder it points to",
                             hint=f"pass the folder itself ({os.path.realpath(out)}) or another --out")
        if out.exists():
            if not out.is_dir():
                raise UsageError(f"{out} is a file, not a build folder; a build never replaces a file",
                                 hint=_ANOTHER_OUT)
            if is_edgemix_artifact(out) or not any(out.iterdir()):
                return
            raise UsageError(f"{out} exists and is not an edgemix build folder (it holds no edgemix "
                             f"report.json); a build replaces its whole output folder, which would delete "
                             f"what this one holds", hint=_ANOTHER_OUT)
        for parent in out.parents:
            if os.path.lexists(parent):
                if not parent.is_dir():
                    raise UsageError(f"cannot create {out}: {parent} is a file, not a folder",
                                     hint="choose another --out")
                break
    except OSError as e:
        raise unwritable(out, e) from None


def unwritable(out: Path, err: OSError) -> UsageError:
    """An OSError on the user's own path is a user error (exit 2), named, never a traceback."""
    from edgemix.fileutil import path_error

    return path_error(out, "write the build folder", err, "--out")


# ---------------------------------------------------------------------------------- siblings

def staging_path(out: Path, pid: int | None = None) -> Path:
    return out.with_name(f".{out.name}.staging-{os.getpid() if pid is None else pid}")


def old_path(out: Path, pid: int | None = None) -> Path:
    return out.with_name(f".{out.name}.old-{os.getpid() if pid is None else pid}")


def lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.lock")


def siblings(out: Path) -> list[tuple[str, Path]]:
    """(kind, path) of every staging/old folder of ``out`` in its parent, kind 'staging' or 'old'.
    Only the exact names a build creates match, so nothing of the user's is ever picked up."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(staging|old)-\d+")
    try:
        names = os.listdir(out.parent)
    except FileNotFoundError:
        return []
    return sorted((m.group(1), out.parent / name) for name in names if (m := pattern.fullmatch(name)))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)  # what is left is retried by the next build
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def recover(out: Path) -> None:
    """Undo what an interrupted build left beside ``out``. Must run under :func:`claim`: every
    sibling's writer would need the lock we hold, so all of them are stale by definition (no pid
    liveness guess, which pid reuse would defeat).

    A build killed between the two renames of the fallback swap leaves no ``out`` and the previous
    build in ``.NAME.old-PID``: that build is put back. The half-swapped new build in the staging
    folder is not; its command never reported success."""
    found = siblings(out)
    if not os.path.lexists(out):
        olds = [p for kind, p in found if kind == "old" and p.is_dir() and not p.is_symlink()]
        complete = [p for p in olds if is_edgemix_artifact(p)]
        empty = [p for p in olds if not complete and not any(p.iterdir())]  # an accepted empty --out
        if complete or empty:
            back = max(complete, key=lambda p: (p / "report.json").stat().st_mtime) if complete else empty[0]
            os.rename(back, out)
            console.info(f"restored {out} from {back.name}, left by an interrupted build")
    for _, p in found:
        if os.path.lexists(p):
            _remove(p)


# ---------------------------------------------------------------------------------- one writer

def _holder_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    path = lock_path(out)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise unwritable(out, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_pid(fd)
            os.close(fd)
            raise UsageError(f"another build (pid {holder}) is writing {out}",
                             hint="wait for it to finish, or choose another --out") from None
        except OSError as e:
            os.close(fd)
            raise unwritable(out, e) from None
        # A holder unlinks the lock file as it lets go; if that happened between our open and our
        # flock, we locked a file no one else will open. Start over on the one now at the path.
        try:
            st, mine = os.stat(path), os.fstat(fd)
            if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # for the refused build's message only; flock decides
        yield
    finally:
        try:
            # unlinked while still locked: whoever opened it meanwhile fails flock now, or wins it
            # after our close and then sees the path no longer names its file, and starts over
            os.unlink(path)
        except OSError:
            pass
        os.close(fd)


@contextmanager
def claim(out: Path) -> Iterator[None]:
    """Hold ``out`` for one build: refuse it if replacing it could lose something or another build
    holds it, clean what interrupted builds left, and keep other builds out until the block ends.

    The destination is checked before the lock so that a refused path gets nothing written beside
    it, and again under the lock, where a concurrent build can no longer change it."""
    check_destination(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise unwritable(out, e) from None
    with _locked(out):
        try:
            recover(out)
        except OSError as e:
            raise unwritable(out, e) from None
        check_destination(out)
        yield


# ---------------------------------------------------------------------------------- the swap

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_SYS_RENAMEAT2 = {"x86_64": 316, "amd64": 316, "aarch64": 276, "arm64": 276}


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _renameat2_symbol():
    """glibc's renameat2 (2.28+); None where the C library lacks it."""
    fn = getattr(_libc(), "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
    return fn


def _renameat2_syscall():
    """The raw syscall, for C libraries older than the kernel; None off the architectures we know."""
    libc, nr = _libc(), _SYS_RENAMEAT2.get(platform.machine().lower())
    if libc is None or nr is None:
        return None
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    # variadic: every argument passed with an explicit C type, no argtypes
    return lambda olddir, old, newdir, new, flags: syscall(
        ctypes.c_long(nr), ctypes.c_int(olddir), ctypes.c_char_p(old), ctypes.c_int(newdir),
        ctypes.c_char_p(new), ctypes.c_uint(flags))


@functools.cache
def _renameat2():
    return _renameat2_symbol() or _renameat2_syscall()


def rename_exchange(a: str | Path, b: str | Path, _impl=None) -> None:
    """Atomically swap two existing paths. OSError(ENOSYS) where the kernel interface is missing,
    OSError(EINVAL) or EOPNOTSUPP where the filesystem does not support the exchange."""
    fn = _impl or _renameat2()
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available", str(a))
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(a), None, str(b))


_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


def replace(staging: Path, out: Path) -> None:
    """Put the finished build in ``staging`` under ``out``. At every instant ``out`` holds a complete
    build (the old or the new one) on the exchange path; on the two-rename fallback there is one
    gap, which :func:`recover` closes on the next build. Must run under :func:`claim`."""
    fault_point("before-swap")
    try:
        if not os.path.lexists(out):
            os.rename(staging, out)
            return
        if os.environ.get(NO_EXCHANGE_ENV, "") in ("", "0"):
            try:
                rename_exchange(staging, out)
            except OSError as e:
                if e.errno not in _NO_EXCHANGE:
                    raise
            else:
                # the old build now sits under the staging name, which the caller and any later
                # build treat as disposable
                fault_point("after-exchange")
                shutil.rmtree(staging, ignore_errors=True)
                return
        backup = old_path(out)
        os.rename(out, backup)
        fault_point("between-renames")
        try:
            os.rename(staging, out)
        except OSError:
            os.rename(backup, out)
            raise
        shutil.rmtree(backup, ignore_errors=True)
    except OSError as e:
        raise UsageError(f"could not move the new build into {out}: {e.strerror or e}; the previous build "
                         f"was not replaced", hint="choose another --out in a folder you can write") from None

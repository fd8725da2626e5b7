"""Terminal output: one line per stage, progress bars for long work, silence under CI=true / --quiet."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

_quiet = False


def set_quiet(value: bool) -> None:
    global _quiet
    _quiet = value


@contextmanager
def quieted(value: bool):
    """--quiet for the work in this block only (the Python API must not change it for the caller)."""
    global _quiet
    before, _quiet = _quiet, value
    try:
        yield
    finally:
        _quiet = before


def quiet() -> bool:
    return _quiet or os.environ.get("CI", "").lower() in ("1", "true", "yes")


# While third-party output is captured (capture_noise), edgemix's own lines go to the terminal's
# original descriptors through these streams; otherwise to sys.stdout / sys.stderr.
_terminal: tuple | None = None


def _out():
    return _terminal[0] if _terminal else sys.stdout


def _err():
    return _terminal[1] if _terminal else sys.stderr


def info(msg: str) -> None:
    """Result lines (a stage done, a summary) are printed even under CI; only progress is silenced."""
    if not _quiet:
        print(msg, file=_out(), flush=True)


def warn(msg: str) -> None:
    """A warning the user must see (even under --quiet): to stderr, past any captured noise."""
    print(f"warning: {msg}", file=_err(), flush=True)


def _flush_c_stdio() -> None:
    """C and C++ libraries (ExecuTorch's runtime, XNNPACK's cpuinfo) buffer their own stdout: flush it
    before a descriptor is swapped, or their lines surface later on the wrong side."""
    import ctypes

    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


@contextmanager
def capture_noise(verbose: bool = False):
    """Run a build with third-party output captured: torch/torchao warnings and log lines, torchao's
    attempts to load CUDA kernels, XNNPACK's cpuinfo lines. They are written at the file-descriptor
    level by C++ as well as by Python, so descriptors 1 and 2 point at a temporary file while the
    stage lines go to the terminal. ``verbose`` shows everything as it comes. If the work fails with
    something other than a user error, the captured text is shown before the error: it may explain it."""
    global _terminal
    if verbose or _terminal is not None:
        yield
        return
    import tempfile

    from edgemix.errors import EdgemixError

    sys.stdout.flush()
    sys.stderr.flush()
    _flush_c_stdio()
    saved = os.dup(1), os.dup(2)
    log = tempfile.TemporaryFile(mode="w+b")
    _terminal = (os.fdopen(os.dup(saved[0]), "w", buffering=1), os.fdopen(os.dup(saved[1]), "w", buffering=1))
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    # Python-level writers too, where sys.stdout is not descriptor 1 (pytest, notebooks)
    py_streams = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = open(os.dup(log.fileno()), "w", buffering=1, errors="replace")
    failed = False
    try:
        yield
    except EdgemixError:
        raise
    except BaseException:
        failed = True
        raise
    finally:
        sys.stdout.close()
        sys.stdout, sys.stderr = py_streams
        _flush_c_stdio()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in _terminal:
            f.close()
        _terminal = None
        for fd in saved:
            os.close(fd)
        if failed:
            log.seek(0)
            text = log.read().decode("utf-8", "replace")[-20000:]
            if text.strip():
                print("--- output of the libraries edgemix called (captured) ---\n" + text.rstrip()
                      + "\n--- end of captured output ---", file=sys.stderr, flush=True)
        log.close()


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def stage_line(name: str, produced: str, seconds: float, size: int | None = None) -> None:
    size_txt = f"  {human_bytes(size)}" if size is not None else ""
    info(f"[{name:>9}] {produced}  ({seconds:.1f} s){size_txt}")


@contextmanager
def progress(description: str, total: int | None):
    """Yields advance(n=1); a rich progress bar on a terminal, nothing under CI/--quiet."""
    if quiet() or not _err().isatty():
        yield lambda n=1, **kw: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[extra]}"), TimeElapsedColumn(), transient=True,
                  console=Console(file=_err())) as p:
        task = p.add_task(description, total=total, extra="")
        yield lambda n=1, **kw: p.update(task, advance=n, extra=" ".join(f"{k}={v}" for k, v in kw.items()))

"""Terminal output: one line per stage, progress bars for long work, silence under CI=true / --quiet."""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager

_quiet = False


def set_quiet(value: bool) -> None:
    global _quiet
    _quiet = value


def quiet() -> bool:
    return _quiet or os.environ.get("CI", "").lower() in ("1", "true", "yes")


def info(msg: str) -> None:
    """Result lines (a stage done, a summary) are printed even under CI; only progress is silenced."""
    if not _quiet:
        print(msg, flush=True)


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
    if quiet() or not sys.stderr.isatty():
        yield lambda n=1, **kw: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[extra]}"), TimeElapsedColumn(), transient=True) as p:
        task = p.add_task(description, total=total, extra="")
        yield lambda n=1, **kw: p.update(task, advance=n, extra=" ".join(f"{k}={v}" for k, v in kw.items()))


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0

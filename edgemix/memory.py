"""Peak resident memory of the build process, per stage (Linux).

The kernel keeps a high-water mark of each process's resident set (``VmHWM`` in
``/proc/self/status``); writing ``5`` to ``/proc/self/clear_refs`` resets it to the current
resident set. A build reads the mark at the end of each stage and resets it, so each stage's figure
is its own peak; the largest of them is the build's (``report.json``'s ``peak_rss_mb``).

The kernel keeps one mark per process, and a tool that reads it afterwards (``/usr/bin/time -v``,
getrusage's ``ru_maxrss``, a notebook's memory monitor) would see only the peak since the last
reset: an L/16 phone build's 8.6 GB peak showed as 6.3 GB in ``time -v``. So stages are measured
only where edgemix owns the process (the ``edgemix`` command calls :func:`own_process`); inside a
caller's process (``edgemix.build`` from Python) the mark is left alone, the stages report no peak
and the build's peak is the process's. Memory of worker processes (the arm64
emulation, ExecuTorch's runner) is theirs, not counted here. Where the mark cannot be read or reset
(not Linux, a restricted /proc) the figures are None rather than a cumulative peak posing as a
stage's.
"""

from __future__ import annotations

from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_resettable: bool | None = None
_highest = 0.0
_owned = False


def own_process() -> None:
    """This process is edgemix's own (the CLI): per-stage peaks may reset the high-water mark."""
    global _owned
    _owned = True


def status_mb(field: str, status: str | None = None) -> float | None:
    """One ``kB`` field of /proc/self/status (VmRSS, VmHWM) in MB, or None."""
    try:
        text = _STATUS.read_text() if status is None else status
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            try:
                return int(line.split()[1]) / 1024
            except (IndexError, ValueError):
                return None
    return None


def reset_peak() -> bool:
    """Start a new high-water mark; False where the kernel does not let us (then per-stage peaks are
    not reported)."""
    global _resettable
    if not _owned:
        _resettable = False
        return False
    peak = status_mb("VmHWM")
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        _resettable = False
        return False
    _remember(peak)
    _resettable = peak is not None
    return _resettable


def _remember(peak: float | None) -> None:
    global _highest
    if peak is not None:
        _highest = max(_highest, peak)


def peak_rss_mb() -> float | None:
    """The peak since the last reset_peak(), in MB (None where it cannot be reset or read)."""
    peak = status_mb("VmHWM")
    _remember(peak)
    return round(peak, 1) if _resettable and peak is not None else None


def process_peak_rss_mb() -> float | None:
    """The process's peak since it started, across resets."""
    peak = status_mb("VmHWM")
    _remember(peak)
    return round(_highest, 1) if _highest else None

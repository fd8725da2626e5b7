"""Latency of a runnable artifact: warm-up, then repeated timed runs; medians and tails."""

from __future__ import annotations

import time

import numpy as np


def summarize(samples_ms: list[float], batch: int) -> dict:
    a = np.asarray(samples_ms, dtype=np.float64)
    p50 = float(np.percentile(a, 50))
    return {
        "p50": p50, "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
        "mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
        "min": float(a.min()), "runs": len(a), "batch": batch,
        "throughput_ips": 1000.0 * batch / p50 if p50 > 0 else None,
        # the spread of the median itself (half the interquartile range): what a gate treats as noise
        "noise_ms": float((np.percentile(a, 75) - np.percentile(a, 25)) / 2),
        "samples": [round(float(x), 4) for x in a],
    }


def measure(fn, x, warmup: int, runs: int) -> list[float]:
    for _ in range(warmup):
        fn(x)
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn(x)
        out.append((time.perf_counter() - t) * 1000)
    return out


def measure_interleaved(fns: dict, x, warmup: int, runs: int, min_seconds: float = 0.0,
                        max_runs: int = 5000) -> dict[str, list[float]]:
    """Time several paths on the same input, one run of each per round so machine noise hits all alike.

    At least ``runs`` rounds, and more (up to ``max_runs``) until ``min_seconds`` of timing have
    passed: a sub-millisecond model gets thousands of paired rounds for the price of a 50 ms one's
    hundred, which is what lets a sign test separate a 10% speed-up from shared-core noise. The
    order inside a round alternates so that no path always runs right after another.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn(x)
    names = list(fns)
    out = {k: [] for k in fns}
    start = time.perf_counter()
    r = 0
    while r < runs or (r < max_runs and time.perf_counter() - start < min_seconds):
        for k in (names if r % 2 == 0 else names[::-1]):
            t = time.perf_counter()
            fns[k](x)
            out[k].append((time.perf_counter() - t) * 1000)
        r += 1
    return out

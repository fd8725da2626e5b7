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


def measure_interleaved(fns: dict, x, warmup: int, runs: int) -> dict[str, list[float]]:
    """Time several paths on the same input, alternating them so machine noise hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn(x)
    out = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn(x)
            out[k].append((time.perf_counter() - t) * 1000)
    return out

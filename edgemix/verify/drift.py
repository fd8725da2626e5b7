"""Drift of a deployed artifact's logits against the FP32 reference's."""

from __future__ import annotations

import math

import numpy as np


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (honest for small n and for p near 0 or 1)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_delta_interval(ref_correct: np.ndarray, dep_correct: np.ndarray, z: float = 1.96) -> tuple[float, float]:
    """95% interval of the top-1 change (deployed - reference), in points, from the paired
    per-image outcomes: only images where the two disagree carry information."""
    n = len(ref_correct)
    if n == 0:
        return -100.0, 100.0
    d = dep_correct.astype(np.float64) - ref_correct.astype(np.float64)
    mean, sd = d.mean(), d.std(ddof=1) if n > 1 else 0.0
    half = z * sd / math.sqrt(n)
    return 100 * (mean - half), 100 * (mean + half)


def drift_metrics(ref: np.ndarray, dep: np.ndarray, labels: np.ndarray) -> dict:
    ref = ref.astype(np.float64)
    dep = dep.astype(np.float64)
    n = len(labels)
    ref_pred, dep_pred = ref.argmax(1), dep.argmax(1)
    ref_correct, dep_correct = ref_pred == labels, dep_pred == labels
    agree = ref_pred == dep_pred
    cos = (ref * dep).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(dep, axis=1) + 1e-12)
    noise = ((ref - dep) ** 2).sum()
    sqnr = float("inf") if noise == 0 else 10 * math.log10(((ref**2).sum() + 1e-30) / noise)
    lo, hi = paired_delta_interval(ref_correct, dep_correct)
    a_lo, a_hi = wilson_interval(int(agree.sum()), n)
    return {
        "samples": n,
        "reference_top1": float(ref_correct.mean()) if n else 0.0,
        "deployed_top1": float(dep_correct.mean()) if n else 0.0,
        "top1_delta": 100 * float(dep_correct.mean() - ref_correct.mean()) if n else 0.0,  # points
        "top1_delta_ci95": [lo, hi],
        "agreement": float(agree.mean()) if n else 0.0,
        "agreement_ci95": [a_lo, a_hi],
        "cosine_mean": float(cos.mean()) if n else 0.0,
        "cosine_min": float(cos.min()) if n else 0.0,
        "sqnr_db": sqnr,
        "max_abs_error": float(np.abs(ref - dep).max()) if n else 0.0,
        "flips": {"fixed": int((~ref_correct & dep_correct).sum()), "broken": int((ref_correct & ~dep_correct).sum())},
    }

"""Rows for `edgemix report`: one build, or two side by side with the change between them."""

from __future__ import annotations


def _get(r: dict, path: str):
    cur = r
    for k in path.split("."):
        if not isinstance(cur, dict) or k not in cur or cur[k] is None:
            return None
        cur = cur[k]
    return cur


# (label, dotted key, format, scale)
ROWS = [
    ("model", "model", "{}", None), ("target", "target", "{}", None), ("backend", "backend", "{}", None),
    ("precision", "precision", "{}", None), ("quantization", "quantization.scheme", "{}", None),
    ("QAT epochs", "quantization.qat_epochs", "{}", None),
    ("runtime", "deployed.runtime", "{}", None), ("samples", "drift.samples", "{}", None),
    ("reference top-1 (%)", "reference.top1", "{:.2f}", 100), ("deployed top-1 (%)", "deployed.top1", "{:.2f}", 100),
    ("top-1 change (pts)", "drift.top1_delta", "{:+.2f}", 1), ("agreement (%)", "drift.agreement", "{:.2f}", 100),
    ("cosine mean", "drift.cosine_mean", "{:.5f}", 1), ("SQNR (dB)", "drift.sqnr_db", "{:.1f}", 1),
    ("latency p50 (ms)", "latency_ms.p50", "{:.2f}", 1), ("latency p90 (ms)", "latency_ms.p90", "{:.2f}", 1),
    ("latency p99 (ms)", "latency_ms.p99", "{:.2f}", 1), ("INT8 / FP32 latency", "fp32_comparison.latency_ratio", "{:.2f}x", 1),
    ("artifact size (KB)", "artifact.bytes", "{:.1f}", 1 / 1024), ("build time (s)", "build_seconds", "{:.1f}", 1),
    ("on-device p50 (ms)", "bench.latency_ms.p50", "{:.2f}", 1),
    ("date", "provenance.date", "{}", None), ("commit", "provenance.git_commit", "{:.10}", None),
]


def _fmt(v, fmt, scale):
    if v is None:
        return "-"
    if scale is not None and isinstance(v, (int, float)):
        v = v * scale
    try:
        return fmt.format(v)
    except (ValueError, TypeError):
        return str(v)


def comparison_rows(reports: list[dict], names: list[str]) -> tuple[list[str], list[list[str]]]:
    headers = ["metric"] + names + (["change (B - A)"] if len(reports) == 2 else [])
    rows = []
    for label, key, fmt, scale in ROWS:
        vals = [_get(r, key) for r in reports]
        row = [label] + [_fmt(v, fmt, scale) for v in vals]
        if len(reports) == 2:
            a, b = vals
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and scale:
                row.append(f"{(b - a) * scale:+.2f}")
            else:
                row.append("" if a == b else "differs")
        rows.append(row)
    return headers, rows

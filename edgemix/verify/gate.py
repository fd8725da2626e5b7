"""`edgemix gate`: checks one build's report against budgets and an optional baseline.

Accuracy checks state their sample count and 95% interval; the latency check compares medians of
repeated runs and only fails beyond the noise measured in the same runs (half the interquartile
range of each side), so a slow run on a shared machine is not a regression by itself. Against a
baseline it compares the INT8/FP32 ratio timed within each run, not absolute milliseconds, so a
machine that is slower than the one that wrote the baseline is not a regression either.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from edgemix.errors import UsageError, unknown_choice
from edgemix.fileutil import user_path, write_text_atomic


@dataclass
class Check:
    name: str
    passed: bool
    value: float | str | None
    budget: str
    baseline: float | str | None
    detail: str


def load_schema() -> dict:
    return json.loads(resources.files("edgemix.schemas").joinpath("report.schema.json").read_text())


def validate_report(report: dict, source: str) -> None:
    import jsonschema

    try:
        jsonschema.validate(report, load_schema())
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise UsageError(f"{source} does not match the edgemix report schema v1 at {where}: {e.message}",
                         hint="rebuild it with this edgemix version") from None


def read_report(path: str | Path) -> tuple[dict, Path]:
    """A report from an artifact folder or a report.json path, validated."""
    path = Path(path)
    file = path / "report.json" if path.is_dir() else path
    if not file.is_file():
        raise UsageError(f"no build report at {file}", hint="run `edgemix build` first, or pass the artifact folder")
    try:
        report = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{file} is not readable JSON: {e}") from None
    if not isinstance(report, dict):
        raise UsageError(f"{file} is not an edgemix report (top level is {type(report).__name__})")
    if report.get("schema_version") != 1:
        raise UsageError(f"{file} has schema_version {report.get('schema_version')!r}; this edgemix reads 1")
    validate_report(report, str(file))
    return report, file


BASELINE_KEYS = ("schema_version", "model", "target", "backend", "precision", "quantization", "evaluation",
                 "reference", "deployed", "drift", "latency_ms", "fp32_comparison", "artifact", "provenance")


def baseline_of(report: dict) -> dict:
    """What a baseline keeps of a report: its metrics and provenance (not stages, details, or the raw
    latency samples: a sub-millisecond model times thousands of rounds, the gate reads the summary)."""
    base = {k: report[k] for k in BASELINE_KEYS if k in report}
    if isinstance(base.get("latency_ms"), dict):
        base["latency_ms"] = {k: v for k, v in base["latency_ms"].items() if k != "samples"}
    return base


LATENCY_BASES = ("auto", "fp32", "ms")  # what --baseline latency compares (see _latency_vs_baseline)


def check_budgets(max_top1_drop: float | None, min_agreement: float | None, min_cosine: float | None,
                  max_latency_ratio: float | None) -> None:
    """A budget no build can meet (or one that means nothing) is a usage error, not a failed gate."""
    for option, value, ok, valid in (
            ("--max-top1-drop", max_top1_drop, lambda v: v >= 0, "points >= 0"),
            ("--min-agreement", min_agreement, lambda v: 0 <= v <= 1, "a fraction in [0, 1], e.g. 0.99"),
            ("--min-cosine", min_cosine, lambda v: -1 <= v <= 1, "a cosine in [-1, 1], e.g. 0.99"),
            ("--max-latency-ratio", max_latency_ratio, lambda v: v > 0, "a ratio > 0, e.g. 1.5")):
        if value is not None and not ok(value):
            raise UsageError(f"{option} {value} is out of range; it takes {valid}")


IDENTITY_KEYS = ("model", "target", "precision")  # what must match between a report and its baseline


def check_same_build_kind(report: dict, baseline: dict) -> None:
    """A baseline of another model, target or precision says nothing about this build: refuse it."""
    diff = [f"{k} '{report.get(k)}' vs '{baseline.get(k)}'" for k in IDENTITY_KEYS
            if k in baseline and baseline.get(k) != report.get(k)]
    if diff:
        raise UsageError(f"the baseline is for another build ({'; '.join(diff)}, report vs baseline)",
                         hint="gate against the baseline of the same model, target and precision")


def run_checks(report: dict, baseline: dict | None, max_top1_drop: float | None = None,
               min_agreement: float | None = None, max_latency_ratio: float | None = None,
               min_cosine: float | None = None, latency_basis: str = "auto") -> list[Check]:
    if latency_basis not in LATENCY_BASES:
        raise unknown_choice("latency basis", latency_basis, LATENCY_BASES, plural="latency bases")
    check_budgets(max_top1_drop, min_agreement, min_cosine, max_latency_ratio)
    if baseline:
        check_same_build_kind(report, baseline)
    b = report["budget"]
    max_top1_drop = b["max_top1_drop"] if max_top1_drop is None else max_top1_drop
    min_agreement = b["min_agreement"] if min_agreement is None else min_agreement
    min_cosine = b["min_cosine"] if min_cosine is None else min_cosine
    max_latency_ratio = b["max_latency_ratio"] if max_latency_ratio is None else max_latency_ratio
    d, lat = report["drift"], report["latency_ms"]
    n = d["samples"]
    base_d = baseline["drift"] if baseline else None
    checks = []

    drop = -d["top1_delta"]
    lo, hi = d["top1_delta_ci95"]
    checks.append(Check(
        "top1_drop_vs_fp32", drop <= max_top1_drop, round(drop, 3), f"<= {max_top1_drop} pts",
        round(-base_d["top1_delta"], 3) if base_d else None,
        f"top-1 {100 * report['reference']['top1']:.2f}% (FP32) -> {100 * report['deployed']['top1']:.2f}% on "
        f"{n} images; change 95% CI {lo:+.2f} .. {hi:+.2f} pts"))
    a_lo, a_hi = d["agreement_ci95"]
    checks.append(Check(
        "agreement", d["agreement"] >= min_agreement, round(d["agreement"], 5), f">= {min_agreement}",
        base_d["agreement"] if base_d else None, f"{n} images; 95% CI {a_lo:.4f} .. {a_hi:.4f}"))
    checks.append(Check(
        "cosine_mean", d["cosine_mean"] >= min_cosine, round(d["cosine_mean"], 5), f">= {min_cosine}",
        base_d["cosine_mean"] if base_d else None, f"mean logit cosine over {n} images"))
    for isa in (report.get("isa_drift") or {}).get("profiles", []):
        if isa.get("trusted", True) and "agreement" in isa:
            checks.append(Check(
                f"agreement_{isa['arch']}_{isa['cpu']}", isa["agreement"] >= min_agreement, round(isa["agreement"], 5),
                f">= {min_agreement}", None, f"{isa['samples']} images on {isa['arch']} -cpu {isa['cpu']}"))
    cmp_ = report.get("fp32_comparison")
    if cmp_ and b.get("int8_must_be_faster", True):
        fallback = ", ".join(f"{k} x{v}" for k, v in (cmp_.get("float_fallback") or {}).items()) or "none"
        checks.append(Check(
            "int8_faster_than_fp32", bool(cmp_["int8_faster"]), round(cmp_["latency_ratio"], 3),
            "< 1.0x the FP32 artifact beyond noise", None,
            f"p50 {lat['p50']:.2f} ms (INT8) vs {cmp_['fp32_p50_ms']:.2f} ms (FP32); ops left in float: {fallback}"))
    if baseline:
        base_top1 = baseline["deployed"]["top1"]
        drop_b = 100 * (base_top1 - report["deployed"]["top1"])
        checks.append(Check(
            "top1_drop_vs_baseline", drop_b <= max_top1_drop, round(drop_b, 3), f"<= {max_top1_drop} pts",
            round(100 * base_top1, 3), f"deployed top-1 {100 * report['deployed']['top1']:.2f}% vs baseline "
                                       f"{100 * base_top1:.2f}% ({n} vs {baseline['drift']['samples']} images)"))
        checks.append(_latency_vs_baseline(report, baseline, max_latency_ratio, latency_basis))
    return checks


def _has_fp32(comparison: dict | None) -> bool:
    return bool(comparison and comparison.get("fp32_p50_ms"))


def _ratio_and_noise(lat: dict, comparison: dict) -> tuple[float, float]:
    """INT8 p50 / FP32 p50 of one run, and its noise: the relative noises of the two medians add."""
    def relative(p50: float, noise: float | None) -> float:
        return (noise or 0.0) / p50 if p50 > 0 else 0.0

    r = lat["p50"] / comparison["fp32_p50_ms"]
    return r, r * (relative(lat["p50"], lat.get("noise_ms"))
                   + relative(comparison["fp32_p50_ms"], comparison.get("fp32_noise_ms")))


def _latency_vs_baseline(report: dict, baseline: dict, max_ratio: float, basis: str) -> Check:
    """INT8 latency against the baseline's.

    basis "fp32" compares the INT8/FP32 p50 ratio, both timed interleaved in the same run, with the
    baseline's: a machine that is busier or slower than the one that wrote the baseline slows both
    artifacts alike and cancels out, while an INT8 path that lost speed (an op fell out of the
    delegate, a GEMM back to float) still shows. basis "ms" compares absolute p50 milliseconds, which
    only means something on the machine that wrote the baseline. "auto" is "fp32" when both sides
    have an FP32 comparison, else "ms".
    """
    lat, blat = report["latency_ms"], baseline["latency_ms"]
    cmp_, bcmp = report.get("fp32_comparison"), baseline.get("fp32_comparison")
    have_ratio = _has_fp32(cmp_) and _has_fp32(bcmp)
    if basis == "fp32" and not have_ratio:
        side = "this report" if not _has_fp32(cmp_) else "the baseline"
        raise UsageError(f"--latency-basis fp32 needs an FP32 comparison in both the report and the baseline; "
                         f"{side} has none", hint="rebuild with the FP32 comparison on, or use --latency-basis ms")
    absolute = f"p50 {lat['p50']:.2f} ms vs baseline {blat['p50']:.2f} ms over {lat['runs']} / {blat['runs']} runs"
    if basis == "ms" or (basis == "auto" and not have_ratio):
        noise = lat.get("noise_ms", 0.0) + blat.get("noise_ms", 0.0)
        limit = blat["p50"] * max_ratio + noise
        return Check("latency_p50_vs_baseline", lat["p50"] <= limit, round(lat["p50"] / blat["p50"], 3),
                     f"<= {max_ratio}x baseline + noise {noise:.2f} ms", round(blat["p50"], 3), absolute)
    r, noise = _ratio_and_noise(lat, cmp_)
    rb, base_noise = _ratio_and_noise(blat, bcmp)
    noise += base_noise
    limit = rb * max_ratio + noise
    return Check("int8_fp32_ratio_vs_baseline", r <= limit, round(r / rb, 3),
                 f"<= {max_ratio}x baseline + noise {noise:.3f}", round(rb, 3),
                 f"INT8/FP32 p50 {r:.3f} in this run vs {rb:.3f} in the baseline's ({absolute}; the ratio "
                 f"is timed in one run, so a slower machine cancels out)")


JUNIT_SUITE_PREFIX = "edgemix.gate."


def is_junit_file(path: Path) -> bool:
    """Was ``path`` written by :func:`write_junit` (the only kind of file --junit replaces)?"""
    with open(path, "rb") as f:
        head = f.read(512).decode("utf-8", "replace")
    return head.startswith("<?xml") and f"<testsuite name=\"{JUNIT_SUITE_PREFIX}" in head


def check_output_paths(junit: Path | None, baseline: Path | None, update_baseline: bool) -> None:
    """Before any check runs: the files the gate will write are new or edgemix's own."""
    from edgemix.fileutil import refuse_foreign_file

    if junit is not None:
        refuse_foreign_file(junit, is_junit_file, "a JUnit report", "--junit")
    if update_baseline and baseline is not None:
        refuse_foreign_file(baseline, _is_baseline, "a baseline", "--baseline")


def _is_baseline(path: Path) -> bool:
    try:
        return bool(read_baseline(path))
    except UsageError:
        return False


def write_junit(path: Path, checks: list[Check], suite: str) -> None:
    failures = sum(not c.passed for c in checks)
    lines = ['<?xml version="1.0" encoding="UTF-8"?>',
             f'<testsuite name={quoteattr(suite)} tests="{len(checks)}" failures="{failures}" errors="0">']
    for c in checks:
        lines.append(f'  <testcase classname={quoteattr(suite)} name={quoteattr(c.name)}>')
        msg = f"{c.name} = {c.value}, budget {c.budget}, baseline {c.baseline}"
        if not c.passed:
            lines.append(f'    <failure message={quoteattr(msg)}>{escape(c.detail)}</failure>')
        lines.append(f"    <system-out>{escape(msg + '; ' + c.detail)}</system-out>")
        lines.append("  </testcase>")
    lines.append("</testsuite>")
    with user_path(path, "write the JUnit report to", "--junit"):
        write_text_atomic(path, "\n".join(lines) + "\n")


def update_baseline(path: Path, report: dict) -> None:
    with user_path(path, "write the baseline to", "--baseline"):
        write_text_atomic(path, json.dumps(baseline_of(report), indent=2, default=str) + "\n")


def read_baseline(path: Path) -> dict:
    if not Path(path).is_file():
        raise UsageError(f"baseline {path} does not exist", hint="create it with --update-baseline")
    try:
        base = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"baseline {path} is not readable JSON: {e}") from None
    missing = [k for k in ("schema_version", "drift", "deployed", "latency_ms") if k not in base]
    if missing or base.get("schema_version") != 1:
        raise UsageError(f"baseline {path} is not an edgemix v1 baseline (missing {', '.join(missing) or 'version 1'})")
    return base


def read_report_or_baseline(path: str | Path) -> dict:
    """`edgemix report` shows full reports and the baselines trimmed from them alike."""
    path = Path(path)
    if path.is_file() and path.name != "report.json":
        try:
            return read_report(path)[0]
        except UsageError:
            return read_baseline(path)
    return read_report(path)[0]


def as_dicts(checks: list[Check]) -> list[dict]:
    return [asdict(c) for c in checks]

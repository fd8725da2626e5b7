"""Keep the figures a README table quotes as small JSON files under docs/results/, taken from the
build's own report.json, so that each can be regenerated and compared.

    python tools/record_result.py REPORT.json --command "edgemix build ..." [--name NAME]
    python tools/record_result.py --check docs/results/NAME.json REPORT.json [--tolerance 0.003]

The record holds the command, date, edgemix commit, host CPU, its INT8/BF16 instruction sets and the
thread count, and the figures: FP32 and INT8 top-1, agreement, evaluated images, artifact and
FP32-artifact bytes, host p50 latency of both and their ratio with the sign test's verdict, the
QAT selection where there was one, and each stage's seconds. --check compares a fresh report with a
record: accuracy figures must agree within --tolerance (default 0.003, i.e. 0.3 point: the same
weights and data give the same reference; the INT8 artifact may differ by a few images across
library versions), and the sizes within 2%. Latency is not compared: it is a property of the host
(the record names it). Exit 0 when they agree, 1 when they do not, 2 on unreadable input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def record(report: dict, command: str) -> dict:
    cmp = report.get("fp32_comparison") or {}
    prov = report["provenance"]
    machine = prov.get("machine", {})
    return {
        "name": f"{report['model']}_{report['target_alias']}_{report['precision']}",
        "command": command,
        "date": prov.get("date", "")[:10],
        "edgemix_commit": prov.get("git_commit"),
        "host": {"cpu": machine.get("cpu"), "cpus": machine.get("cpus"), "isa": machine.get("isa"),
                 "threads": (report.get("latency_ms") or {}).get("threads")},
        "model": report["model"], "target": report["target_alias"], "precision": report["precision"],
        "evaluation": report["evaluation"],
        "top1_fp32": report["reference"]["top1"], "top1_deployed": report["deployed"]["top1"],
        "agreement": report["drift"].get("agreement"),
        "artifact_bytes": report["artifact"]["bytes"], "fp32_artifact_bytes": cmp.get("fp32_bytes"),
        "p50_ms": (report.get("latency_ms") or {}).get("p50"), "fp32_p50_ms": cmp.get("fp32_p50_ms"),
        "latency_ratio": cmp.get("latency_ratio"), "int8_faster": cmp.get("int8_faster"),
        "qat_selection": (report.get("quantization") or {}).get("qat_selection"),
        # each stage's seconds as the build printed them (the whole build's: build_seconds)
        "stages_s": {s["name"]: round(s["seconds"], 1) for s in report.get("stages", [])},
        # each stage's peak resident memory of the build process, and the build's (None where unknown)
        "stages_peak_rss_mb": {s["name"]: s.get("peak_rss_mb") for s in report.get("stages", [])},
        "peak_rss_mb": report.get("peak_rss_mb"), "build_seconds": report.get("build_seconds"),
    }


def compare(old: dict, new: dict, tolerance: float) -> list[str]:
    problems = []
    for key in ("model", "target", "precision"):
        if old[key] != new[key]:
            problems.append(f"{key}: recorded {old[key]!r}, report {new[key]!r}")
    if old["evaluation"] != new["evaluation"]:
        problems.append(f"evaluation: recorded {old['evaluation']}, report {new['evaluation']}")
    for key in ("top1_fp32", "top1_deployed", "agreement"):
        if old[key] is not None and new[key] is not None and abs(old[key] - new[key]) > tolerance:
            problems.append(f"{key}: recorded {old[key]:.4f}, report {new[key]:.4f} (tolerance {tolerance})")
    for key in ("artifact_bytes", "fp32_artifact_bytes"):
        if old[key] and new[key] and abs(old[key] - new[key]) > 0.02 * old[key]:
            problems.append(f"{key}: recorded {old[key]}, report {new[key]} (tolerance 2%)")
    return problems


def _load(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        print(f"error: cannot read {path}: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report")
    ap.add_argument("--command", help="the command that produced the report (recorded verbatim)")
    ap.add_argument("--name", help="file name under docs/results/ (default: MODEL_TARGET_PRECISION)")
    ap.add_argument("--check", metavar="RECORD", help="compare REPORT with this record instead of writing")
    ap.add_argument("--tolerance", type=float, default=0.003)
    ap.add_argument("--results-dir", type=Path, default=RESULTS, help="where records go (default: docs/results)")
    a = ap.parse_args(argv)
    report = _load(a.report)
    try:
        new = record(report, a.command or "")
    except KeyError as e:
        print(f"error: {a.report} is not an edgemix build report (no {e})", file=sys.stderr)
        return 2
    if a.check:
        problems = compare(_load(a.check), new, a.tolerance)
        for p in problems:
            print(f"differs: {p}")
        print("agrees with the record" if not problems else f"{len(problems)} difference(s)")
        return 1 if problems else 0
    if not a.command:
        print("error: --command is required when recording (what regenerates the figures)", file=sys.stderr)
        return 2
    new["name"] = a.name or new["name"]
    out = a.results_dir / f"{new['name']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(new, indent=2) + "\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Reports: data first (report.json, versioned), then a Markdown rendering of the same data."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from edgemix.fileutil import write_text_atomic

SCHEMA_VERSION = 1
TRACKED_LIBRARIES = ("torch", "executorch", "torchao", "nncf", "onnx", "onnxruntime", "onnxsim", "numpy")


def library_versions() -> dict[str, str | None]:
    out = {}
    for name in TRACKED_LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        import tensorrt  # noqa: F401  (only present on Jetson / CUDA hosts)

        out["tensorrt"] = metadata.version("tensorrt")
    except Exception:
        out["tensorrt"] = None
    return out


def git_commit() -> str | None:
    """The commit of the edgemix checkout this runs from, with ``+dirty`` when tracked files differ
    from it (the figures then come from code no commit holds); None for an installed wheel (whose
    folder is not a checkout: asking git there would name whatever repository happens to enclose it)."""
    checkout = Path(__file__).resolve().parents[2]
    if not (checkout / ".git").exists() or not (checkout / "pyproject.toml").is_file():
        return None
    try:
        p = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=checkout)
        if p.returncode != 0 or not p.stdout.strip():
            return None
        d = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True, timeout=5, cwd=checkout)
        return p.stdout.strip() + ("+dirty" if d.returncode == 0 and d.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts() -> dict:
    """The host beside every figure: CPU model, the INT8/BF16 instruction sets it has (hosts differ a
    lot: torch's FP32 uses AMX where XNNPACK's INT8 does not), cores and the torch threads."""
    from edgemix.resources import device_script

    facts = {"hostname": platform.node(), "system": platform.system(), "arch": platform.machine(),
             "cpu": cpu_model(), "cpus": os.cpu_count(), "isa": device_script().isa_features(),
             "python": platform.python_version()}
    if "torch" in sys.modules:
        facts["torch_threads"] = sys.modules["torch"].get_num_threads()
    return facts


def build_metadata() -> dict:
    from edgemix import __version__

    return {"edgemix": __version__, "git_commit": git_commit(), "libraries": library_versions(),
            "machine": machine_facts(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


write_atomic = write_text_atomic


def write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _ms(x) -> str:
    return "-" if x is None else f"{x:.2f} ms"


def _qat_section(sel: dict | None) -> list[str]:
    """PTQ's and QAT's written artifacts side by side, which one ships, and QAT's loss and schedule."""
    if not sel:
        return []
    schedule = f"{sel['qat_epochs']:g} epochs"
    if sel.get("qat_lr") is not None:
        schedule += f", lr {sel['qat_lr']:g}, batch {sel['qat_batch_size']}"
    return [
        f"## QAT or PTQ ({sel['images']} images, kept **{sel['kept'].upper()}**, rule `{sel['rule']}`)",
        "",
        "| artifact | top-1 | agreement with FP32 |",
        "|---|---|---|",
        f"| PTQ | {_pct(sel['ptq']['top1'])} | {_pct(sel['ptq']['agreement'])} |",
        f"| QAT | {_pct(sel['qat']['top1'])} | {_pct(sel['qat']['agreement'])} |",
        "",
        f"QAT: {schedule}; loss: {sel['qat_loss']}.",
        "",
    ]


def render_markdown(r: dict) -> str:
    d, lat = r["drift"], r["latency_ms"]
    lines = [
        f"# edgemix build: {r['model']} -> {r['target']} ({r['precision']})",
        "",
        f"Backend **{r['backend']}**, deployed runtime **{r['deployed']['runtime']}**, "
        f"quantization: {r['quantization'].get('scheme', 'none')}.",
        "",
        "## Accuracy against the FP32 reference",
        "",
        "| metric | value |",
        "|---|---|",
        f"| samples | {d['samples']} ({r['evaluation']['data']}) |",
        f"| reference top-1 ({r['reference']['device']}) | {_pct(r['reference']['top1'])} |",
        f"| deployed top-1 | {_pct(r['deployed']['top1'])} |",
        f"| top-1 change | {d['top1_delta']:+.2f} pts (95% CI {d['top1_delta_ci95'][0]:+.2f} .. {d['top1_delta_ci95'][1]:+.2f}) |",
        f"| prediction agreement | {_pct(d['agreement'])} |",
        f"| logit cosine (mean / min) | {d['cosine_mean']:.5f} / {d['cosine_min']:.5f} |",
        f"| logit SQNR | {d['sqnr_db']:.1f} dB |",
        "",
        *_qat_section(r["quantization"].get("qat_selection")),
        f"## Host latency (batch {lat['batch']}, {lat['threads']} threads, {lat['runs']} runs after {lat['warmup']} warm-up)",
        "",
        "| p50 | p90 | p99 | mean | std |",
        "|---|---|---|---|---|",
        f"| {_ms(lat['p50'])} | {_ms(lat['p90'])} | {_ms(lat['p99'])} | {_ms(lat['mean'])} | {_ms(lat['std'])} |",
        "",
    ]
    cmp_ = r.get("fp32_comparison")
    if cmp_:
        verdict = "faster" if cmp_["int8_faster"] else "**NOT faster**"
        lines += [f"INT8 vs the FP32 artifact of the same target: p50 {_ms(cmp_['fp32_p50_ms'])} (FP32) vs "
                  f"{_ms(lat['p50'])} (INT8) = {cmp_['latency_ratio']:.2f}x, INT8 is {verdict}; size ratio "
                  f"{cmp_['size_ratio']:.2f}x.", ""]
        if cmp_.get("float_fallback"):
            lines += ["Ops left in float: " + ", ".join(f"{k} x{v}" for k, v in cmp_["float_fallback"].items()), ""]
    isa = r.get("isa_drift")
    if isa:
        lines += [f"## Drift on the phone's instruction set (native runner, {isa['images']} images)", "",
                  "| arch | CPU profile | emulated | trusted | agreement | top-1 change | cosine | SQNR | max abs vs host |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for p in isa["profiles"]:
            lines.append(f"| {p['arch']} | {p['cpu']} | {p['emulated']} | {'yes' if p['trusted'] else '**no**'} | "
                         f"{_pct(p['agreement'])} | {p['top1_delta']:+.2f} pts | {p['cosine_mean']:.5f} | "
                         f"{p['sqnr_db']:.1f} dB | {p['max_abs_vs_host']:.4g} |")
        for p in isa["profiles"]:
            if not p["trusted"]:
                lines.append(f"\n{p['arch']} -cpu {p['cpu']} is untrusted: {p['reason']}")
        lines.append("")
    lines += ["## Files", "", "| file | bytes | sha256 |", "|---|---|---|"]
    for role, f in r["artifact"]["files"].items():
        lines.append(f"| {f['name']} ({role}) | {f['bytes']:,} | `{f['sha256'][:16]}` |")
    lines += ["", "## Stages", "", "| stage | produced | seconds | peak RSS MB |", "|---|---|---|---|"]
    for s in r["stages"]:
        peak = s.get("peak_rss_mb")
        lines.append(f"| {s['name']} | {s['produced']} | {s['seconds']:.1f} | {'-' if peak is None else f'{peak:.0f}'} |")
    fb = r.get("details", {}).get("fallback")
    if fb:
        lines += ["", "## Per-layer sensitivity (drift with only this layer in INT8)", "",
                  "| layer | 1 - cosine | agreement |", "|---|---|---|"]
        lines += [f"| {row['layer']} | {row['drift']:.2e} | {_pct(row['agreement'])} |" for row in fb["ranking"]]
        lines += ["", f"Kept in FP32 to meet the budget: {', '.join(fb['keep_fp32']) or 'none'} "
                      f"(budget {'met' if fb['met'] else 'NOT met'})."]
    for key, title in (("delegation", "Delegation"), ("engine", "TensorRT engine"), ("compat", "TensorRT compatibility check")):
        if key in r.get("details", {}):
            lines += ["", f"## {title}", "", "```json", json.dumps(r["details"][key], indent=2, default=str)[:4000], "```"]
    p = r["provenance"]
    lines += ["", "## Provenance", "",
              f"fingerprint `{p['fingerprint']}`; weights sha256 `{(p['weights_sha256'] or 'random-init')[:16]}`; "
              f"calibration set sha256 `{p['calibration_sha256'][:16]}`; edgemix {p['edgemix']} "
              f"(commit {p['git_commit'] or 'unknown'}); built {p['date']} on {p['machine']['cpu']}.", ""]
    return "\n".join(lines)

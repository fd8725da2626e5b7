"""Where an ExecuTorch program's time goes, per XNNPACK operator kind, from ExecuTorch's ETDump.

    .venv/bin/python bench/etdump.py                          # s16 INT8 at batch 1 and 8, 2 threads
    .venv/bin/python bench/etdump.py --models fmnist --batches 1 --precision fp32
    .venv/bin/python bench/etdump.py --pte artifacts/fmnist_phone_int8/fmnist_phone_int8.pte

Each program is built with edgemix's ExecuTorch backend at a fixed batch (random weights where
edgemix ships none; latency does not depend on the values), run ``--runs`` times after warm-up
with ETDump on, and each operator's median is summed by kind. Per kind: ms per image, operator
count, and for the GEMMs the rate in TMAC/s of the model's Linear work (MixerSpec.macs). With two
batches the last column is per-image time at the larger batch over batch 1 (batch
scaling: a kind that is already compute-bound at batch 1 stays near 1.0x).
XNNPACK's profiler names some operators oddly: "Invalid Unary Op" is the GELU.
Writes bench/results/etdump.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from suite import _build_child  # noqa: E402


def profile_pte(pte, alias: str, precision: str, batch: int, threads: int, runs: int) -> dict:
    from edgemix.backends.executorch import profile_ops
    from edgemix.models import resolve_spec

    spec = resolve_spec(alias)
    x = np.random.default_rng(0).standard_normal((batch, spec.in_chans, spec.img_size, spec.img_size))
    prof = profile_ops(pte, x.astype(np.float32), threads, runs)
    prof.update(model=alias, precision=precision, batch=batch, gmacs_per_image=spec.macs() / 1e9)
    return prof


def print_profiles(profiles: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    first = profiles[0]
    kinds = list(first["ops"]) + [k for p in profiles[1:] for k in p["ops"] if k not in first["ops"]]
    cols = [f"b{p['batch']} ms/image" for p in profiles]
    t = Table("operator kind", "count", *cols, *(["b%d / b1" % profiles[-1]["batch"]] if len(profiles) > 1 else []),
              title=f"{first['model']} {first['precision']}: ETDump, medians per operator, summed by kind")
    for k in kinds:
        per = [p["ops"].get(k, {"ms": 0.0})["ms"] / p["batch"] for p in profiles]
        ratio = [f"{per[-1] / per[0]:.2f}x" if per[0] else "-"] if len(profiles) > 1 else []
        t.add_row(k, str(first["ops"].get(k, {}).get("count", "-")), *[f"{v:.3f}" for v in per], *ratio)
    totals = [p["total_ms"] / p["batch"] for p in profiles]
    t.add_row("whole program (Method::execute)", "", *[f"{v:.3f}" for v in totals],
              *([f"{totals[-1] / totals[0]:.2f}x"] if len(profiles) > 1 else []))
    Console(width=150).print(t)
    for p in profiles:
        gemm = sum(v["ms"] for k, v in p["ops"].items() if "GEMM" in k and ("QS8" in k or p["precision"] == "fp32"))
        if gemm:
            print(f"  batch {p['batch']}: model GEMMs {gemm / p['batch']:.2f} ms per image of "
                  f"{p['total_ms'] / p['batch']:.2f}, {p['gmacs_per_image'] * p['batch'] / gemm:.2f} TMAC/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["s16"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--precision", choices=("int8", "fp32"), default="int8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--calib-images", type=int, default=128)
    ap.add_argument("--pte", type=Path, help="profile this .pte instead: its model is --models' first, its batch "
                                            "--batches' first")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "etdump.json")
    a = ap.parse_args()
    results = []
    if a.pte is not None:  # an existing program: --models names its model, --batches its batch
        if not a.pte.is_file():
            ap.error(f"no .pte at {a.pte}")
        results.append([profile_pte(a.pte, a.models[0], a.precision, a.batches[0], a.threads, a.runs)])
    else:
        for alias in a.models:
            with tempfile.TemporaryDirectory(prefix="edgemix-etdump-") as tmp:
                results.append([])
                for b in sorted(a.batches):
                    # the suite's own build: same backend, recipe and target
                    built = _build_child((alias, "executorch", a.precision, b, a.threads, tmp, a.calib_images))
                    results[-1].append(profile_pte(built["files"]["model"], alias, a.precision, b, a.threads,
                                                   a.runs))
    for profiles in results:
        print_profiles(profiles)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"threads": a.threads, "runs": a.runs, "profiles": results}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

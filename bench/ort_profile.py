"""Where an onnxruntime session's time goes, per ONNX op type, for an INT8 (QDQ) model beside its
FP32 twin: the jetson target's host proxy, opened exactly as edgemix opens it (the device script's
``ort_session``: ORT_ENABLE_ALL, no spinning, MatMulAddFusion off for QDQ).

    .venv/bin/python bench/ort_profile.py INT8.onnx FP32.onnx [--runs 300] [--threads 2]

Both sessions run batch 1 on the same random input, ``--runs`` times after warm-up, with
onnxruntime's profiler on. For each op type of the *optimized* graph (what actually runs: fused
kernels such as QLinearConv, MatMulIntegerToFloat, QuantizeLinear left standing) the table gives
the median per-run microseconds summed over its nodes and the node count. Writes JSON with the host
CPU beside the figures when --out is given.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "edgemix" / "resources" / "device"))

from edgemix_device_runner import ort_session  # noqa: E402


def profile(path: str, threads: int, runs: int, qdq: bool) -> dict:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so_path = os.path.join(tmp, "prof")
        sess = ort_session(ort, path, threads, qdq)
        inp = sess.get_inputs()[0]
        shape = [d if isinstance(d, int) else 1 for d in inp.shape]
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        for _ in range(20):
            sess.run(None, {inp.name: x})
        # a second session, the same but with the profiler on (the option is fixed at creation)
        prof = ort_session(ort, path, threads, qdq, profile_prefix=so_path)
        for _ in range(20):
            prof.run(None, {inp.name: x})
        for _ in range(runs):
            prof.run(None, {inp.name: x})
        trace = json.loads(Path(prof.end_profiling()).read_text())
    per_run = collections.defaultdict(list)  # run index -> [(op, dur)]
    run_totals = []
    run = -1
    for ev in trace:
        if ev.get("cat") == "Session" and ev.get("name") == "model_run":
            run += 1
            run_totals.append(ev["dur"])
        elif ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time") and run >= 0:
            per_run[run].append((ev["args"]["op_name"], ev["dur"]))
    kept = sorted(per_run)[-runs:]
    by_op = collections.defaultdict(list)
    counts = collections.Counter(op for op, _ in per_run[kept[-1]]) if kept else collections.Counter()
    for r in kept:
        sums = collections.Counter()
        for op, dur in per_run[r]:
            sums[op] += dur
        for op in counts:
            by_op[op].append(sums[op])
    ops = {op: {"us": statistics.median(v), "nodes": counts[op]} for op, v in by_op.items()}
    return {"model": path, "run_us": statistics.median(run_totals[-runs:]), "ops": ops}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("int8")
    ap.add_argument("fp32")
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from edgemix.verify.report import machine_facts

    res = {"int8": profile(a.int8, a.threads, a.runs, True), "fp32": profile(a.fp32, a.threads, a.runs, False),
           "threads": a.threads, "runs": a.runs, "machine": machine_facts()}
    for name in ("int8", "fp32"):
        r = res[name]
        print(f"{name}: {r['run_us']:.0f} us per run (median), {Path(r['model']).name}")
        for op, v in sorted(r["ops"].items(), key=lambda kv: -kv[1]["us"]):
            print(f"  {op:28s} {v['us']:8.1f} us  {v['nodes']:4d} nodes")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()

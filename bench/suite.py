"""Host benchmark suite: every runtime path on the same inputs, in one run, interleaved.

    .venv/bin/python bench/suite.py                       # s16 + fmnist, batch 1 and 8
    .venv/bin/python bench/suite.py --models s16 --batches 1 --runs 20
    .venv/bin/python bench/suite.py --scale               # also b16 and l16, batch 1 (slow)
    .venv/bin/python bench/suite.py --no-full-builds      # skip the `edgemix build` timings

Paths: torch eager FP32, onnxruntime FP32, onnxruntime on the jetson QDQ ONNX, ExecuTorch FP32
.pte, ExecuTorch INT8 .pte. Each path is built with edgemix's own backends, then all paths are
timed round-robin (one run of each in turn) so that machine noise hits all alike; medians and
p90 of the timed runs after warm-up, ratios against torch eager FP32. Builds run in a child
process each so that their peak RSS is measured separately from inference.

Full builds: for each model and target, the whole `edgemix build` (reference on the 1,000-image
sample, calibration on 128 images, lowering, verification, latency vs the FP32 artifact, and for
the phone the arm64 emulation) is run twice in fresh processes with a fresh build cache: the first
run pays the one-time costs (the FP32 reference logits, the FP32 comparison artifact), the second
shows a rebuild. Stage times, totals and each build's peak RSS are reported.
Writes bench/results/suite.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# VmRSS / VmHWM of this process from /proc (ru_maxrss is not used: it survives exec, so a spawned
# child would report its parent's peak)
from edgemix.memory import status_mb

PATHS = [  # (name, backend, precision)
    ("torch eager fp32", None, "fp32"),
    ("onnxruntime fp32", "tensorrt", "fp32"),
    ("onnxruntime int8 qdq", "tensorrt", "int8"),
    ("executorch fp32", "executorch", "fp32"),
    ("executorch int8", "executorch", "int8"),
]


def _target_for(backend: str, batch: int, threads: int):
    from edgemix.config import resolve_target

    t = resolve_target("jetson" if backend == "tensorrt" else "phone")
    return t.model_copy(update={"batch_sizes": [batch], "threads": threads})


def _model(alias: str):
    from edgemix.models import load_model

    model, _ = load_model(alias, allow_random=True)
    return model


def _build_child(args) -> dict:
    """Runs in a fresh process: build one artifact, report its files, build time and peak RSS."""
    alias, backend_name, precision, batch, threads, out_dir, calib_images = args
    torch.set_num_threads(threads)
    from edgemix.backends.base import BuildJob, get_backend
    from edgemix.config import resolve_recipe
    from edgemix.data import load_dataset, stratified_indices, to_model_input

    model = _model(alias)
    recipe = resolve_recipe("default").model_copy(update={"images": calib_images})
    calib = load_dataset(recipe.data, recipe.split)
    calib = calib.subset(stratified_indices(calib.labels, recipe.images, recipe.seed))
    backend = get_backend(backend_name)
    t = time.perf_counter()
    art = backend.build(BuildJob(
        model=model, spec=model.spec, target=_target_for(backend_name, batch, threads), precision=precision,
        recipe=recipe, calib_inputs=to_model_input(calib.images, model.spec), stage_dir=Path(out_dir),
        basename=f"{alias}_{backend_name}_{precision}_b{batch}"))
    return {"files": {k: str(v) for k, v in art.files.items()}, "runtime": art.runtime,
            "batch_size": art.batch_size, "dynamic_batch": art.dynamic_batch, "quantization": art.quantization,
            "details": art.details, "build_s": time.perf_counter() - t,
            "build_peak_rss_mb": status_mb("VmHWM"),  # this child's own peak: exec started a fresh one
            "bytes": Path(art.files["model"]).stat().st_size}


def _full_build_child(args) -> dict:
    """Runs in a fresh process: one whole `edgemix build` (edgemix.pipeline.build), its report's
    stage times and this process's peak RSS."""
    alias, target, out, cache_dir, threads = args
    import os

    os.environ["EDGEMIX_CACHE_DIR"] = cache_dir
    os.environ["CI"] = "true"  # no progress bars in the log
    from edgemix import memory

    memory.own_process()  # a child of its own: each stage's peak memory, as the edgemix command reports
    from edgemix.config import build_config
    from edgemix.models import DEFAULT_WEIGHTS
    from edgemix.pipeline import build

    t = time.perf_counter()
    cfg = build_config(model=alias, target=target, precision="int8", random_weights=alias not in DEFAULT_WEIGHTS,
                       out=out, force=True, threads=threads)
    report = build(cfg)
    return {"wall_s": time.perf_counter() - t, "build_seconds": report["build_seconds"],
            "stages": {row["name"]: row["seconds"] for row in report["stages"]},
            "reference_from_cache": report["reference"].get("from_cache"),
            "fp32_from_cache": (report.get("fp32_comparison") or {}).get("fp32_from_cache"),
            "eval_images": report["evaluation"]["samples"],
            # the build's peak and each stage's (edgemix.memory resets the high-water mark per stage)
            "peak_rss_mb": report.get("peak_rss_mb") or status_mb("VmHWM"),
            "stages_peak_rss_mb": {row["name"]: row.get("peak_rss_mb") for row in report["stages"]}}


def full_builds(models, threads) -> list[dict]:
    rows = []
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="edgemix-builds-") as tmp:
        for alias in models:
            for target in ("phone", "jetson"):
                cache_dir = Path(tmp) / f"cache-{alias}-{target}"
                for run_no, label in enumerate(("first (cold cache)", "rebuild (warm cache)")):
                    out = Path(tmp) / f"{alias}_{target}_{run_no}"
                    with ctx.Pool(1) as pool:
                        r = pool.apply(_full_build_child, ((alias, target, str(out), str(cache_dir), threads),))
                    isa = r["stages"].get("isa", 0.0)
                    rows.append({"model": alias, "target": target, "run": label, **r,
                                 "seconds_without_isa": r["build_seconds"] - isa})
                    print(f"  edgemix build {alias} {target} {label}: {r['build_seconds']:.1f} s "
                          f"({r['build_seconds'] - isa:.1f} s without arm64 emulation)", flush=True)
    return rows


def _stage_names(rows: list[dict]) -> list[str]:
    """Every stage any of the builds ran, in the order they first appear."""
    names = []
    for r in rows:
        names += [n for n in r["stages"] if n not in names]
    return names


def print_builds(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    names = _stage_names(rows)
    t = Table("model", "target", "run", "total s", "w/o isa s", *names, "peak RSS MB",
              title="edgemix build, end to end (1,000 verification images, 128 calibration images)")
    for r in rows:
        t.add_row(r["model"], r["target"], r["run"], f"{r['build_seconds']:.1f}", f"{r['seconds_without_isa']:.1f}",
                  *[f"{r['stages'][n]:.1f}" if n in r["stages"] else "-" for n in names],
                  f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] else "-")
    Console(width=190).print(t)


def run(models, batches, runs, warmup, threads, calib_images, paths) -> dict:
    from edgemix.backends.base import BuiltArtifact, get_backend
    from edgemix.verify.latency import measure_interleaved, summarize

    torch.set_num_threads(threads)
    results = {"threads": threads, "runs": runs, "warmup": warmup, "calib_images": calib_images,
               "machine": __import__("edgemix.verify.report", fromlist=["machine_facts"]).machine_facts(),
               "cases": []}
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="edgemix-bench-") as tmp:
        for alias in models:
            model = _model(alias)
            for batch in batches:
                x = torch.randn(batch, model.spec.in_chans, model.spec.img_size, model.spec.img_size)
                xn = x.numpy()
                fns, info = {}, {}
                for name, backend_name, precision in paths:
                    if backend_name is None:
                        def eager(inp, m=model):
                            with torch.no_grad():
                                return m(torch.from_numpy(inp))
                        fns[name] = eager
                        info[name] = {"build_s": 0.0, "bytes": sum(p.numel() * 4 for p in model.parameters())}
                        continue
                    out_dir = Path(tmp) / f"{alias}_{batch}_{backend_name}_{precision}"
                    out_dir.mkdir()
                    with ctx.Pool(1) as pool:
                        built = pool.apply(_build_child, ((alias, backend_name, precision, batch, threads,
                                                           str(out_dir), calib_images),))
                    art = BuiltArtifact(files={k: Path(v) for k, v in built["files"].items()},
                                        runtime=built["runtime"], batch_size=built["batch_size"],
                                        dynamic_batch=built["dynamic_batch"])
                    rss0 = status_mb("VmRSS")
                    fns[name] = get_backend(backend_name).load_predictor(art, threads)
                    fns[name](xn)  # loaded and run once: the runtime's buffers are allocated
                    info[name] = {k: built[k] for k in ("build_s", "build_peak_rss_mb", "bytes")}
                    info[name]["inference_rss_mb"] = status_mb("VmRSS") - rss0 if rss0 is not None else None
                    print(f"  built {alias} b{batch} {name} in {built['build_s']:.1f} s", flush=True)
                samples = measure_interleaved(fns, xn, warmup, runs)
                eager_p50 = summarize(samples["torch eager fp32"], batch)["p50"] if "torch eager fp32" in samples else None
                ort_fp32 = summarize(samples["onnxruntime fp32"], batch)["p50"] if "onnxruntime fp32" in samples else None
                for name, s in samples.items():
                    lat = summarize(s, batch)
                    case = {"model": alias, "batch": batch, "path": name, "p50_ms": lat["p50"], "p90_ms": lat["p90"],
                            "per_image_ms": lat["p50"] / batch,
                            "ratio_vs_torch_eager": lat["p50"] / eager_p50 if eager_p50 else None,
                            "ratio_vs_ort_fp32": lat["p50"] / ort_fp32 if ort_fp32 and "onnxruntime" in name else None,
                            **info[name]}
                    results["cases"].append(case)
                results.setdefault("inference_peak_rss_mb", {})[f"{alias}_b{batch}"] = status_mb("VmHWM")
                del fns
    return results


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table("model", "batch", "path", "p50 ms", "p90 ms", "ms/image", "vs eager", "vs ORT fp32", "size MB",
              "build s", "build RSS MB", "run +RSS MB", title=f"edgemix host suite ({results['threads']} threads, "
                                                 f"{results['runs']} interleaved runs after {results['warmup']} warm-up)")
    for c in results["cases"]:
        t.add_row(c["model"], str(c["batch"]), c["path"], f"{c['p50_ms']:.2f}", f"{c['p90_ms']:.2f}",
                  f"{c['per_image_ms']:.2f}", f"{c['ratio_vs_torch_eager']:.2f}x" if c["ratio_vs_torch_eager"] else "-",
                  f"{c['ratio_vs_ort_fp32']:.2f}x" if c["ratio_vs_ort_fp32"] else "-", f"{c['bytes'] / 2**20:.1f}",
                  f"{c['build_s']:.1f}", f"{c.get('build_peak_rss_mb', 0):.0f}" if c.get("build_peak_rss_mb") else "-",
                  f"{c['inference_rss_mb']:.0f}" if c.get("inference_rss_mb") is not None else "-")
    Console(width=170).print(t)


def markdown(results: dict) -> str:
    """The committed suite JSON as the Markdown tables docs/performance.md quotes (`--markdown FILE`),
    so that every figure there can be traced to the file and the command that wrote it."""
    prov, m = results.get("provenance", {}), results["machine"]
    isa = ", ".join(m.get("isa") or []) or "none"
    lines = [f"`{prov.get('command', 'bench/suite.py')}`, {prov.get('date', '?')[:10]}, edgemix "
             f"{str(prov.get('git_commit') or '?')[:12]}; host: {m['cpu']}, {m['cpus']} cores ({isa}), "
             f"{results['threads']} threads; {results['runs']} interleaved runs after {results['warmup']} warm-up.", ""]

    def cell(c, key, fmt):
        return fmt.format(c[key]) if c.get(key) is not None else ""

    def cases_table(cases):
        out = ["| model | batch | path | p50 ms | p90 ms | ms/image | vs eager | vs ORT FP32 | size MB | build s "
               "| build RSS MB | run +RSS MB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in cases:
            out.append(f"| {c['model']} | {c['batch']} | {c['path']} | {c['p50_ms']:.2f} | {c['p90_ms']:.2f} | "
                       f"{c['per_image_ms']:.2f} | {cell(c, 'ratio_vs_torch_eager', '{:.2f}×')} | "
                       f"{cell(c, 'ratio_vs_ort_fp32', '{:.2f}×')} | {c['bytes'] / 2**20:.1f} | "
                       f"{'' if c['path'].startswith('torch') else cell(c, 'build_s', '{:.1f}')} | "
                       f"{cell(c, 'build_peak_rss_mb', '{:.0f}')} | {cell(c, 'inference_rss_mb', '{:.0f}')} |")
        return out

    lines += cases_table(results["cases"])
    if results.get("scale"):
        lines += ["", "Scale (batch 1, fewer runs):", ""] + cases_table(results["scale"])
    if results.get("full_builds"):
        rows = results["full_builds"]
        names = _stage_names(rows)
        lines += ["", "| model | target | run | total s | without arm64 emulation | " + " | ".join(names)
                  + " | peak RSS MB |", "|---" * (5 + len(names)) + "|"]
        for r in rows:
            stages = " | ".join(f"{r['stages'][n]:.1f}" if n in r["stages"] else "–" for n in names)
            lines.append(f"| {r['model']} | {r['target']} | {r['run']} | {r['build_seconds']:.1f} | "
                         f"{r['seconds_without_isa']:.1f} | {stages} | {r['peak_rss_mb'] or 0:.0f} |")
    return "\n".join(lines) + "\n"


def growth(runs: list[dict]) -> str:
    """One row per model across suite runs (`--growth JSON...`): how artifact size, build time and
    memory and host latency grow with the model, INT8 paths at batch 1, each against its FP32 peer."""
    from edgemix.models import resolve_spec

    by = {}
    for results in runs:
        for c in results["cases"] + results.get("scale", []):
            if c["batch"] == 1:
                by.setdefault(c["model"], {})[c["path"]] = c
    lines = ["| model | GMACs | INT8 artifact MB (FP32) | build s, ExecuTorch / ORT QDQ | build peak RSS GB, ExecuTorch "
             "/ ORT QDQ | ExecuTorch INT8 ms (vs eager) | ORT QDQ ms (vs ORT FP32) |", "|---|---|---|---|---|---|---|"]
    for model, p in sorted(by.items(), key=lambda kv: resolve_spec(kv[0]).macs()):
        et, ort = p["executorch int8"], p["onnxruntime int8 qdq"]
        gmacs = resolve_spec(model).macs() / 1e9
        lines.append(f"| {model} | {gmacs:.{2 if gmacs < 1 else 1}f} | {et['bytes'] / 2**20:.1f} "
                     f"({p['executorch fp32']['bytes'] / 2**20:.0f}) | {et['build_s']:.0f} / {ort['build_s']:.0f} | "
                     f"{et['build_peak_rss_mb'] / 1024:.1f} / {ort['build_peak_rss_mb'] / 1024:.1f} | "
                     f"{et['p50_ms']:.1f} ({et['ratio_vs_torch_eager']:.2f}×) | "
                     f"{ort['p50_ms']:.1f} ({ort['ratio_vs_ort_fp32']:.2f}×) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["s16", "fmnist"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-images", type=int, default=128)
    ap.add_argument("--scale", action="store_true", help="also run b16 and l16 at batch 1")
    ap.add_argument("--full-builds", action=argparse.BooleanOptionalAction, default=True,
                    help="also time whole `edgemix build` runs per model and target (cold and warm cache)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "suite.json")
    ap.add_argument("--markdown", type=Path, metavar="JSON",
                    help="print the tables of an earlier run's JSON as Markdown and exit (no measuring)")
    ap.add_argument("--growth", type=Path, nargs="+", metavar="JSON",
                    help="print one row per model across earlier runs' JSON (size, build, memory, latency) and exit")
    a = ap.parse_args()
    if a.growth:
        print(growth([json.loads(p.read_text()) for p in a.growth]), end="")
        return
    if a.markdown:
        print(markdown(json.loads(a.markdown.read_text())), end="")
        return
    from edgemix.verify.report import build_metadata

    # the date, the edgemix commit (+dirty for an uncommitted tree), the library versions and the host
    provenance = {**build_metadata(), "command": "bench/suite.py " + " ".join(sys.argv[1:])}
    results = run(a.models, a.batches, a.runs, a.warmup, a.threads, a.calib_images, PATHS)
    results["provenance"] = provenance
    if a.full_builds:
        results["full_builds"] = full_builds(a.models, a.threads)
    if a.scale:
        scale = run(["b16", "l16"], [1], max(5, a.runs // 4), 2, a.threads, 64, PATHS)
        results["scale"] = scale["cases"]
        results["scale_inference_peak_rss_mb"] = scale["inference_peak_rss_mb"]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_name(f".{a.out.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(a.out)
    print_table(results)
    if "scale" in results:
        print_table({**results, "cases": results["scale"]})
    if "full_builds" in results:
        print_builds(results["full_builds"])
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

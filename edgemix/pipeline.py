"""The stage order of `edgemix build`; the only module that knows it.

    resolve + validate -> FP32 reference -> quantize + lower (backend) -> verify the written
    artifact (drift, latency, INT8-vs-FP32) -> report -> move the folder into place

Everything is written into a staging folder beside the destination and swapped into place at
the end, so a failed build leaves the previous build untouched and no half-written artifact;
`edgemix.outdir` decides which folders a build may replace, keeps one build per folder and makes
the swap survive a kill.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgemix import cache, console, memory, outdir
from edgemix.backends.base import BuildJob, BuiltArtifact, batched_predict
from edgemix.config import ALIASES, BuildConfig, write_resolved_toml
from edgemix.context import BuildContext, BuildInputs, load_inputs, resolve, tensor_sha256
from edgemix.data import ImageSet, to_model_input
from edgemix.train import loss_name
from edgemix.verify import report as rep
from edgemix.verify.drift import drift_metrics
from edgemix.verify.latency import measure_interleaved, summarize
from edgemix.verify.reference import cached_reference_logits

def target_label(target) -> str:
    short = {v: k for k, v in ALIASES.items()}
    return short.get(target.name, target.name)


def default_out(model: str, target, precision: str, qat: bool) -> Path:
    return Path("artifacts") / f"{model}_{target_label(target)}_{precision}{'-qat' if qat else ''}"


def file_record(path: Path) -> dict:
    from edgemix.fileutil import file_sha256

    return {"name": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


class Stages:
    """Collects one line per stage: name, what it produced, wall time, size, and the build process's
    peak resident memory during the stage (Linux: the high-water mark, reset after each stage)."""

    def __init__(self):
        self.rows: list[dict] = []
        memory.reset_peak()

    def __call__(self, name: str, produced: str, seconds: float, size: int | None = None) -> None:
        self.rows.append({"name": name, "produced": produced, "seconds": round(seconds, 3), "bytes": size,
                          "peak_rss_mb": memory.peak_rss_mb()})
        memory.reset_peak()
        console.stage_line(name, produced, seconds, size)


def paired_speed_test(fast: list[float], slow: list[float]) -> dict:
    """Is the first path faster? Runs were interleaved, so round i of each saw the same machine
    state: a one-sided sign test on the paired rounds (p < 0.05) is robust to the noise of shared
    machines where a single timing or overlapping spreads are not."""
    from math import comb

    n = len(fast)
    wins = sum(f < s for f, s in zip(fast, slow))
    p_value = sum(comb(n, k) for k in range(wins, n + 1)) / 2**n
    return {"int8_faster": bool(np.median(fast) < np.median(slow) and p_value < 0.05),
            "paired_rounds": n, "int8_wins": wins, "sign_test_p": p_value}


def build(cfg: BuildConfig, module: torch.nn.Module | None = None, calib_data: ImageSet | None = None,
          eval_data: ImageSet | None = None, train_data: ImageSet | None = None) -> dict:
    """Run one build; returns its report. ``module`` (a user's model with a spec) and the ImageSets
    replace the zoo model and the named data sources of ``cfg`` when given (the Python API)."""
    if cfg.cache:
        return _build(cfg, module, calib_data, eval_data, train_data)
    with cache.disabled():  # --no-cache: no entry of any kind is read or written (runners included)
        return _build(cfg, module, calib_data, eval_data, train_data)


def _build(cfg: BuildConfig, module, calib_data, eval_data, train_data) -> dict:
    t_start = time.perf_counter()
    stages = Stages()
    ctx = resolve(cfg)  # every request the build cannot honour fails here, before any work
    out = ctx.out
    # Claimed before the model and data load: a destination that is not ours, or one another build
    # is writing, is refused at once; held until the new build is in place, so that the up-to-date
    # check and the swap see the folder no other build can be changing.
    with outdir.claim(out):
        inp = load_inputs(ctx, module, calib_data, eval_data, train_data)
        torch.set_num_threads(ctx.threads)
        if not cfg.force and (out / "report.json").is_file():
            try:
                old = json.loads((out / "report.json").read_text())
            except (OSError, ValueError):
                old = {}
            if old.get("provenance", {}).get("fingerprint") == inp.fingerprint:
                console.info(f"{out} is up to date (fingerprint {inp.fingerprint[:12]}); pass --force to rebuild")
                return old

        stage_dir = outdir.staging_path(out)
        shutil.rmtree(stage_dir, ignore_errors=True)
        stage_dir.mkdir()
        try:
            report = _build_in(stage_dir, ctx, inp, stages)
            write_resolved_toml(stage_dir / "config.resolved.toml", cfg, ctx.target, ctx.recipe)
            report["stages"] = stages.rows
            report["build_seconds"] = round(time.perf_counter() - t_start, 2)
            report["peak_rss_mb"] = memory.process_peak_rss_mb()
            report["artifact"]["dir"] = str(out)
            rep.write_json(stage_dir / "report.json", report)
            rep.write_atomic(stage_dir / "report.md", rep.render_markdown(report))
            outdir.replace(stage_dir, out)
        finally:
            shutil.rmtree(stage_dir, ignore_errors=True)
    console.stage_line("report", f"{out}/report.json, report.md, config.resolved.toml",
                       time.perf_counter() - t_start)
    return report


def isa_image_count(settings, spec, available: int) -> int:
    """Images to emulate per arm64 profile: the profile's count, capped by its GMAC budget (qemu runs
    S/16 INT8 at ~2.4 s per image here, 64 images x 2 profiles took 5 min), at least one."""
    by_budget = max(1, int(settings.isa_eval_gmacs * 1e9 // spec.macs()))
    return max(1, min(settings.isa_eval_images, available, by_budget))


def _isa_drift(ctx: BuildContext, spec, artifact, eval_inputs, ref_logits, labels, stages,
               prepared: concurrent.futures.Future | None = None) -> dict | None:
    """Drift of the written artifact on the target's other instruction sets (the phone's arm64 CPU
    profiles), on as many images as the profile's GMAC budget allows. ``prepared``: the side thread
    that readied the runners while the artifact was lowered (its seconds are named in the stage line)."""
    if not ctx.isa:
        return None
    t = time.perf_counter()
    settings = ctx.target.executorch
    n = isa_image_count(settings, spec, len(eval_inputs))
    rows = ctx.backend.isa_drift(artifact, ctx.target, eval_inputs[:n].numpy(), ref_logits[:n], labels[:n])
    summary = ", ".join(f"{r['arch']}/{r['cpu']} agreement {100 * r['agreement']:.1f}%"
                        + ("" if r["trusted"] else " (UNTRUSTED emulator)") for r in rows)
    # the side thread has ended (the build waited for it before verifying); a failure there recurred above
    ready = prepared.result() if prepared is not None and prepared.exception() is None else None
    stages("isa", f"native runner on {n} images: {summary}"
                  + (f"; runners and emulator self-tests readied beside the lowering ({ready:.1f} s)"
                     if ready is not None else ""), time.perf_counter() - t)
    return {"images": n, "image_budget_gmacs": settings.isa_eval_gmacs, "profiles": rows,
            "prepared_beside_lowering_s": None if ready is None else round(ready, 3)}


def _prepare_isa(ctx: BuildContext) -> float:
    t = time.perf_counter()
    ctx.backend.prepare_isa(ctx.target)
    return time.perf_counter() - t


def _accuracy_fallback(backend, job, artifact, eval_inputs, ref_logits, labels, threads, stages):
    t = time.perf_counter()
    x = eval_inputs.numpy()
    artifact, plan = backend.fallback(job, artifact, x,
                                      lambda pred: drift_metrics(ref_logits, batched_predict(pred, x), labels), threads)
    artifact.details["fallback"] = {k: plan[k] for k in ("keep_fp32", "met", "steps", "ranking")}
    kept = ", ".join(plan["keep_fp32"]) or "none"
    stages("fallback", f"budget {'met' if plan['met'] else 'NOT met'}; layers kept in FP32: {kept}",
           time.perf_counter() - t)
    return artifact


def _fp32_artifact(backend, model, spec, target, recipe, calib_inputs, fp32_dir: Path, cfg, model_key: str | None):
    """The FP32 artifact of the same target that an INT8 build is timed against: from the build cache
    when this model, target, backend options, example input and library versions were built before
    (it is a pure function of them), else built into ``fp32_dir`` and stored. ``model_key`` is the
    model's cache digest, None when the cache is off. Returns (artifact, cached)."""
    key = None
    if model_key is not None:
        key = cache.digest("fp32-artifact-v1", model_key, backend.name,
                           target.model_dump(mode="json"), cfg.backend_options, rep.library_versions(), calib_inputs)
        entry = cache.load_folder("fp32-artifact", key)
        if entry is not None:
            try:
                return BuiltArtifact.from_entry(entry, json.loads((entry / "entry.json").read_text())), True
            except (OSError, ValueError, KeyError, TypeError):
                pass  # unreadable entry: rebuild below and overwrite it
    fp32_dir.mkdir()
    job = BuildJob(model=model, spec=spec, target=target, precision="fp32", recipe=recipe, calib_inputs=calib_inputs,
                   stage_dir=fp32_dir, basename=f"{spec.name}_fp32", options=dict(cfg.backend_options),
                   stage=lambda *a: None)
    artifact = backend.build(job)
    if key is not None:
        cache.save_folder("fp32-artifact", key, *artifact.to_entry())
    return artifact, False


@dataclass(frozen=True)
class Reference:
    """The FP32 reference stage: the eager model's logits on the evaluation set."""

    logits: np.ndarray
    labels: np.ndarray
    device: str
    from_cache: bool


@dataclass(frozen=True)
class Timing:
    """The latency stage: the deployed artifact timed interleaved with its FP32 twin (when asked)."""

    latency: dict  # verify.latency.summarize + threads, warm-up
    comparison: dict | None  # INT8 vs the FP32 artifact: ratio, sign test, sizes, ops left in float


def _reference(ctx: BuildContext, inp: BuildInputs, model_key: str | None, stages: Stages) -> Reference:
    t = time.perf_counter()
    device = ctx.devices["reference"]
    logits, cached = cached_reference_logits(inp.model, inp.eval_set, inp.spec, device, model_key is not None,
                                             model_key)
    stages("reference", f"FP32 logits of {len(inp.eval_set)} images on {device}"
                        + (" (from the build cache)" if cached else ""), time.perf_counter() - t)
    return Reference(logits=logits, labels=inp.eval_set.labels.numpy(), device=device, from_cache=cached)


def _lower(stage_dir: Path, ctx: BuildContext, inp: BuildInputs, ref: Reference, eval_inputs: torch.Tensor,
           stages: Stages) -> BuiltArtifact:
    """Quantize and lower (the backend's stages), the accuracy fallback when asked, and the reference
    inputs/outputs every device runner verifies against."""
    from edgemix.train import qat_config

    cfg, recipe = ctx.cfg, ctx.recipe
    bundle_n = min(cfg.bundle_images, len(inp.eval_set))
    job = BuildJob(
        model=inp.model, spec=inp.spec, target=ctx.target, precision=cfg.precision, recipe=recipe,
        calib_inputs=inp.calib_inputs, stage_dir=stage_dir,
        basename=f"{inp.spec.name}_{target_label(ctx.target)}_{cfg.precision}", qat_epochs=cfg.qat_epochs,
        train_set=inp.train_set,
        train_config=dataclasses.replace(qat_config(cfg.qat_epochs or 1.0, recipe.seed), batch_size=cfg.qat_batch_size,
                                         lr=cfg.qat_lr, distill=cfg.qat_distill, distill_loss=cfg.qat_loss),
        bundle_inputs=eval_inputs[:bundle_n], bundle_outputs=torch.from_numpy(ref.logits[:bundle_n]),
        options=dict(cfg.backend_options), stage=stages, device=ctx.devices["calibration"],
    )
    artifact = ctx.backend.build(job)
    if cfg.qat_epochs and cfg.precision == "int8":
        artifact = _qat_or_ptq(stage_dir, ctx, job, artifact, eval_inputs, ref, stages)
    if cfg.fallback and cfg.precision == "int8":
        artifact = _accuracy_fallback(ctx.backend, job, artifact, eval_inputs, ref.logits, ref.labels, ctx.threads,
                                      stages)
    # Runtime-independent reference data for device runners (`edgemix bench`): inputs and the FP32
    # reference's outputs for them, so every device can report its own drift.
    ref_io = stage_dir / "reference_io.npz"
    np.savez(ref_io, inputs=job.bundle_inputs.numpy(), outputs=ref.logits[:bundle_n], labels=ref.labels[:bundle_n])
    artifact.files.setdefault("reference_io", ref_io)
    return artifact


def keep_of(ptq_agreement: float, qat_agreement: float, keep: str) -> str:
    """Which artifact a QAT build ships: QAT's, unless ``keep == "better"`` and PTQ's agrees better."""
    return "ptq" if keep == "better" and ptq_agreement > qat_agreement else "qat"


def _qat_or_ptq(stage_dir: Path, ctx: BuildContext, job, qat_artifact: BuiltArtifact, eval_inputs,
                ref: Reference, stages: Stages) -> BuiltArtifact:
    """QAT must earn its cost: the PTQ artifact from the same calibration is built too, both written
    artifacts are run on the evaluation images, and the one that agrees better with FP32 is kept
    (``--qat-keep qat`` keeps QAT's regardless). Both figures go into the report."""
    t = time.perf_counter()
    ptq_dir = stage_dir / ".ptq"
    ptq_dir.mkdir()
    ptq_artifact = ctx.backend.build(dataclasses.replace(job, qat_epochs=0.0, stage_dir=ptq_dir,
                                                         stage=lambda *a: None))
    measured = {}
    for name, art in (("ptq", ptq_artifact), ("qat", qat_artifact)):
        d = drift_metrics(ref.logits, batched_predict(ctx.backend.load_predictor(art, ctx.threads),
                                                      eval_inputs.numpy()), ref.labels)
        measured[name] = {"top1": d["deployed_top1"], "agreement": d["agreement"]}
    kept = keep_of(measured["ptq"]["agreement"], measured["qat"]["agreement"], ctx.cfg.qat_keep)
    if kept == "ptq":  # PTQ's files take the names QAT's had (the same basename): nothing of QAT's stays
        for path in qat_artifact.files.values():
            path.unlink(missing_ok=True)
        for path in ptq_dir.iterdir():
            path.replace(stage_dir / path.name)
        chosen = BuiltArtifact(files={role: stage_dir / p.name for role, p in ptq_artifact.files.items()},
                               runtime=ptq_artifact.runtime, batch_size=ptq_artifact.batch_size,
                               dynamic_batch=ptq_artifact.dynamic_batch, quantization=dict(ptq_artifact.quantization),
                               details=ptq_artifact.details)
    else:
        chosen = qat_artifact
    shutil.rmtree(ptq_dir, ignore_errors=True)
    chosen.quantization["qat_selection"] = {
        **measured, "kept": kept, "rule": ctx.cfg.qat_keep, "qat_epochs": ctx.cfg.qat_epochs,
        "qat_loss": loss_name(job.train_config), "qat_lr": job.train_config.lr,
        "qat_batch_size": job.train_config.batch_size, "images": len(ref.labels),
        "measured_on": "the written PTQ and QAT artifacts, run by their runtime on the evaluation images"}
    stages("select", f"agreement with FP32 on {len(ref.labels)} images: PTQ {100 * measured['ptq']['agreement']:.2f}%"
                     f", QAT {100 * measured['qat']['agreement']:.2f}%: kept {kept.upper()}",
           time.perf_counter() - t)
    return chosen


def _verify(ctx: BuildContext, artifact: BuiltArtifact, predictor, eval_inputs, ref: Reference,
            stages: Stages) -> dict:
    """Drift of the written artifact, run by its own runtime, against the FP32 reference."""
    t = time.perf_counter()
    drift = drift_metrics(ref.logits, batched_predict(predictor, eval_inputs.numpy()), ref.labels)
    stages("verify", f"{artifact.runtime} on {len(ref.labels)} images: top-1 {100 * drift['deployed_top1']:.2f}% "
                     f"({drift['top1_delta']:+.2f} pts), agreement {100 * drift['agreement']:.2f}%",
           time.perf_counter() - t)
    return drift


def _time(stage_dir: Path, ctx: BuildContext, inp: BuildInputs, artifact: BuiltArtifact, predictor, eval_inputs,
          model_key: str | None, stages: Stages) -> Timing:
    cfg, backend, threads = ctx.cfg, ctx.backend, ctx.threads
    t = time.perf_counter()
    x = np.ascontiguousarray(np.repeat(eval_inputs[:1].numpy(), predictor.batch_size, axis=0))
    paths = {"deployed": predictor}
    fp32_artifact = fp32_cached = None
    if cfg.compare_fp32 and cfg.precision == "int8":
        fp32_artifact, fp32_cached = _fp32_artifact(backend, inp.model, inp.spec, ctx.target, ctx.recipe,
                                                    inp.calib_inputs, stage_dir / "fp32-comparison", cfg, model_key)
        paths["fp32"] = backend.load_predictor(fp32_artifact, threads)
    samples = measure_interleaved(paths, x, cfg.latency_warmup, cfg.latency_runs, cfg.latency_seconds)
    latency = summarize(samples["deployed"], predictor.batch_size)
    latency.update(threads=threads, warmup=cfg.latency_warmup)
    comparison = None
    if fp32_artifact is not None:
        fp32_lat = summarize(samples["fp32"], predictor.batch_size)
        fp32_bytes = fp32_artifact.files["model"].stat().st_size
        comparison = {
            "fp32_p50_ms": fp32_lat["p50"], "fp32_p90_ms": fp32_lat["p90"], "fp32_noise_ms": fp32_lat["noise_ms"],
            "latency_ratio": latency["p50"] / fp32_lat["p50"],
            **paired_speed_test(samples["deployed"], samples["fp32"]),
            "fp32_bytes": fp32_bytes, "size_ratio": artifact.files["model"].stat().st_size / fp32_bytes,
            "float_fallback": artifact.details.get("float_ops", {}),
            "fp32_from_cache": fp32_cached,
        }
        shutil.rmtree(stage_dir / "fp32-comparison", ignore_errors=True)
    stages("latency", f"p50 {latency['p50']:.2f} ms, p90 {latency['p90']:.2f} ms (batch {predictor.batch_size}, "
                      f"{threads} threads, {latency['runs']} runs)"
                      + (f"; {comparison['latency_ratio']:.2f}x the FP32 artifact" if comparison else ""),
           time.perf_counter() - t)
    return Timing(latency=latency, comparison=comparison)


def _build_in(stage_dir: Path, ctx: BuildContext, inp: BuildInputs, stages: Stages) -> dict:
    """The stages, each returning its small result; the report is assembled from them.

    Beside the quantization and lowering (single-threaded Python for the most part), a side thread
    readies what the arm64 check runs with: compiling the runners when they are not cached, and the
    emulator self-tests. It waits on subprocesses, so it takes the idle core, not the lowering's.
    """
    # hashed once (S/16: 70 MB of parameters) for both cached results
    model_key = cache.model_digest(inp.model) if ctx.cfg.cache and cache.root() is not None else None
    ref = _reference(ctx, inp, model_key, stages)
    eval_inputs = to_model_input(inp.eval_set.images, inp.spec)
    # ended (waited for) before verification and timing, which nothing may run beside
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgemix-side") as side:
        # a failure here recurs, and is reported, when the isa stage runs the same steps
        prepared = side.submit(_prepare_isa, ctx) if ctx.isa else None
        artifact = _lower(stage_dir, ctx, inp, ref, eval_inputs, stages)
    predictor = ctx.backend.load_predictor(artifact, ctx.threads)
    drift = _verify(ctx, artifact, predictor, eval_inputs, ref, stages)
    timing = _time(stage_dir, ctx, inp, artifact, predictor, eval_inputs, model_key, stages)
    isa = _isa_drift(ctx, inp.spec, artifact, eval_inputs, ref.logits, ref.labels, stages, prepared)
    return assemble_report(ctx, inp, ref, artifact, drift, timing, isa)


def assemble_report(ctx: BuildContext, inp: BuildInputs, ref: Reference, artifact: BuiltArtifact, drift: dict,
                    timing: Timing, isa: dict | None) -> dict:
    files = {role: file_record(p) for role, p in artifact.files.items()}
    weights, target = inp.weights, ctx.target
    return {
        "schema_version": rep.SCHEMA_VERSION,
        "model": inp.spec.name,
        "target": target.name,
        "target_alias": target_label(target),
        "backend": ctx.backend.name,
        "precision": ctx.cfg.precision,
        "quantization": artifact.quantization,
        "artifact": {"bytes": files["model"]["bytes"], "files": files, "batch_size": artifact.batch_size,
                     "dynamic_batch": artifact.dynamic_batch},
        "evaluation": {"data": inp.eval_set.source, "samples": len(inp.eval_set)},
        "devices": ctx.devices,
        "reference": {"device": ref.device, "top1": drift["reference_top1"], "samples": len(inp.eval_set),
                      "from_cache": ref.from_cache},
        "deployed": {"runtime": artifact.runtime, "top1": drift["deployed_top1"]},
        "drift": {k: v for k, v in drift.items() if k not in ("reference_top1", "deployed_top1")},
        "latency_ms": timing.latency,
        "fp32_comparison": timing.comparison,
        "isa_drift": isa,
        "budget": target.budget.model_dump(),
        "details": artifact.details,
        "provenance": {
            "fingerprint": inp.fingerprint, "weights": weights["path"], "weights_format": weights["format"],
            "weights_sha256": weights["sha256"], "calibration_sha256": tensor_sha256(inp.calib_set.images),
            "calibration_images": len(inp.calib_set), "recipe": ctx.recipe.model_dump(), **rep.build_metadata(),
        },
    }

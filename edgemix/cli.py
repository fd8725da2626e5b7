"""The ``edgemix`` command. Thin: parse, build a config, call the library. Heavy imports are lazy
so that ``edgemix --help`` and usage errors answer at once."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from edgemix.errors import EdgemixError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compile MLP-Mixer models to INT8 edge artifacts and prove their accuracy and speed.\n\n"
                       "Exit codes: 0 ok, 1 gate failed, 2 bad usage/config/input, 3 missing toolchain, "
                       "4 device unreachable.")


def _fail(err: EdgemixError) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(err.exit_code)


def handles_errors(fn):
    """User mistakes become one clear paragraph and a documented exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EdgemixError as e:
            _fail(e)
        except OSError as e:
            if e.filename is None:  # not about a path: a bug or the system, reported as internal
                raise
            from edgemix.fileutil import path_error

            _fail(path_error(e.filename, "use", e))  # a user's path that cannot be read or written
        except KeyboardInterrupt:
            typer.echo("interrupted; nothing was written past the last completed stage", err=True)
            raise typer.Exit(130)

    return wrapper


QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress output (also under CI=true).")
VerboseOpt = typer.Option(False, "--verbose", "-v",
                          help="Also show what the libraries underneath print (warnings, log lines); "
                               "captured by default.")


def _set_quiet(q: bool) -> None:
    from edgemix import console

    console.set_quiet(q)


@app.command("models")
@handles_errors
def models_cmd(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """List every model variant of every family with its size and cost."""
    import torch

    from edgemix.models import DEFAULT_WEIGHTS, count_params, families

    rows = []
    for fam in families().values():
        for alias, spec in fam.variants.items():
            with torch.device("meta"):  # count parameters without allocating H/14's 1.7 GB
                model = fam.build(spec)
            rows.append({
                "alias": alias, "family": fam.name, "name": fam.paper_names.get(alias, alias),
                "summary": spec.summary(), "image": f"{spec.img_size}x{spec.img_size}x{spec.in_chans}",
                "classes": spec.num_classes, "params_m": round(count_params(model) / 1e6, 2),
                "gmacs": round(spec.macs() / 1e9, 3),
                "shipped_weights": alias in DEFAULT_WEIGHTS and DEFAULT_WEIGHTS[alias].is_file(),
            })
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table("alias", "family", "model", "configuration", "input", "classes", "params (M)", "GMACs/img", "weights")
    for r in rows:
        t.add_row(r["alias"], r["family"], r["name"], r["summary"], r["image"], str(r["classes"]),
                  f"{r['params_m']:.2f}", f"{r['gmacs']:.3f}", "shipped" if r["shipped_weights"] else "--weights")
    Console(width=170).print(t)


@app.command("targets")
@handles_errors
def targets_cmd(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """List the device profiles (shipped, and those in $EDGEMIX_TARGETS_PATH) and their aliases."""
    from edgemix.config import ALIASES, load_targets

    targets = load_targets()
    if as_json:
        typer.echo(json.dumps({n: t.model_dump(mode="json") for n, t in targets.items()}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    alias_of = {}
    for a, n in ALIASES.items():
        alias_of.setdefault(n, []).append(a)
    t = Table("target", "aliases", "backend", "precisions", "batch", "max top-1 drop", "min agreement",
              "latency budget", "runner")
    for name, p in sorted(targets.items()):
        t.add_row(name, ", ".join(alias_of.get(name, [])), p.backend, ", ".join(p.precisions),
                  ", ".join(map(str, p.batch_sizes)), f"{p.budget.max_top1_drop:.2f} pts",
                  f"{p.budget.min_agreement:.3f}", f"{p.budget.max_latency_ratio:.2f}x", p.runner.kind)
    Console(width=160).print(t)


@app.command("train")
@handles_errors
def train_cmd(
    model: str = typer.Option("fmnist", "--model", "-m", help="Model alias (see `edgemix models`)."),
    data: str = typer.Option("fashion-mnist", help="Training data: fashion-mnist, sample, or a folder."),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="Evaluation data (default: test split of --data)."),
    out: Path = typer.Option(Path("runs/train"), "--out", "-o", help="Output folder (last.pt, model.pt)."),
    epochs: float = typer.Option(12.0, help="Epochs (fractions allowed)."),
    batch_size: int = typer.Option(128, "--batch-size"),
    lr: float = typer.Option(2e-3),
    seed: int = typer.Option(0),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="Random 2-pixel shifts and flips."),
    label_smoothing: float = typer.Option(0.1, "--label-smoothing"),
    weight_decay: float = typer.Option(0.05, "--weight-decay"),
    warmup_epochs: float = typer.Option(0.5, "--warmup-epochs"),
    limit: Optional[int] = typer.Option(None, help="Use a stratified subset of this many training images."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Start from these weights (fine-tuning)."),
    reset_head: bool = typer.Option(False, "--reset-head", help="Drop a head with a different class count."),
    resume: Optional[Path] = typer.Option(None, help="Resume from a run's last.pt."),
    image_size: Optional[int] = typer.Option(None, "--image-size"),
    num_classes: Optional[int] = typer.Option(None, "--num-classes"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
    quiet: bool = QuietOpt,
):
    """Train a Mixer in FP32 (single process, or under torchrun with DDP)."""
    _set_quiet(quiet)
    from edgemix import console
    from edgemix.data import check_labels, load_dataset, stratified_indices
    from edgemix.errors import UsageError
    from edgemix.models import build_model, resolve_spec
    from edgemix.models.checkpoints import load_weights
    from edgemix.train import TrainConfig, check_run_folder, seed_everything, train

    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, threads=threads, augment=augment,
                      label_smoothing=label_smoothing, weight_decay=weight_decay, warmup_epochs=warmup_epochs)
    cfg.validate()
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be >= 1, got {limit}", hint="leave --limit out to train on every image")
    check_run_folder(out)
    spec = resolve_spec(model, image_size, num_classes)
    train_set = load_dataset(data, "train")
    if limit:
        train_set = train_set.subset(stratified_indices(train_set.labels, limit, seed))
    eval_set = load_dataset(eval_data or data, "test")
    classes = len(train_set.classes)
    if classes != spec.num_classes and num_classes is None:
        spec = spec.with_overrides(num_classes=classes)
    check_labels(train_set, spec.num_classes, data)
    check_labels(eval_set, spec.num_classes, eval_data or data)
    seed_everything(seed)  # the initial weights too: the same command gives the same run
    net = build_model(spec)
    if weights is not None and resume is None:
        load_weights(net, weights, reset_head=reset_head)
    console.info(f"training {spec.name} on {train_set.source} ({len(train_set)} images), "
                 f"evaluating on {eval_set.source} ({len(eval_set)} images) -> {out}")
    result = train(net, spec, train_set, eval_set, cfg, out, resume=resume,
                   source_meta={"train": train_set.source, "train_images": len(train_set),
                                "eval": eval_set.source, "eval_images": len(eval_set)})
    if result["final_top1"] is not None:
        console.info(f"done: top-1 {100 * result['final_top1']:.2f}% on {eval_set.source} in "
                     f"{result['wall_s']:.0f} s on {result['device']}; weights: {out / 'model.pt'}")


@app.command("eval")
@handles_errors
def eval_cmd(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model alias (see `edgemix models`; default: what --weights holds, else fmnist)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Checkpoint (default: the shipped one)."),
    data: str = typer.Option("sample", help="Evaluation data: sample (shipped), fashion-mnist, or a folder."),
    split: str = typer.Option("test", help="train or test (IDX data sets)."),
    limit: Optional[int] = typer.Option(None, help="Evaluate a stratified subset of this many images."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size",
                                             help="Images per forward pass (default: 8 on the CPU, 250 on CUDA)."),
    image_size: Optional[int] = typer.Option(None, "--image-size"),
    num_classes: Optional[int] = typer.Option(None, "--num-classes"),
    save_logits: Optional[Path] = typer.Option(None, "--save-logits", help="Write reference logits (.npz)."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cuda or cpu."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable results."),
    quiet: bool = QuietOpt,
):
    """Evaluate the FP32 reference: top-1, per-class accuracy, reference logits."""
    _set_quiet(quiet or as_json)
    from edgemix import api
    from edgemix.verify.reference import check_reference_path, save_reference

    if split not in ("train", "test"):
        from edgemix.errors import unknown_choice

        raise unknown_choice("split", split, ["train", "test"])
    if save_logits is not None:
        check_reference_path(save_logits)  # refuse someone else's file before the model runs
    evaluated = api.evaluate(model, data, weights=weights, split=split, limit=limit, batch_size=batch_size,
                             image_size=image_size, num_classes=num_classes, device=device)
    result, logits = evaluated.result, evaluated.logits
    if save_logits is not None:
        save_reference(save_logits, result, logits)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    c = Console(width=120)
    c.print(f"{result['model']} on {result['data']} ({result['samples']} images, {result['device']}): "
            f"top-1 [bold]{100 * result['top1']:.2f}%[/bold]")
    t = Table("class", "images", "top-1")
    for row in result["per_class"]:
        t.add_row(row["class"], str(row["samples"]), f"{100 * row['top1']:.2f}%")
    c.print(t)
    if save_logits is not None:
        c.print(f"reference logits: {save_logits}")


@app.command("build")
@handles_errors
def build_cmd(
    target: str = typer.Option(..., "--target", "-t", help="Device profile or alias (see `edgemix targets`)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model alias (see `edgemix models`; default: what --weights holds, else fmnist)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Checkpoint (default: the shipped one)."),
    precision: Optional[str] = typer.Option(None, help="int8, fp32 or fp16 (default: the target's)."),
    calib: str = typer.Option("default", help="Calibration recipe: a shipped name (default, fast64, histogram), one in "
                                                  "$EDGEMIX_CALIB_PATH, or a .toml path."),
    qat_epochs: float = typer.Option(0.0, "--qat-epochs", help="Quantization-aware fine-tuning epochs (0 = PTQ)."),
    train_data: Optional[str] = typer.Option(None, "--train-data",
                                             help="QAT training data (default: fashion-mnist if installed, else sample)."),
    qat_lr: float = typer.Option(3e-5, "--qat-lr"),
    qat_keep: str = typer.Option("better", "--qat-keep",
                                 help="better: keep PTQ's model when it agrees better with FP32 than QAT's; "
                                      "qat: always QAT's."),
    qat_distill: float = typer.Option(1.0, "--qat-distill",
                                      help="QAT loss: weight of distillation towards the FP32 model's logits "
                                           "(1: its outputs only, 0: the labels only, between: a blend)."),
    qat_loss: str = typer.Option("mse", "--qat-loss",
                                 help="QAT distillation term: mse (the FP32 logits themselves) or kl (soft targets)."),
    eval_data: str = typer.Option("sample", "--eval-data", help="Verification data: sample, fashion-mnist, or a folder."),
    eval_limit: Optional[int] = typer.Option(None, "--eval-limit", help="Verify on a stratified subset of this size."),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="Artifact folder (default: artifacts/{model}_{target}_{precision})."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for host verification (default: the target's)."),
    latency_runs: int = typer.Option(30, "--latency-runs", help="Timed runs after warm-up (at least)."),
    latency_seconds: float = typer.Option(2.0, "--latency-seconds",
                                          help="Keep timing past --latency-runs until this many seconds have passed."),
    image_size: Optional[int] = typer.Option(None, "--image-size"),
    num_classes: Optional[int] = typer.Option(None, "--num-classes"),
    reset_head: bool = typer.Option(False, "--reset-head", help="Drop a checkpoint head with another class count."),
    random_weights: bool = typer.Option(False, "--random-weights",
                                        help="Build a model without trained weights (latency/size work only)."),
    compare_fp32: bool = typer.Option(True, "--compare-fp32/--no-compare-fp32",
                                      help="Also build the FP32 artifact and check that INT8 is faster."),
    isa_check: Optional[bool] = typer.Option(None, "--isa-check/--no-isa-check",
                                   help="Phone targets: also verify on arm64 kernels under qemu (the profile's CPUs)."),
    fallback: bool = typer.Option(False, "--fallback",
                                  help="Jetson: keep the most drift-sensitive layers in FP32 until the budget is met."),
    backend_option: list[str] = typer.Option([], "--backend-option",
                                             help="KEY=VALUE for the backend (e.g. decompose_layernorm=true)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if the fingerprint is unchanged."),
    cache: bool = typer.Option(True, "--cache/--no-cache",
                               help="Reuse FP32 reference logits and the FP32 comparison artifact from "
                                    "$EDGEMIX_CACHE_DIR (default ~/.cache/edgemix), keyed by content."),
    device: str = typer.Option("auto", "--device", help="Where the FP32 work runs (reference, calibration, "
                                                        "QAT): auto (CUDA when present), cuda or cpu. The "
                                                        "artifact is always verified on the host CPU."),
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
):
    """Quantize, lower and verify a model for a target; writes artifacts/{model}_{target}_{precision}/."""
    from edgemix import api
    from edgemix.errors import UsageError

    options = {}
    for item in backend_option:
        if "=" not in item:
            raise UsageError(f"--backend-option '{item}' is not KEY=VALUE")
        key, value = item.split("=", 1)
        options[key.strip()] = value.strip()
    result = api.build(
        model, target, weights=weights, precision=precision, calib=calib, eval_data=eval_data,
        train_data=train_data, out=out, quiet=quiet, verbose=verbose, backend_options=options, fallback=fallback,
        random_weights=random_weights, image_size=image_size, num_classes=num_classes, reset_head=reset_head,
        qat_epochs=qat_epochs, qat_lr=qat_lr, qat_distill=qat_distill, qat_loss=qat_loss, qat_keep=qat_keep, eval_limit=eval_limit,
        threads=threads, latency_runs=latency_runs, latency_seconds=latency_seconds, compare_fp32=compare_fp32, isa_check=isa_check, force=force, cache=cache,
        device=device)
    report, d = result.report, result.drift
    typer.echo(f"{report['model']} -> {report['target']} {report['precision']}: top-1 "
               f"{100 * d.reference_top1:.2f}% (FP32) -> {100 * d.deployed_top1:.2f}% "
               f"({d.top1_delta:+.2f} pts, {d.samples} images), agreement {100 * d.agreement:.2f}%, "
               f"p50 {result.latency.p50_ms:.2f} ms; {result.out}")


@app.command("gate")
@handles_errors
def gate_cmd(
    artifact: Path = typer.Argument(..., help="Artifact folder (or its report.json)."),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="Baseline JSON to compare with."),
    max_top1_drop: Optional[float] = typer.Option(None, "--max-top1-drop", help="Points (default: the target's)."),
    min_agreement: Optional[float] = typer.Option(None, "--min-agreement", help="0..1 (default: the target's)."),
    min_cosine: Optional[float] = typer.Option(None, "--min-cosine", help="0..1 (default: the target's)."),
    max_latency_ratio: Optional[float] = typer.Option(None, "--max-latency-ratio",
                                                      help="p50 / baseline p50 (default: the target's)."),
    latency_basis: str = typer.Option(
        "auto", "--latency-basis",
        help="What --baseline latency compares: fp32 = the INT8/FP32 p50 ratio timed in each run (immune to "
             "a slower machine), ms = absolute p50, auto = fp32 when both have an FP32 comparison."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Write JUnit XML, one test case per check."),
    update_baseline: bool = typer.Option(False, "--update-baseline",
                                         help="Rewrite --baseline from this report (atomically) after checking."),
):
    """Exit 0 when every check passes, 1 when any fails, 2 for usage errors."""
    from edgemix import api
    from edgemix.errors import GateFailed

    result = api.gate(artifact, baseline, max_top1_drop=max_top1_drop, min_agreement=min_agreement,
                      min_cosine=min_cosine, max_latency_ratio=max_latency_ratio, latency_basis=latency_basis,
                      junit=junit, update_baseline=update_baseline)
    for c in result.checks:
        status = "PASS" if c.passed else "FAIL"
        base_txt = f", baseline {c.baseline}" if c.baseline is not None else ""
        typer.echo(f"{status}  {c.name}: {c.value} (budget {c.budget}{base_txt}) - {c.detail}")
    if update_baseline:
        typer.echo(f"baseline written: {baseline}")
    if result.failed:
        raise GateFailed(f"gate failed for {result.report_file}: {len(result.failed)} of {len(result.checks)} checks "
                         f"failed ({', '.join(c.name for c in result.failed)})")
    typer.echo(f"gate passed: {len(result.checks)} checks")


@app.command("report")
@handles_errors
def report_cmd(
    a: Path = typer.Argument(..., help="Artifact folder or report.json."),
    b: Optional[Path] = typer.Argument(None, help="A second build to show side by side."),
    as_json: bool = typer.Option(False, "--json", help="Print the report(s) as JSON."),
):
    """Print one build, or two side by side (PTQ vs QAT, phone vs jetson, today vs baseline)."""
    from edgemix.verify.compare import comparison_rows
    from edgemix.verify.gate import read_report_or_baseline

    reports = [read_report_or_baseline(a)] + ([read_report_or_baseline(b)] if b is not None else [])
    if as_json:
        typer.echo(json.dumps(reports if b is not None else reports[0], indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    headers, rows = comparison_rows(reports, [str(a)] + ([str(b)] if b is not None else []))
    t = Table(*headers)
    for r in rows:
        t.add_row(*r)
    Console(width=160).print(t)


@app.command("bench")
@handles_errors
def bench_cmd(
    artifact: Optional[Path] = typer.Argument(None, help="Artifact folder (default: artifacts/{model}_{target}_{precision})."),
    target: str = typer.Option(..., "--target", "-t", help="jetson (ssh), phone (adb), host (this machine) or a profile."),
    host: Optional[str] = typer.Option(None, "--host", help="ssh targets: USER@HOST of the device."),
    port: int = typer.Option(22, "--port", help="ssh port."),
    identity: Optional[Path] = typer.Option(None, "--identity", "-i", help="ssh private key (default: ssh's own choice)."),
    python: Optional[str] = typer.Option(None, "--python", help="Interpreter that runs the device script (ssh default: "
                                                                "python3 on the device; host: this one)."),
    known_hosts: Optional[Path] = typer.Option(None, "--known-hosts",
                                               help="known_hosts file for device keys (default: ~/.config/edgemix/known_hosts)."),
    serial: Optional[str] = typer.Option(None, "--serial", "-s", help="adb serial (default: the only device attached)."),
    runner_path: Optional[Path] = typer.Option(None, "--runner-path",
                                               help="adb targets: ExecuTorch's executor_runner built for the phone."),
    model: str = typer.Option("fmnist", "--model", "-m", help="Names the default artifact folder (with --precision)."),
    precision: Optional[str] = typer.Option(None, help="Names the default artifact folder (default: the target's)."),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Warm-up runs (default: the target's runner.warmup)."),
    iterations: Optional[int] = typer.Option(None, "--iterations", "-n",
                                             help="Timed runs per batch size (default: the target's runner.iterations)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads on the device (default: the target's)."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Seconds per remote step (default: runner.timeout_s)."),
    remote_dir: Optional[str] = typer.Option(None, "--remote-dir", help="Working folder on the device (default: the target's)."),
    merge: bool = typer.Option(True, "--merge/--no-merge", help="Write the result into report.json under 'bench'."),
    rebuild_engine: bool = typer.Option(False, "--rebuild-engine",
                                        help="TensorRT: rebuild a cached engine whose provenance (TensorRT, GPU, "
                                             "flags, ONNX) differs from this run instead of refusing it."),
    as_json: bool = typer.Option(False, "--json", help="Print the BenchResult as JSON instead of a table."),
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
):
    """Run a built artifact on the device: latency per batch size and on-device drift, merged into report.json."""
    _set_quiet(quiet)
    from edgemix.config import resolve_target
    from edgemix import api
    from edgemix.runners import render

    if artifact is None:
        from edgemix.models import resolve_spec
        from edgemix.pipeline import default_out

        profile = resolve_target(target)
        artifact = default_out(resolve_spec(model).name, profile, precision or profile.default_precision, False)
    from edgemix.console import capture_noise

    with capture_noise(verbose):
        result = api.bench(artifact, target, host=host, port=port, identity=identity, python=python,
                       known_hosts=known_hosts, serial=serial, runner_path=runner_path, warmup=warmup,
                       iterations=iterations, threads=threads, timeout_s=timeout, remote_dir=remote_dir, merge=merge,
                       rebuild_engine=rebuild_engine)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2, default=str))
        return
    if not quiet:
        render(result)
    lat, d = result.latency_ms, result.drift
    typer.echo(f"{result.endpoint}: p50 {lat['p50']:.3f} ms, p90 {lat['p90']:.3f} ms (batch {lat['batch']}, "
               f"{lat['runs']} runs)" + (f", agreement {100 * d['agreement']:.1f}% on {d['samples']} reference images"
                                         if d else "") + (f"; merged into {artifact}/report.json" if merge else ""))


EXIT_INTERNAL = 70  # EX_SOFTWARE: a bug in edgemix, never confused with 1 (gate failed)


def main() -> None:
    from edgemix import memory

    memory.own_process()  # the CLI's process is edgemix's: each build stage reports its own peak memory
    try:
        app()
    except EdgemixError as e:  # raised outside a command (should not happen, but never a traceback)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except Exception:
        import traceback

        traceback.print_exc()
        print("edgemix: internal error (a bug, please report it with the traceback above)", file=sys.stderr)
        sys.exit(EXIT_INTERNAL)


if __name__ == "__main__":
    main()


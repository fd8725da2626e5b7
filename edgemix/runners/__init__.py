"""Device runners for `edgemix bench`: one protocol (protocol.py), three transports.

    ssh   (Jetson, any Linux device)  edgemix/runners/ssh.py    runs edgemix/resources/device/edgemix_device_runner.py
    adb   (Android phone)             edgemix/runners/adb.py    runs ExecuTorch's executor_runner
    local (this host)                 edgemix/runners/local.py  runs edgemix/resources/device/edgemix_device_runner.py

`bench()` picks the transport from the target profile's ``runner.kind``, runs the protocol and
merges the BenchResult into the artifact's report.json under ``bench``. Imports are light: the
CLI imports this module only when `edgemix bench` runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from edgemix.errors import UsageError
from edgemix.runners.protocol import Artifact, BenchResult, Settings, run_protocol

__all__ = ["bench", "merge_into_report", "render", "settings_for", "Artifact", "BenchResult", "Settings"]


def settings_for(profile, art: Artifact, warmup=None, iterations=None, threads=None, timeout_s=None,
                 remote_dir=None) -> Settings:
    """The target profile's runner defaults, overridden by what the user passed."""
    r, trt = profile.runner, profile.tensorrt
    for name, value, low in (("--warmup", warmup, 0), ("--iterations", iterations, 1), ("--threads", threads, 1)):
        if value is not None and value < low:
            raise UsageError(f"{name} must be at least {low}, got {value}")
    if timeout_s is not None and timeout_s <= 0:
        raise UsageError(f"--timeout must be positive, got {timeout_s}")
    return Settings(
        warmup=r.warmup if warmup is None else warmup, iterations=r.iterations if iterations is None else iterations,
        batch_sizes=list(profile.batch_sizes), threads=threads or profile.threads,
        timeout_s=float(timeout_s or r.timeout_s), remote_dir=(remote_dir or r.remote_dir).rstrip("/"),
        precision=art.report.get("precision", "int8"), workspace_mb=trt.workspace_mb if trt else 1024,
        fp16_fallback=trt.fp16_fallback if trt else True,
    )


def bench(target: str, artifact: Path, *, host: str | None = None, port: int = 22, identity: Path | None = None,
          python: str | None = None, known_hosts: Path | None = None, ssh_config: str | None = None, ssh: str = "ssh",
          serial: str | None = None, runner_path: Path | None = None, adb: str = "adb",
          warmup: int | None = None, iterations: int | None = None, threads: int | None = None,
          timeout_s: float | None = None, remote_dir: str | None = None, merge: bool = True,
          rebuild_engine: bool = False) -> BenchResult:
    from edgemix.config import resolve_target

    profile = resolve_target(target)
    art = Artifact.load(artifact)
    settings = settings_for(profile, art, warmup, iterations, threads, timeout_s, remote_dir)
    settings.rebuild_engine = rebuild_engine
    kind = profile.runner.kind
    if kind != "ssh" and (host or identity):
        raise UsageError(f"--host/--identity are for ssh targets; target {profile.name} runs over {kind}")
    if kind != "adb" and (serial or runner_path):
        raise UsageError(f"--serial/--runner-path are for adb targets; target {profile.name} runs over {kind}")
    if kind == "ssh":
        if not host:
            raise UsageError(f"target {profile.name} is benchmarked over ssh and needs --host USER@HOST")
        from edgemix.runners.ssh import SshRunner, check_destination

        check_destination(host, port)

        runner = SshRunner(host, port=port, identity=identity, python=python or "python3", known_hosts=known_hosts,
                           remote_dir=settings.remote_dir, ssh_config=ssh_config, ssh=ssh, timeout_s=settings.timeout_s)
    elif kind == "adb":
        from edgemix.runners.adb import AdbRunner

        if runner_path is None:
            raise UsageError(f"target {profile.name} runs ExecuTorch's executor_runner over adb and needs "
                             "--runner-path to one built for the phone",
                             hint="build it with ExecuTorch's android-arm64-v8a CMake preset "
                                  "(-DEXECUTORCH_BUILD_EXECUTOR_RUNNER=ON -DEXECUTORCH_BUILD_XNNPACK=ON)")
        runner = AdbRunner(runner_path, serial=serial, adb=adb, timeout_s=settings.timeout_s)
    else:
        from edgemix.runners.local import LocalRunner

        runner = LocalRunner(python=python)
    result = run_protocol(runner, art, settings, profile.name)
    if kind != "local" and art.report.get("backend") != profile.backend:  # the host runs either kind
        result.warnings.append(f"the artifact was built for backend {art.report.get('backend')} "
                               f"(target {art.report.get('target')}), not {profile.backend} ({profile.name})")
    if merge:
        merge_into_report(art.folder, result)
    return result


def merge_into_report(folder: Path, result: BenchResult) -> Path:
    """Put the result under ``bench`` in report.json, written to a temporary name and renamed. When
    report.json cannot be written (a read-only artifact folder), the measurement is not lost: it is
    saved beside the working folder (or in the temp folder) and the error says where."""
    from edgemix.verify.report import write_json

    path = Path(folder) / "report.json"
    try:
        report = json.loads(path.read_text())  # re-read: keep whatever changed since the artifact was loaded
        report["bench"] = result.to_dict()
        write_json(path, report)
        return path
    except OSError as e:
        saved = save_elsewhere(result)
        raise UsageError(f"cannot merge the bench results into {path}: {e.strerror or e}; the measured results "
                         f"were saved to {saved}",
                         hint="make the artifact folder writable and merge them by hand, or pass --no-merge") from None


def save_elsewhere(result: BenchResult) -> Path:
    """Write a BenchResult to a new file in the working folder, or the temp folder if that fails."""
    import tempfile
    import time

    name = f"edgemix-bench-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
    text = json.dumps(result.to_dict(), indent=2, default=str) + "\n"
    for folder in (Path.cwd(), Path(tempfile.gettempdir())):
        try:
            with open(folder / name, "x") as f:  # "x": never replaces an existing file
                f.write(text)
            return folder / name
        except OSError:
            continue
    raise UsageError("cannot write the bench results anywhere (working folder and temp folder refused)")


def _how(copy: dict) -> str:
    if copy["in_place"] or copy["skipped"]:
        return "in place" if copy["in_place"] else "already on the device"
    how = f"resumed at {copy['resumed_from']:,} B" if copy["resumed_from"] else "copied"
    return how + (", restarted after a checksum mismatch" if copy["restarted"] else "")


def _ms(x) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.2f}"


def render(result: BenchResult, console=None) -> None:
    """The readable table: latency per batch size, then drift, device and copy in one line each."""
    from rich.console import Console
    from rich.table import Table

    c = console or Console(width=140)
    rt = result.runtime
    a = result.artifact
    t = Table("batch", "p50 ms", "p90 ms", "p99 ms", "mean ms", "std ms", "img/s", "runs",
              title=f"{a['model_name']} {a['precision']} on {result.endpoint} ({result.runner}, "
                    f"{rt.get('name')} {rt.get('version', '')}, {result.settings['threads']} threads)")
    for b in result.batches:
        t.add_row(str(b["batch"]), _ms(b["p50"]), _ms(b["p90"]), _ms(b["p99"]), _ms(b["mean"]), _ms(b["std"]),
                  f"{b['throughput_ips']:.1f}", f"{b['runs']} (+{b['warmup']} warm-up)")
    c.print(t)
    d = result.drift
    if d:
        c.print(f"on-device drift vs FP32 reference ({d['samples']} images): agreement {100 * d['agreement']:.1f}%, "
                f"cosine mean {d['cosine_mean']:.6f} / min {d['cosine_min']:.6f}, max |error| "
                f"{d['max_abs_error']:.3g}, SQNR {d['sqnr_db']:.1f} dB, top-1 change {d['top1_delta']:+.2f} pts")
    dev = result.device
    extra = {k: dev[k] for k in ("model", "soc", "android", "abi", "tensorrt", "gpu") if dev.get(k)}
    if dev.get("jetson"):
        extra.update({k: v for k, v in dev["jetson"].items() if k in ("l4t", "jetpack", "power_mode") and v})
    c.print(f"device: {dev.get('cpu', '?')} ({dev.get('cpus', '?')} cores, {dev.get('arch', '?')})"
            + "".join(f", {k} {v}" for k, v in extra.items()))
    if result.prepare.get("engine"):
        e = result.prepare
        c.print(f"engine: {e['engine']} ({'cached' if e.get('cached') else 'built in %s s' % e.get('build_s')})")
    c.print("files: " + ", ".join(f"{x['name']} ({_how(x)})" for x in result.copy) + f"; total {result.wall_s:.1f} s")
    for w in result.warnings:
        c.print(f"[yellow]warning:[/yellow] {w}")

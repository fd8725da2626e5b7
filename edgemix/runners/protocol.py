"""The one benchmark protocol every device runner follows, and the BenchResult it produces.

    check the device -> copy the artifact (checksummed, resumable, temp name then rename)
    -> prepare + run W warm-up and N timed iterations per batch size -> run the reference inputs
    -> BenchResult (latency per batch, on-device drift against the FP32 reference, device facts)

A runner (ssh, adb, local) only supplies transport primitives and one `execute` step; the order,
the copy algorithm and the statistics live here, so every device is measured the same way. The
statistics are computed on the host with the same functions `edgemix build` uses (`summarize`,
`drift_metrics`) from the raw per-run samples and outputs the device returns.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edgemix import resources
from edgemix.errors import DeviceError, UsageError
from edgemix.fileutil import file_sha256

DEVICE_SCRIPT = resources.path("device", "edgemix_device_runner.py")
RESULT_MARK = "EDGEMIX_BENCH_RESULT "
ERROR_MARK = "EDGEMIX_BENCH_ERROR "
SCHEMA_VERSION = 1


sha256_file = file_sha256


@dataclass
class Artifact:
    """An artifact folder written by `edgemix build`, its files checked against report.json."""

    folder: Path
    report: dict
    paths: dict[str, Path]  # role -> file ("model", "reference_io", ...)
    sha256: dict[str, str]

    @classmethod
    def load(cls, folder: Path | str) -> "Artifact":
        folder = Path(folder)
        if folder.name == "report.json":
            folder = folder.parent
        report_file = folder / "report.json"
        if not report_file.is_file():
            raise UsageError(f"'{folder}' has no report.json, so it is not an artifact folder",
                             hint="run `edgemix build` first, or pass the folder it wrote")
        try:
            report = json.loads(report_file.read_text())
        except ValueError as e:
            raise UsageError(f"{report_file} is not valid JSON: {e}") from None
        files = report.get("artifact", {}).get("files", {})
        if "model" not in files:
            raise UsageError(f"{report_file} lists no model file under artifact.files")
        paths, shas = {}, {}
        for role in ("model", "reference_io"):
            if role not in files:
                continue
            rec = files[role]
            path = folder / rec["name"]
            if not path.is_file():
                raise UsageError(f"{path} ({role}) is listed in report.json but missing; rebuild the artifact")
            # A file that changed after the build would be benchmarked under the build's name.
            got = sha256_file(path)
            if got != rec["sha256"]:
                raise UsageError(f"{path} does not match report.json (sha256 {got[:12]}... vs {rec['sha256'][:12]}...): "
                                 "it changed after the build", hint="rebuild the artifact with `edgemix build --force`")
            paths[role], shas[role] = path, got
        return cls(folder, report, paths, shas)

    @property
    def model(self) -> Path:
        return self.paths["model"]

    @property
    def batch_size(self) -> int:
        return int(self.report.get("artifact", {}).get("batch_size", 1))

    @property
    def dynamic_batch(self) -> bool:
        return bool(self.report.get("artifact", {}).get("dynamic_batch", False))

    def batch_sizes(self, wanted: list[int]) -> list[int]:
        """The export batch first (it is what `latency_ms` reports), then the others the artifact can run."""
        if not self.dynamic_batch:
            return [self.batch_size]
        return list(dict.fromkeys([self.batch_size, *wanted]))

    def reference(self) -> dict | None:
        if "reference_io" not in self.paths:
            return None
        with np.load(self.paths["reference_io"]) as z:
            return {k: z[k] for k in z.files}

    def input_meta(self) -> dict:
        """Input name and per-sample shape of an ONNX artifact (trtexec needs them for shapes)."""
        if self.model.suffix != ".onnx":
            return {}
        try:
            import onnx
        except ImportError:
            return {}
        graph = onnx.load(str(self.model), load_external_data=False).graph
        inits = {i.name for i in graph.initializer}
        inp = next(i for i in graph.input if i.name not in inits)
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in inp.type.tensor_type.shape.dim]
        return {"name": inp.name, "sample_shape": dims[1:], "dynamic_batch": dims[0] == -1}


@dataclass
class Settings:
    warmup: int
    iterations: int
    batch_sizes: list[int]
    threads: int
    timeout_s: float
    remote_dir: str
    precision: str = "int8"
    workspace_mb: int = 1024
    fp16_fallback: bool = True
    rebuild_engine: bool = False  # rebuild a cached engine whose provenance differs instead of refusing it


@dataclass
class CopyStats:
    name: str
    bytes: int
    sent_bytes: int = 0
    resumed_from: int = 0  # bytes of an earlier partial copy that were kept
    skipped: bool = False  # the device already had the file with the right checksum
    restarted: bool = False  # a resumed partial copy failed its checksum and was sent again whole
    in_place: bool = False  # local runner: the file is used where it is
    seconds: float = 0.0


@dataclass
class BenchResult:
    runner: str
    target: str
    endpoint: str
    runtime: dict
    device: dict
    artifact: dict
    settings: dict
    latency_ms: dict
    batches: list[dict]
    drift: dict | None
    prepare: dict = field(default_factory=dict)
    copy: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    date: str = ""
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        return asdict(self)


def assemble_result(raw: dict, art: Artifact, runner, settings: Settings, copies: list[CopyStats], t0: float,
           target: str) -> BenchResult:
    """Turn a device's raw answer (per-run samples, reference outputs, facts) into a BenchResult."""
    from edgemix.verify.drift import drift_metrics
    from edgemix.verify.latency import summarize

    batches = []
    for b in raw["batches"]:
        if not b["samples_ms"]:
            raise DeviceError(f"the device returned no timed runs for batch {b['batch']}")
        s = summarize(b["samples_ms"], b["batch"])
        s.update(warmup=settings.warmup, threads=raw.get("threads", settings.threads))
        batches.append(s)
    drift, warnings = None, list(raw.get("warnings", []))
    ref = art.reference()
    if ref is not None and raw.get("reference_outputs") is not None:
        dep = np.asarray(raw["reference_outputs"], dtype=np.float32)
        if dep.shape != ref["outputs"].shape:
            raise DeviceError(f"the device returned reference outputs of shape {dep.shape}, "
                              f"expected {ref['outputs'].shape}")
        drift = drift_metrics(ref["outputs"], dep, ref["labels"])
    elif ref is None:
        warnings.append("the artifact has no reference_io.npz: on-device drift was not measured")
    rep = art.report
    return BenchResult(
        runner=runner.kind, target=target, endpoint=runner.endpoint, runtime=raw.get("runtime", {}),
        device={**raw.get("device", {}), **runner.host_facts()},
        artifact={"folder": str(art.folder), "model": art.model.name, "sha256": art.sha256["model"],
                  "model_name": rep.get("model"), "backend": rep.get("backend"), "precision": rep.get("precision"),
                  "built_for": rep.get("target")},
        settings={"warmup": settings.warmup, "iterations": settings.iterations,
                  "batch_sizes": [b["batch"] for b in batches], "threads": raw.get("threads", settings.threads),
                  "timeout_s": settings.timeout_s, "remote_dir": settings.remote_dir},
        latency_ms=batches[0], batches=batches, drift=drift, prepare=raw.get("prepare", {}),
        copy=[asdict(c) for c in copies], warnings=warnings, wall_s=round(time.perf_counter() - t0, 3),
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


# ---------------------------------------------------------------- the runner interface and the order

class Runner:
    """What a transport supplies. ``probe``/``send``/``finish`` move files (see `copy_file`);
    ``execute`` prepares and runs the copied artifact and returns the device's raw answer."""

    kind: str = "?"
    endpoint: str = "?"
    resumable: bool = False  # can `send` append to a partial copy from an offset?
    in_place: bool = False  # runs the files where they are (no copy)

    def check(self) -> None:  # reachable and authorised, or DeviceError saying what failed
        raise NotImplementedError

    def host_facts(self) -> dict:  # facts only the host side knows (e.g. Android getprop)
        return {}

    def payload(self, art: Artifact, settings: Settings, workdir: Path) -> list[tuple[Path, str, str]]:
        """(local file, remote name relative to remote_dir, sha256) for everything the device needs."""
        raise NotImplementedError

    def probe(self, remote_dir: str, final: str, part: str) -> tuple[str | None, int]:
        raise NotImplementedError

    def send(self, local: Path, part: str, offset: int) -> int:
        raise NotImplementedError

    def finish(self, part: str, final: str, sha256: str) -> tuple[bool, str]:
        raise NotImplementedError

    def cleanup(self, folders: list[str]) -> None:  # stale temp names of earlier interrupted copies
        pass

    def execute(self, art: Artifact, settings: Settings) -> dict:
        raise NotImplementedError

    def close(self) -> None:  # release a connection held across the steps
        pass


def run_protocol(runner: Runner, art: Artifact, settings: Settings, target: str) -> BenchResult:
    import tempfile

    t0 = time.perf_counter()
    try:
        runner.check()
        with tempfile.TemporaryDirectory(prefix="edgemix-bench-") as workdir:
            raw, copies = _copy_and_execute(runner, art, settings, Path(workdir))
    finally:
        runner.close()
    return assemble_result(raw, art, runner, settings, copies, t0, target)


def _copy_and_execute(runner: Runner, art: Artifact, settings: Settings, workdir: Path):
    copies, folders = [], []
    for local, name, sha in runner.payload(art, settings, workdir):
        if runner.in_place:  # the local runner reads the artifact where it is
            copies.append(CopyStats(name, local.stat().st_size, in_place=True))
            continue
        folder, _, base = f"{settings.remote_dir}/{name}".rpartition("/")
        copies.append(copy_file(runner, local, folder, base, sha))
        folders.append(folder)
    runner.cleanup(list(dict.fromkeys(folders)))
    return runner.execute(art, settings), copies


# ---------------------------------------------------------------- copying

def probe_script(remote_dir: str, final: str, part: str) -> str:
    """POSIX sh (bash, dash, Android's mksh + toybox): the final file's sha256 and the partial's size."""
    from shlex import quote as q

    return (f"mkdir -p {q(remote_dir)} && "
            f"if [ -f {q(final)} ]; then sha256sum {q(final)} | cut -d' ' -f1; else echo none; fi && "
            f"if [ -f {q(part)} ]; then wc -c < {q(part)}; else echo 0; fi")


def finish_script(part: str, final: str, sha256: str) -> str:
    """Verify the temp copy and rename it into place, or remove it: a final name never holds a bad file."""
    from shlex import quote as q

    return (f"h=$(sha256sum {q(part)} | cut -d' ' -f1); "
            f"if [ \"$h\" = {sha256} ]; then mv -f {q(part)} {q(final)} && echo ok; "
            f"else rm -f {q(part)}; echo \"mismatch $h\"; fi")


def parse_probe(text: str) -> tuple[str | None, int]:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if len(lines) < 2:
        raise DeviceError(f"unexpected answer from the device while checking files: {text.strip()[:200]!r}")
    have = None if lines[-2] == "none" else lines[-2]
    return have, int(lines[-1])


def copy_file(ops, local: Path, remote_dir: str, name: str, sha256: str) -> CopyStats:
    """Copy ``local`` to ``remote_dir/name`` through ``ops`` (the runner's transport).

    The bytes go to ``.name.part-<sha>`` first: a partial copy left by a dropped link is resumed
    (when the transport can append) and only a copy whose sha256 matches is renamed into place.
    Keying the temp name by the checksum means a partial of another build is never appended to.
    """
    final, part = f"{remote_dir}/{name}", f"{remote_dir}/.{name}.part-{sha256[:16]}"
    size = local.stat().st_size
    t = time.perf_counter()
    have, part_size = ops.probe(remote_dir, final, part)
    if have == sha256:
        return CopyStats(name, size, skipped=True, seconds=round(time.perf_counter() - t, 3))
    offset = part_size if ops.resumable and 0 < part_size <= size else 0
    stats = CopyStats(name, size, resumed_from=offset)
    while True:
        stats.sent_bytes += ops.send(local, part, offset)
        ok, got = ops.finish(part, final, sha256)
        if ok:
            stats.seconds = round(time.perf_counter() - t, 3)
            return stats
        if offset == 0:
            raise DeviceError(f"checksum mismatch after copying {name} to {ops.endpoint}: expected sha256 "
                              f"{sha256[:16]}..., the device computed {got[:16]}...; the partial copy was removed",
                              hint="the link or the device storage corrupts data; check free space and retry")
        # The kept partial was not a prefix of this file (another writer, a corrupt disk): send it whole.
        stats.restarted, offset = True, 0


# ---------------------------------------------------------------- the device script's answer

def device_args(art: Artifact, settings: Settings, model: str, reference: str | None, cache_dir: str) -> list[str]:
    """Command-line arguments of edgemix/resources/device/edgemix_device_runner.py for this artifact."""
    args = ["--model", model, "--batch-sizes", ",".join(map(str, art.batch_sizes(settings.batch_sizes))),
            "--warmup", str(settings.warmup), "--iterations", str(settings.iterations),
            "--threads", str(settings.threads), "--cache-dir", cache_dir, "--precision", settings.precision,
            "--workspace-mb", str(settings.workspace_mb), "--timeout", str(int(settings.timeout_s))]
    if reference:
        args += ["--reference", reference]
    meta = art.input_meta()
    if meta:  # what trtexec needs for shapes and an engine's optimisation profile
        args += ["--input-name", meta["name"], "--sample-shape", ",".join(map(str, meta["sample_shape"]))]
        args += ["--dynamic-batch"] if meta["dynamic_batch"] else []
    if not settings.fp16_fallback:
        args.append("--no-fp16")
    if settings.rebuild_engine:
        args.append("--rebuild-engine")
    return args


def parse_device_output(stdout: str, stderr: str, rc: int, endpoint: str, python: str) -> dict:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
        if line.startswith(ERROR_MARK):
            err = json.loads(line[len(ERROR_MARK):])
            if err["kind"] == "engine_mismatch":  # the wrong engine for this device or request: the user's to fix
                raise UsageError(f"engine mismatch on {endpoint}: {err['message']}", hint=err.get("hint"))
            raise DeviceError(f"{err['kind'].replace('_', ' ')} on {endpoint}: {err['message']}", hint=err.get("hint"))
    if rc == 127:
        raise DeviceError(f"missing binary on {endpoint}: the Python interpreter '{python}' was not found",
                          hint="pass --python with the interpreter that has numpy and the runtime")
    tail = (stderr.strip().splitlines() or ["(no output)"])[-1]
    raise DeviceError(f"the device runner failed on {endpoint} (exit {rc}): {tail}")

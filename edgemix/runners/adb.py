"""adb runner (Android phone): ExecuTorch's own `executor_runner`, pushed from a path the user gives.

A phone has no Python, so the device side is ExecuTorch's example runner
(examples/portable/executor_runner, built with the android-arm64-v8a preset and XNNPACK). It
logs "Iteration i of N: x ms" per execution and "Model executed successfully N time(s) in x ms."
through ET_LOG: to stderr with the posix PAL, to logcat (tag ExecuTorch) with the android PAL, so
both are read. Reference outputs come back as the raw float32 files its --output_file writes.
Every adb call goes through ``self._run`` (subprocess.run by default) with a timeout.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import numpy as np

from edgemix.batching import pad_to_batch
from edgemix.errors import DeviceError, ToolchainError, UsageError
from edgemix.runners.protocol import Artifact, Runner, Settings, finish_script, parse_probe, probe_script, sha256_file

# ET_LOG message text, after the posix PAL prefix "I 00:00:00.016422 executorch:file.cpp:779] " or the
# logcat threadtime prefix "04-10 12:26:59.123  4321  4321 I ExecuTorch: ".
LOG_LINE = re.compile(r"^(?:(?P<plevel>[DIEF]) \d\d:\d\d:\d\d\.\d+ executorch:[\w.]+:\d+\]"
                      r"|\d\d-\d\d \d\d:\d\d:\d\d\.\d+\s+\d+\s+\d+ (?P<llevel>[VDIWEF]) ExecuTorch\s*:) ?(?P<msg>.*)$")
ITERATION = re.compile(r"Iteration (\d+) of (\d+): ([0-9.]+) ms")
TOTAL = re.compile(r"Model executed successfully (\d+) time\(s\) in ([0-9.]+) ms")
LOADED = re.compile(r"Model loaded in ([0-9.]+) ms")
THREADS = re.compile(r"Resetting threadpool with num threads = (\d+)")

ADB_FAILURES = [  # adb's own wording (packages/modules/adb), first match wins
    (r"unauthorized", "authentication", "the phone has not authorised this computer",
     "unlock the phone and accept the 'Allow USB debugging' prompt"),
    (r"insufficient permissions", "authentication", "this user may not open the USB device",
     "add a udev rule for the phone (or join the plugdev group)"),
    (r"device '[^']*' not found", "device not found", "no attached device has that serial",
     "see `adb devices -l` for the serials"),
    (r"no devices/emulators found", "no device", "no phone is attached",
     "connect it with USB debugging on, or `adb connect HOST:PORT`"),
    (r"offline", "device offline", "the phone is attached but offline", "reconnect the cable or reboot the phone"),
    (r"cannot connect to daemon|failed to check server version", "adb server unreachable",
     "the adb server did not start", "run `adb start-server` and look at its error"),
]


def classify_adb_error(text: str, serial: str | None, what: str) -> Exception:
    if "more than one device" in text:
        return UsageError("several adb devices are attached; pass --serial (see `adb devices -l`)")
    last = next((ln.strip() for ln in reversed(text.strip().splitlines()) if ln.strip()), "no message from adb")
    where = f"device {serial}" if serial else "the phone"
    for pattern, kind, meaning, hint in ADB_FAILURES:
        if re.search(pattern, text, re.I):
            return DeviceError(f"{kind}: {meaning} while {what} on {where} (adb: {last})", hint=hint)
    return DeviceError(f"adb failed while {what} on {where}: {last}")


def parse_devices(text: str) -> list[dict]:
    """`adb devices -l`: 'SERIAL<spaces>STATE [usb:..] [product:..] [model:..] [device:..] transport_id:N'."""
    out = []
    for line in text.splitlines():
        if not line.strip() or line.startswith(("List of devices", "* daemon")):
            continue
        parts = line.split()
        info = dict(p.split(":", 1) for p in parts[2:] if ":" in p)
        out.append({"serial": parts[0], "state": parts[1] if len(parts) > 1 else "unknown", **info})
    return out


def parse_getprop(text: str) -> dict[str, str]:
    """`getprop` with no argument: '[name]: [value]' per line (system/core/toolbox/getprop.cpp)."""
    return dict(re.findall(r"^\[([^\]]+)\]: \[(.*)\]$", text, re.M))


def android_facts(props: dict[str, str]) -> dict:
    soc = props.get("ro.soc.model") or props.get("ro.board.platform") or props.get("ro.hardware")
    return {"model": props.get("ro.product.model"), "manufacturer": props.get("ro.product.manufacturer"),
            "soc": soc, "soc_manufacturer": props.get("ro.soc.manufacturer"),
            "board_platform": props.get("ro.board.platform"), "abi": props.get("ro.product.cpu.abi"),
            "android": props.get("ro.build.version.release"), "sdk": props.get("ro.build.version.sdk"),
            "arch": "aarch64" if props.get("ro.product.cpu.abi") == "arm64-v8a" else props.get("ro.product.cpu.abi")}


def parse_executor_runner(text: str) -> dict:
    """executor_runner's ET_LOG lines (posix stderr or logcat) -> per-run samples and load time."""
    res = {"samples_ms": [], "load_ms": None, "total_ms": None, "executions": None, "threads": None, "errors": []}
    for line in text.splitlines():
        m = LOG_LINE.match(line.rstrip("\r"))
        if not m:
            continue
        msg, level = m.group("msg"), m.group("plevel") or m.group("llevel")
        if (it := ITERATION.search(msg)):
            res["samples_ms"].append(float(it.group(3)))
        elif (tot := TOTAL.search(msg)):
            res["executions"], res["total_ms"] = int(tot.group(1)), float(tot.group(2))
        elif (ld := LOADED.search(msg)):
            res["load_ms"] = float(ld.group(1))
        elif (th := THREADS.search(msg)):
            res["threads"] = int(th.group(1))
        elif level in ("E", "F"):
            res["errors"].append(msg)
    return res


def run_command(exe: str, model: str, executions: int, threads: int, inputs: str | None = None,
                output: str | None = None) -> str:
    """One executor_runner invocation (flags of examples/portable/executor_runner/executor_runner.cpp)."""
    args = [exe, f"--model_path={model}", f"--num_executions={executions}", "--print_output=none",
            f"--cpu_threads={threads}"]
    args += [f"--inputs={inputs}"] if inputs else []
    args += [f"--output_file={output}"] if output else []
    return " ".join(shlex.quote(a) for a in args)


class AdbRunner(Runner):
    kind = "adb"
    resumable = False  # adb push cannot append; a kept file with the right sha256 is still skipped

    def __init__(self, runner_path: Path, serial: str | None = None, remote_dir: str = "/data/local/tmp/edgemix",
                 adb: str = "adb", timeout_s: float = 300, run=subprocess.run):
        self.runner_path, self.serial, self.adb, self.timeout_s = Path(runner_path), serial, adb, timeout_s
        self.remote_dir = remote_dir
        self._run = run  # tests replay recorded adb output through this
        self.endpoint = f"adb:{serial or '?'}"
        self.props: dict[str, str] = {}

    def command(self, *args: str) -> list[str]:
        return [self.adb, *(["-s", self.serial] if self.serial else []), *args]

    def _call(self, args: list[str], what: str, timeout: float | None = None, binary: bool = False,
              check: bool = True) -> subprocess.CompletedProcess:
        cmd = self.command(*args)
        try:
            p = self._run(cmd, capture_output=True, text=not binary, timeout=timeout or self.timeout_s)
        except FileNotFoundError:
            raise ToolchainError(f"'{self.adb}' (Android platform-tools) is not installed",
                                 hint="apt-get install adb, or put platform-tools on PATH") from None
        except subprocess.TimeoutExpired:
            raise DeviceError(f"timeout: adb {what} on {self.endpoint} took longer than "
                              f"{timeout or self.timeout_s:.0f} s") from None
        if check and p.returncode != 0:
            err = p.stderr if isinstance(p.stderr, str) else p.stderr.decode(errors="replace")
            out = p.stdout if isinstance(p.stdout, str) else ""
            raise classify_adb_error(err + "\n" + out, self.serial, what)
        return p

    def _shell(self, script: str, what: str, timeout: float | None = None) -> str:
        return self._call(["shell", script], what, timeout).stdout

    def check(self) -> None:
        if not self.runner_path.is_file():
            raise UsageError(f"--runner-path {self.runner_path} does not exist")
        devices = parse_devices(self._call(["devices", "-l"], "listing devices", 30).stdout)
        if self.serial is None:
            ready = [d for d in devices if d["state"] == "device"]
            listing = ", ".join(f"{d['serial']} ({d['state']})" for d in devices)
            if not devices:
                raise classify_adb_error("no devices/emulators found", None, "listing devices")
            if len(ready) > 1:
                raise UsageError(f"several adb devices are ready: {listing}; pass --serial")
            # none ready: say why when there is only one, else list them
            self.serial = ready[0]["serial"] if ready else devices[0]["serial"] if len(devices) == 1 else None
            if self.serial is None:
                raise DeviceError(f"no adb device is ready: {listing}", hint="pass --serial to see why one is not")
        dev = next((d for d in devices if d["serial"] == self.serial), None)
        if dev is None:
            raise classify_adb_error(f"device '{self.serial}' not found", self.serial, "listing devices")
        if dev["state"] != "device":
            raise classify_adb_error(dev["state"], self.serial, "listing devices")
        self.endpoint = f"adb:{self.serial}"
        self.props = parse_getprop(self._shell("getprop", "reading device properties", 30))

    def host_facts(self) -> dict:
        return android_facts(self.props)

    def payload(self, art: Artifact, settings: Settings, workdir: Path) -> list[tuple[Path, str, str]]:
        if art.model.suffix != ".pte":
            raise UsageError(f"the adb runner runs ExecuTorch programs (.pte); {art.model.name} is not one")
        files = [(self.runner_path, "executor_runner", sha256_file(self.runner_path)),
                 (art.model, f"{art.folder.name}/{art.model.name}", art.sha256["model"])]
        ref = art.reference()
        self.chunks = 0
        if ref is not None:  # executor_runner reads raw little-endian float32, one file per input
            x, b = ref["inputs"].astype("<f4"), art.batch_size
            self.chunks = -(-len(x) // b)
            for i in range(self.chunks):
                chunk = pad_to_batch(x[i * b:(i + 1) * b], b)
                path = workdir / f"ref_{i:03d}.bin"
                chunk.tofile(path)
                files.append((path, f"{art.folder.name}/io/{path.name}", sha256_file(path)))
        return files

    def probe(self, remote_dir: str, final: str, part: str) -> tuple[str | None, int]:
        return parse_probe(self._shell(probe_script(remote_dir, final, part), f"checking {final}", 60))

    def send(self, local: Path, part: str, offset: int) -> int:
        self._call(["push", str(local), part], f"pushing {local.name}")
        return local.stat().st_size

    def finish(self, part: str, final: str, sha256: str) -> tuple[bool, str]:
        out = self._shell(finish_script(part, final, sha256), f"verifying {final}", 120).strip()
        return out.endswith("ok"), out.replace("mismatch", "").strip()

    def cleanup(self, folders: list[str]) -> None:
        self._shell("rm -f " + " ".join(f"{shlex.quote(d)}/.*.part-*" for d in folders), "removing stale copies", 60)

    def _runner_shell(self, script: str, what: str) -> str:
        out = self._shell(f"({script}) 2>&1; echo EDGEMIX_RC=$?", what)  # mksh: 127 not found, 126 not executable
        m = re.search(r"EDGEMIX_RC=(\d+)\s*$", out)
        rc = int(m.group(1)) if m else -1
        if rc in (126, 127):
            raise DeviceError(f"missing binary on {self.endpoint}: executor_runner could not be started (exit {rc}: "
                              f"{out.strip().splitlines()[0][:160]})",
                              hint="--runner-path must be an Android arm64 build of ExecuTorch's executor_runner")
        if rc != 0:
            errs = parse_executor_runner(out)["errors"] or out.strip().splitlines()[-3:]
            raise DeviceError(f"executor_runner failed on {self.endpoint} (exit {rc}) while {what}: "
                              + " | ".join(errs[-3:]))
        return out

    def execute(self, art: Artifact, settings: Settings) -> dict:
        d, w, n = settings.remote_dir, settings.warmup, settings.iterations
        exe, model, io = f"{d}/executor_runner", f"{d}/{art.folder.name}/{art.model.name}", f"{d}/{art.folder.name}/io"
        self._shell(f"chmod 755 {shlex.quote(exe)}", "making executor_runner executable", 30)
        self._call(["logcat", "-c"], "clearing logcat", 30, check=False)
        bench_in = f"{io}/ref_000.bin" if self.chunks else None  # a real image; ones when there is none
        out = self._runner_shell(run_command(exe, model, w + n, settings.threads, bench_in), "timing")
        parsed = parse_executor_runner(out)
        if not parsed["samples_ms"]:  # an android-PAL build logs to logcat, not to the shell
            parsed = parse_executor_runner(self._call(["logcat", "-d", "-s", "ExecuTorch:I"], "reading logcat", 60).stdout)
        if len(parsed["samples_ms"]) != w + n:
            raise DeviceError(f"executor_runner reported {len(parsed['samples_ms'])} timed executions, expected "
                              f"{w + n}", hint="the runner must be built from ExecuTorch 1.3 or newer (it logs "
                                               "'Iteration i of N' per execution)")
        threads = parsed["threads"] or settings.threads
        return {"runtime": {"name": "executorch", "binary": "executor_runner", "load_ms": parsed["load_ms"]},
                "threads": threads, "device": {"threads": threads},
                "batches": [{"batch": art.batch_size, "samples_ms": parsed["samples_ms"][w:]}],
                "reference_outputs": self._reference_outputs(art, settings, exe, model, io),
                "prepare": {"load_ms": parsed["load_ms"]}, "warnings": []}

    def _reference_outputs(self, art, settings, exe, model, io):
        ref = art.reference()
        if not self.chunks:
            return None
        names = [f"{i:03d}" for i in range(self.chunks)]
        qio = shlex.quote(io)  # $i must stay outside the quotes to expand
        loop = (f"for i in {' '.join(names)}; do " + run_command(exe, model, 1, settings.threads)
                + f" --inputs={qio}/ref_$i.bin --output_file={qio}/out_$i >/dev/null || exit 1; done")
        self._runner_shell(loop, "running the reference inputs")
        files = [f"{io}/out_{i}-0.bin" for i in names]
        raw = self._call(["exec-out", "cat " + " ".join(files)], "reading reference outputs", 120, binary=True).stdout
        self._shell("rm -f " + " ".join(files), "removing reference outputs", 60)
        b, k = art.batch_size, ref["outputs"].shape[1]
        if len(raw) != self.chunks * b * k * 4:
            raise DeviceError(f"executor_runner wrote {len(raw)} bytes of reference outputs, expected "
                              f"{self.chunks * b * k * 4} ({self.chunks} x batch {b} x {k} float32)")
        return np.frombuffer(raw, "<f4").reshape(-1, k)[: len(ref["outputs"])].tolist()

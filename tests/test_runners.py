"""Device runners (`edgemix bench`): the ssh runner end to end against a real OpenSSH server on
127.0.0.1 whose "device" is this machine, the host runner on a real .pte, and the adb runner's
commands and parsers on recorded adb / getprop / executor_runner output (tests/fixtures/adb)."""

from __future__ import annotations

import getpass
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from edgemix.errors import DeviceError, UsageError
from edgemix.runners import Artifact, bench, render
from edgemix.runners import adb as adbmod
from edgemix.runners.protocol import DEVICE_SCRIPT, copy_file, sha256_file
from edgemix.runners.ssh import SshRunner, classify_ssh_error

FIXTURES = Path(__file__).parent / "fixtures" / "adb"
SSHD = Path("/usr/sbin/sshd")
needs_sshd = pytest.mark.skipif(not SSHD.exists(), reason="openssh-server not installed")
FAST = {"warmup": 3, "iterations": 20}  # keeps each run to a second or two on 2 shared cores


# ---------------------------------------------------------------- small artifacts (a real build takes 35-100 s here)

def _model() -> torch.nn.Module:
    from edgemix.models import build_model, resolve_spec

    torch.manual_seed(0)
    model = build_model(resolve_spec("fmnist")).eval()
    with torch.no_grad():  # the head starts at zero; random logits make argmax and cosine meaningful
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.05)
    return model


def _reference(model, n: int = 8):
    from edgemix.data import load_dataset, stratified_indices, to_model_input

    data = load_dataset("sample", "test")  # the shipped sample: real Fashion-MNIST images and labels
    data = data.subset(stratified_indices(data.labels, n, 0))
    x = to_model_input(data.images, model.spec).float()
    with torch.no_grad():
        return x.numpy(), model(x).numpy(), data.labels.numpy()


def write_artifact(folder: Path, kind: str) -> Path:
    """A minimal build output: the model file, reference_io.npz and a report.json naming both."""
    model = _model()
    inputs, outputs, labels = _reference(model)
    folder.mkdir(parents=True)
    example = torch.from_numpy(inputs[:1])
    if kind == "pte":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

        prog = to_edge_transform_and_lower(torch.export.export(model, (example,)),
                                           partitioner=[XnnpackPartitioner()]).to_executorch()
        path = folder / "fmnist_phone_fp32.pte"
        path.write_bytes(prog.buffer)
        backend, target, dynamic = "executorch", "android-arm64", False
    else:
        path = folder / "fmnist_jetson_fp32.onnx"
        torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        backend, target, dynamic = "tensorrt", "jetson-orin-nano", True
    np.savez(folder / "reference_io.npz", inputs=inputs, outputs=outputs, labels=labels)
    files = {role: {"name": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for role, p in (("model", path), ("reference_io", folder / "reference_io.npz"))}
    report = {"schema_version": 1, "model": "fmnist", "target": target, "backend": backend, "precision": "fp32",
              "artifact": {"bytes": files["model"]["bytes"], "files": files, "batch_size": 1,
                           "dynamic_batch": dynamic},
              "latency_ms": {"p50": 1.0}}
    (folder / "report.json").write_text(json.dumps(report, indent=2))
    return folder


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    """Built once (the .pte lowering takes ~20 s here); tests copy them before changing anything."""
    root = tmp_path_factory.mktemp("artifacts")
    return {"onnx": write_artifact(root / "fmnist_jetson_fp32", "onnx"),
            "pte": write_artifact(root / "fmnist_phone_fp32", "pte")}


def fresh(artifacts, kind, tmp_path) -> Path:
    return Path(shutil.copytree(artifacts[kind], tmp_path / artifacts[kind].name))


# ---------------------------------------------------------------- a real OpenSSH server on 127.0.0.1

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "edgemix-test", "-f", str(path)],
                   check=True, timeout=30)
    return path


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """sshd -D on a free high port of 127.0.0.1 with a generated host key and one authorised key."""
    if not SSHD.exists():
        pytest.skip("openssh-server not installed")
    d = tmp_path_factory.mktemp("sshd")
    host_key, client_key, stranger_key = _keygen(d / "host_key"), _keygen(d / "client_key"), _keygen(d / "stranger")
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    port = _free_port()
    config = d / "sshd_config"
    config.write_text("\n".join([
        "ListenAddress 127.0.0.1", f"HostKey {host_key}", f"PidFile {d / 'sshd.pid'}",
        f"AuthorizedKeysFile {d / 'authorized_keys'}", "PubkeyAuthentication yes", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no", "PermitRootLogin prohibit-password",
        f"AllowUsers {getpass.getuser()}", "LogLevel VERBOSE", ""]))
    if os.geteuid() == 0:  # sshd started as root insists on its privilege-separation directory
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    log = open(d / "sshd.log", "w")
    proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config), "-p", str(port)], stdout=log, stderr=log)
    deadline = time.time() + 15
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"sshd exited with {proc.returncode}: {(d / 'sshd.log').read_text()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    yield {"port": port, "key": client_key, "stranger": stranger_key, "known_hosts": d / "known_hosts",
           "user": getpass.getuser(), "log": d / "sshd.log"}
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _offline_ssh(tmp_path: Path) -> str:
    """An ssh that runs in a network namespace holding only a down loopback, when unshare allows it."""
    for flags in ("-n", "-rn"):
        if shutil.which("unshare") and subprocess.run(["unshare", flags, "true"], capture_output=True).returncode == 0:
            wrapper = tmp_path / "ssh-offline"
            wrapper.write_text(f'#!/bin/sh\nexec unshare {flags} ssh "$@"\n')
            wrapper.chmod(0o755)
            return str(wrapper)
    return "ssh"


def ssh_bench(sshd, art, tmp_path, **kw):
    """`edgemix bench --target jetson` against the test server; the device's python is this venv's."""
    opts = dict(host=f"{sshd['user']}@127.0.0.1", port=sshd["port"], identity=sshd["key"], python=sys.executable,
                known_hosts=sshd["known_hosts"], ssh_config=os.devnull, remote_dir=str(tmp_path / "device"), **FAST)
    opts.update(kw)
    return bench("jetson", art, **opts)


@needs_sshd
def test_ssh_runner_end_to_end(sshd, artifacts, tmp_path):
    art = fresh(artifacts, "onnx", tmp_path)
    masters = set(Path(tempfile.gettempdir()).glob("emx-ssh-*"))
    r = ssh_bench(sshd, art, tmp_path)
    # The jetson profile asks for batch 1 and 8 and the ONNX has a dynamic batch: both are timed,
    # the export batch first (it is what latency_ms, and so `edgemix gate`, reads).
    assert [b["batch"] for b in r.batches] == [1, 8] and r.latency_ms is r.batches[0]
    for b in r.batches:
        assert b["runs"] == FAST["iterations"] and b["warmup"] == FAST["warmup"]
        assert 0 < b["min"] <= b["p50"] <= b["p90"] <= b["p99"] and b["std"] >= 0
        assert b["throughput_ips"] == pytest.approx(1000 * b["batch"] / b["p50"])
    # No TensorRT here: the device script falls back to onnxruntime on the CPU.
    assert r.runtime["name"] == "onnxruntime" and "CPUExecutionProvider" in r.runtime["providers"]
    # fp32 ONNX on onnxruntime vs fp32 PyTorch: the same math, float rounding only (1e-4 abs on logits ~1)
    d = r.drift
    assert d["samples"] == 8 and d["agreement"] == 1.0 and d["max_abs_error"] < 1e-4 and d["cosine_min"] > 0.99999
    # device facts come from the device (this machine), the transport facts from the host side
    assert r.device["cpus"] == os.cpu_count() and r.device["threads"] == 2 and r.device["cpu"]
    assert r.device["ssh"]["port"] == sshd["port"] and r.device["ssh"]["uname"].startswith("Linux")
    assert r.endpoint == f"{sshd['user']}@127.0.0.1:{sshd['port']}"
    # every file went through the checksummed copy, and no temp name is left behind
    device = tmp_path / "device"
    assert {c["name"] for c in r.copy} == {DEVICE_SCRIPT.name, "fmnist_jetson_fp32.onnx", "reference_io.npz"}
    assert all(c["sent_bytes"] == c["bytes"] and not c["skipped"] for c in r.copy)
    assert sha256_file(device / art.name / "fmnist_jetson_fp32.onnx") == sha256_file(art / "fmnist_jetson_fp32.onnx")
    assert not list(device.rglob(".*.part-*"))
    assert "127.0.0.1" in sshd["known_hosts"].read_text()  # accept-new recorded the host key
    # merged into report.json under "bench", the rest of the report untouched
    report = json.loads((art / "report.json").read_text())
    assert report["bench"]["latency_ms"]["p50"] == r.latency_ms["p50"] and report["model"] == "fmnist"
    assert report["bench"]["drift"]["agreement"] == 1.0 and not list(art.glob(".*tmp*"))
    # a second run finds every file already on the device and copies nothing
    again = ssh_bench(sshd, art, tmp_path, iterations=5)
    assert all(c["skipped"] and c["sent_bytes"] == 0 for c in again.copy)
    render(again)  # the table renders from a real result
    assert set(Path(tempfile.gettempdir()).glob("emx-ssh-*")) == masters  # the master connection was closed


@needs_sshd
def test_ssh_copy_resumes_partial_and_detects_mismatch(sshd, artifacts, tmp_path):
    art = Artifact.load(fresh(artifacts, "onnx", tmp_path))
    model, sha = art.model, art.sha256["model"]
    data, half = model.read_bytes(), model.stat().st_size // 2
    remote = tmp_path / "device"
    remote.mkdir()
    part = remote / f".{model.name}.part-{sha[:16]}"
    runner = SshRunner(f"{sshd['user']}@127.0.0.1", port=sshd["port"], identity=sshd["key"],
                       known_hosts=sshd["known_hosts"], ssh_config=os.devnull)
    runner.check()
    try:
        _resume_checks(runner, model, sha, data, half, remote, part)
    finally:
        runner.close()


def _resume_checks(runner, model, sha, data, half, remote, part):
    # a copy that stopped half way is completed from where it stopped, not sent again
    part.write_bytes(data[:half])
    s = copy_file(runner, model, str(remote), model.name, sha)
    assert (s.resumed_from, s.sent_bytes, s.restarted) == (half, len(data) - half, False)
    assert (remote / model.name).read_bytes() == data and not part.exists()
    # a kept partial that is not a prefix of the file fails the checksum and is sent again whole
    (remote / model.name).unlink()
    part.write_bytes(b"\0" * half)
    s = copy_file(runner, model, str(remote), model.name, sha)
    assert s.restarted and s.resumed_from == half and s.sent_bytes == len(data) - half + len(data)
    assert sha256_file(remote / model.name) == sha and not part.exists()
    # a corrupted file under the final name is never trusted: its checksum differs, it is replaced
    (remote / model.name).write_bytes(data[:-1] + b"x")
    s = copy_file(runner, model, str(remote), model.name, sha)
    assert not s.skipped and s.sent_bytes == len(data) and sha256_file(remote / model.name) == sha


@needs_sshd
@pytest.mark.parametrize("case, needle", [("closed port", "connection refused"), ("wrong key", "authentication"),
                                          ("unknown host", "DNS"), ("no interpreter", "missing binary")])
def test_ssh_unreachable_exits_4_and_says_why(sshd, artifacts, tmp_path, case, needle):
    art = fresh(artifacts, "onnx", tmp_path)
    kw = {"closed port": {"port": _free_port()}, "wrong key": {"identity": sshd["stranger"]},
          # RFC 6761: .invalid never resolves; run inside an empty network namespace where one can be
          # made, so that not even the stub resolver's query leaves the machine
          "unknown host": {"host": f"{sshd['user']}@edgemix-no-such-device.invalid", "ssh": _offline_ssh(tmp_path)},
          "no interpreter": {"python": "/nonexistent/python3"}}[case]
    masters = set(Path(tempfile.gettempdir()).glob("emx-ssh-*"))
    with pytest.raises(DeviceError) as e:
        ssh_bench(sshd, art, tmp_path, **kw)
    assert e.value.exit_code == 4 and str(e.value).startswith(needle), str(e.value)
    assert not (tmp_path / "device").exists()  # nothing was copied, not even a temp name
    assert "bench" not in json.loads((art / "report.json").read_text())
    assert set(Path(tempfile.gettempdir()).glob("emx-ssh-*")) == masters  # no ssh master left running


def test_ssh_error_classification_and_command():
    # ssh's own wording (exit 255), as OpenSSH 9.2 prints it
    cases = {"ssh: Could not resolve hostname orin.local: Name or service not known": "DNS",
             "ssh: connect to host 10.0.0.5 port 22: Connection timed out": "timeout",
             "ssh: connect to host 10.0.0.5 port 22: No route to host": "network unreachable",
             "Host key verification failed.": "host key mismatch",
             "me@10.0.0.5: Permission denied (publickey,password).": "authentication"}
    for text, kind in cases.items():
        assert str(classify_ssh_error(text, "orin:22", "connecting")).startswith(kind + ":"), text
    cmd = SshRunner("me@orin", port=2222, identity=Path("/k"), known_hosts=Path("/kh")).base_command()
    for opt in ("BatchMode=yes", "StrictHostKeyChecking=accept-new", "UserKnownHostsFile=/kh", "ConnectTimeout=10"):
        assert opt in cmd
    assert cmd[:4] == ["ssh", "-T", "-p", "2222"] and cmd[cmd.index("-i") + 1] == "/k"
    assert cmd[-2:] == ["--", "me@orin"]  # a --host starting with "-" can never be read as an ssh option


# ---------------------------------------------------------------- the host runner

def test_local_runner_on_pte(artifacts, tmp_path):
    art = fresh(artifacts, "pte", tmp_path)
    r = bench("host", art, **FAST)
    assert r.runner == "local" and r.runtime["name"] == "executorch" and r.settings["threads"] == 2
    assert [b["batch"] for b in r.batches] == [1] and r.latency_ms["runs"] == FAST["iterations"]
    # ExecuTorch XNNPACK fp32 vs eager fp32: delegate kernels reorder sums (1e-4 abs on logits ~1)
    assert r.drift["agreement"] == 1.0 and r.drift["max_abs_error"] < 1e-4
    assert all(c["in_place"] for c in r.copy) and r.device["cpus"] == os.cpu_count()
    assert json.loads((art / "report.json").read_text())["bench"]["runner"] == "local"


def test_artifact_checks(artifacts, tmp_path):
    art = fresh(artifacts, "onnx", tmp_path)
    with (art / "fmnist_jetson_fp32.onnx").open("ab") as f:
        f.write(b"\0")  # the model changed after the build: benchmarking it under the build's name would lie
    with pytest.raises(UsageError, match="changed after the build"):
        Artifact.load(art)
    with pytest.raises(UsageError, match="no report.json"):
        Artifact.load(tmp_path)
    with pytest.raises(UsageError, match="needs --host"):
        bench("jetson", fresh(artifacts, "pte", tmp_path / "x"))


# ---------------------------------------------------------------- the adb runner on recorded output

SERIAL = "2B131FDH2005YN"  # the ready phone in adb_devices_l.txt
DEVICE_DIR = "/data/local/tmp/edgemix"


class RecordedPhone:
    """adb answered from tests/fixtures/adb: the device list, getprop, executor_runner and logcat are
    recordings; file commands (push, sha256sum, mv, rm, chmod) act on a folder standing in for the
    phone's /data/local/tmp, so the copy protocol's checksums and renames are real."""

    def __init__(self, root: Path, android_pal: bool = False):
        self.root, self.android_pal, self.calls = root, android_pal, []

    def _here(self, text: str) -> str:
        return text.replace("/data/local/tmp", str(self.root))

    def __call__(self, cmd, capture_output=True, text=True, timeout=None):
        assert capture_output and timeout and timeout > 0, cmd  # every adb step is bounded
        self.calls.append(cmd)
        args = cmd[3:] if cmd[1:2] == ["-s"] else cmd[1:]
        out, err, rc = "", "", 0
        if args == ["devices", "-l"]:
            out = (FIXTURES / "adb_devices_l.txt").read_text()
        elif args == ["shell", "getprop"]:
            out = (FIXTURES / "getprop.txt").read_text()
        elif args[0] == "push":
            Path(self._here(args[2])).write_bytes(Path(args[1]).read_bytes())
            out = (FIXTURES / "adb_push.txt").read_text().replace("/tmp/edgemix-bench-x1/ref_000.bin", args[1])
        elif args[0] == "logcat":
            if args == ["logcat", "-d", "-s", "ExecuTorch:I"] and self.android_pal:
                out = (FIXTURES / "logcat_executorch.txt").read_text()
        elif args[0] == "exec-out":
            out = (FIXTURES / "reference_outputs.bin").read_bytes()
        elif "executor_runner --model_path" in args[1]:
            name = "executor_runner_reference.txt" if args[1].startswith("(for i") else "executor_runner_timing.txt"
            out = "EDGEMIX_RC=0\n" if self.android_pal else (FIXTURES / name).read_text()
        else:
            p = subprocess.run(["sh", "-c", self._here(args[1])], capture_output=True, text=True, timeout=timeout)
            out, err, rc = p.stdout, p.stderr, p.returncode
        if not text and isinstance(out, str):
            out = out.encode()
        return subprocess.CompletedProcess(cmd, rc, out, err)


def phone_artifact(artifacts, tmp_path) -> Artifact:
    """The test .pte with the recording's reference_io.npz, so the recorded outputs belong to its inputs."""
    art = fresh(artifacts, "pte", tmp_path)
    shutil.copyfile(FIXTURES / "reference_io.npz", art / "reference_io.npz")
    report = json.loads((art / "report.json").read_text())
    report["artifact"]["files"]["reference_io"]["sha256"] = sha256_file(art / "reference_io.npz")
    (art / "report.json").write_text(json.dumps(report))
    return Artifact.load(art)


def run_phone(artifacts, tmp_path, android_pal=False):
    from edgemix.config import resolve_target
    from edgemix.runners import settings_for
    from edgemix.runners.protocol import run_protocol

    art = phone_artifact(artifacts, tmp_path)
    (tmp_path / "phone").mkdir()
    phone = RecordedPhone(tmp_path / "phone", android_pal)
    runner_bin = tmp_path / "executor_runner"
    runner_bin.write_bytes(b"\x7fELF stand-in: the recorded runs answer for it")
    runner = adbmod.AdbRunner(runner_bin, serial=SERIAL, run=phone)
    settings = settings_for(resolve_target("phone"), art, **FAST)
    return run_protocol(runner, art, settings, "android-arm64"), phone


def test_adb_runner_on_recorded_phone(artifacts, tmp_path):
    r, phone = run_phone(artifacts, tmp_path)
    adb = ["adb", "-s", SERIAL]
    assert phone.calls[0] == adb + ["devices", "-l"] and phone.calls[1] == adb + ["shell", "getprop"]
    timing = (f"({DEVICE_DIR}/executor_runner --model_path={DEVICE_DIR}/fmnist_phone_fp32/fmnist_phone_fp32.pte "
              "--num_executions=23 --print_output=none --cpu_threads=2 "
              f"--inputs={DEVICE_DIR}/fmnist_phone_fp32/io/ref_000.bin) 2>&1; echo EDGEMIX_RC=$?")
    assert adb + ["shell", timing] in phone.calls
    pushes = [c[4:] for c in phone.calls if c[3] == "push"]
    assert [Path(src).name for src, _ in pushes][:2] == ["executor_runner", "fmnist_phone_fp32.pte"]
    assert all(Path(dst).name.startswith(".") and ".part-" in dst for _, dst in pushes)  # temp names only
    outs = " ".join(f"{DEVICE_DIR}/fmnist_phone_fp32/io/out_{i:03d}-0.bin" for i in range(8))
    assert adb + ["exec-out", "cat " + outs] in phone.calls
    # the 3 warm-up executions of the recording are dropped, its 20 timed ones kept in order
    # (iterations 4 and 23 of executor_runner_timing.txt; summaries keep 4 decimals)
    assert r.latency_ms["runs"] == 20 and r.latency_ms["samples"][0] == round(1.450211, 4)
    assert r.latency_ms["samples"][-1] == round(0.817602, 4) and r.prepare["load_ms"] == 7.326165
    # recorded executor_runner logits vs recorded eager FP32 logits: float rounding only (1e-4 abs)
    assert r.drift["agreement"] == 1.0 and r.drift["max_abs_error"] < 1e-4 and r.drift["cosine_min"] > 0.99999
    dev = r.device
    assert (dev["model"], dev["soc"], dev["abi"], dev["android"], dev["threads"]) == \
        ("Pixel 7 Pro", "GS201", "arm64-v8a", "14", 2)
    phone_dir = tmp_path / "phone" / "edgemix"
    assert sha256_file(phone_dir / "fmnist_phone_fp32" / "fmnist_phone_fp32.pte") == r.artifact["sha256"]
    assert not list(phone_dir.rglob(".*.part-*")) and not list(phone_dir.rglob("out_*"))


def test_adb_runner_reads_logcat_of_an_android_pal_build(artifacts, tmp_path):
    r, phone = run_phone(artifacts, tmp_path, android_pal=True)
    adb = ["adb", "-s", SERIAL]
    assert phone.calls.index(adb + ["logcat", "-c"]) < phone.calls.index(adb + ["logcat", "-d", "-s", "ExecuTorch:I"])
    assert r.latency_ms["runs"] == 20 and r.device["threads"] == 2
    assert max(r.latency_ms["samples"]) == round(1.204417, 4)  # the recording's hiccup is kept, not smoothed away


def test_executor_runner_output_parsing():
    posix = adbmod.parse_executor_runner((FIXTURES / "executor_runner_timing.txt").read_text())
    logcat = adbmod.parse_executor_runner((FIXTURES / "logcat_executorch.txt").read_text())
    for p, total, load in ((posix, 30.794122, 7.326165), (logcat, 9.208, 4.102844)):
        assert p["executions"] == len(p["samples_ms"]) == 23 and p["threads"] == 2 and p["errors"] == []
        assert p["total_ms"] == total and p["load_ms"] == load
        # the runner's total is the sum of its per-iteration times, to its 6 printed decimals
        assert sum(p["samples_ms"]) == pytest.approx(total, abs=1e-4)


def test_adb_device_listing_and_errors(tmp_path):
    devices = adbmod.parse_devices((FIXTURES / "adb_devices_l.txt").read_text())
    assert [(d["serial"], d["state"]) for d in devices] == [
        (SERIAL, "device"), ("R5CT32ABCDE", "unauthorized"), ("192.168.1.40:5555", "offline")]
    assert devices[0]["model"] == "Pixel_7_Pro" and devices[0]["transport_id"] == "3"
    props = adbmod.parse_getprop((FIXTURES / "getprop.txt").read_text())
    assert props["ro.product.model"] == "Pixel 7 Pro" and len(props) == 18
    binary = tmp_path / "executor_runner"
    binary.write_bytes(b"x")
    phone = RecordedPhone(tmp_path)
    runner = adbmod.AdbRunner(binary, run=phone)  # no --serial: the one ready device is chosen
    runner.check()
    assert runner.serial == SERIAL and phone.calls[0] == ["adb", "devices", "-l"]
    for serial, kind in (("R5CT32ABCDE", "authentication"), ("192.168.1.40:5555", "device offline"),
                         ("ZX1G22KHQK", "device not found")):
        with pytest.raises(DeviceError) as e:
            adbmod.AdbRunner(binary, serial=serial, run=RecordedPhone(tmp_path)).check()
        assert e.value.exit_code == 4 and str(e.value).startswith(kind), str(e.value)
    for name, kind in (("unauthorized", "authentication"), ("not_found", "device not found"),
                       ("no_devices", "no device"), ("offline", "device offline")):
        err = adbmod.classify_adb_error((FIXTURES / f"adb_error_{name}.txt").read_text(), "S", "pushing")
        assert isinstance(err, DeviceError) and str(err).startswith(kind)
    err = adbmod.classify_adb_error((FIXTURES / "adb_error_more_than_one.txt").read_text(), None, "listing")
    assert isinstance(err, UsageError) and "--serial" in str(err)
    from edgemix.errors import ToolchainError

    with pytest.raises(ToolchainError) as e:  # no adb client at all: a missing toolchain, exit 3
        adbmod.AdbRunner(binary, adb=str(tmp_path / "no-adb")).check()
    assert e.value.exit_code == 3


def test_adb_live_phone(artifacts, tmp_path):
    adb = shutil.which("adb")
    serials = []
    if adb:
        out = subprocess.run([adb, "devices"], capture_output=True, text=True, timeout=30).stdout
        serials = [ln.split()[0] for ln in out.splitlines()[1:] if ln.strip().endswith("device")]
    if not serials:
        pytest.skip("no adb device")
    runner = os.environ.get("EDGEMIX_EXECUTOR_RUNNER")
    if not runner:
        pytest.skip("no adb device runner: set EDGEMIX_EXECUTOR_RUNNER to an Android build of executor_runner")
    r = bench("phone", fresh(artifacts, "pte", tmp_path), serial=serials[0], runner_path=Path(runner), **FAST)
    assert r.latency_ms["runs"] == FAST["iterations"] and r.drift["agreement"] >= 0.97 and r.device["abi"]


# ---------------------------------------------------------------- device-script pieces that need a Jetson

def _device_script():
    spec = importlib.util.spec_from_file_location("edgemix_device_runner", DEVICE_SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_jetson_fact_and_trtexec_parsers():
    dev = _device_script()
    # /etc/nv_tegra_release of JetPack 6.1 (L4T 36.4.0), and `nvpmodel -q` on an Orin Nano
    tegra = "# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, DATE: Fri Sep 13 04:36:44 UTC 2024"
    assert dev.parse_nv_tegra_release(tegra) == "36.4.0" and dev.parse_nv_tegra_release("") is None
    assert dev.parse_nvpmodel("NV Power Mode: 15W\n0\n") == "15W"
    # trtexec --exportTimes / --exportOutput JSON as TensorRT's samples/common/sampleReporting.cpp writes it
    times = ('[\n  { "startEnqMs" : 1.5, "endEnqMs" : 1.6, "startH2dMs" : 1.6, "endH2dMs" : 1.7, "startComputeMs" : 1.7,'
             ' "endComputeMs" : 2.9, "startD2hMs" : 2.9, "endD2hMs" : 3, "h2dMs" : 0.1, "computeMs" : 1.2, "d2hMs" : 0.1,'
             ' "latencyMs" : 1.4 }\n, { "startEnqMs" : 3.1, "endEnqMs" : 3.2, "startH2dMs" : 3.2, "endH2dMs" : 3.3,'
             ' "startComputeMs" : 3.3, "endComputeMs" : 4.4, "startD2hMs" : 4.4, "endD2hMs" : 4.5, "h2dMs" : 0.1,'
             ' "computeMs" : 1.1, "d2hMs" : 0.1, "latencyMs" : 1.3 }\n]\n')
    assert dev.parse_trtexec_times(times) == [1.4, 1.3]
    out = '[\n  { "name" : "logits"\n  , "dimensions" : "1x3"\n  , "values" : [ 0.5, -1, 2.25 ]\n  }\n]\n'
    assert dev.parse_trtexec_output(out) == [0.5, -1, 2.25]


def test_tensorrt_on_this_machine(artifacts, tmp_path):
    dev = _device_script()
    if not (dev.tensorrt_version() and dev.find_trtexec()):
        pytest.skip("TensorRT not installed (no tensorrt / trtexec)")
    r = bench("host", fresh(artifacts, "onnx", tmp_path), **FAST)
    assert r.runtime["name"] == "tensorrt" and r.prepare["engine"] and r.drift["agreement"] >= 0.97


# ---------------------------------------------------------------- bad input never reaches a device, results never lost

@pytest.mark.parametrize("host,port,needle", [
    ("me@orin -oProxyCommand=x", 22, "is not [USER@]HOST"),
    ("-oProxyCommand=touch /tmp/pwned", 22, "is not [USER@]HOST"),
    ("me@orin", 70000, "--port 70000 is not a TCP port"),
    ("me@orin", 0, "--port 0 is not a TCP port"),
])
def test_bench_rejects_bad_destination_before_connecting(artifacts, tmp_path, host, port, needle):
    from conftest import assert_clean_error, run_cli

    art = fresh(artifacts, "onnx", tmp_path)
    before = (art / "report.json").read_bytes()
    p = run_cli("bench", art, "--target", "jetson", "--host", host, "--port", port)
    assert_clean_error(p, 2, needle)
    assert (art / "report.json").read_bytes() == before


def test_bench_results_survive_a_read_only_artifact(artifacts, tmp_path, read_only, monkeypatch):
    """report.json on a read-only file system: the bench is not lost, it is saved elsewhere and the
    exit-2 error says where."""
    art = read_only(fresh(artifacts, "onnx", tmp_path))
    before = (art / "report.json").read_bytes()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(UsageError) as e:
        bench("host", art, **FAST)
    msg = str(e.value)
    assert f"cannot merge the bench results into {art / 'report.json'}" in msg and "Read-only file system" in msg
    saved = list(work.glob("edgemix-bench-*.json"))
    assert len(saved) == 1 and str(saved[0]) in msg
    result = json.loads(saved[0].read_text())
    assert result["runner"] == "local" and result["latency_ms"]["runs"] == FAST["iterations"]
    assert (art / "report.json").read_bytes() == before

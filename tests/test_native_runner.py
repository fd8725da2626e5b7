"""Native ExecuTorch runners (edgemix.backends.executorch.native, edgemix/resources/runner/edgemix_runner.cpp): built for x86-64 and,
cross-compiled, for arm64; an INT8 fmnist .pte run natively and under qemu-user, compared with the
Python runtime; the ISA self-test that marks an emulated profile untrusted; missing/broken toolchains.

The first run downloads the executorch arm64 wheel (~18 MB) into ~/.cache/edgemix; later runs reuse
it and the built runners. The toolchain packages come from setup.sh (g++, g++-aarch64-linux-gnu,
qemu-user-static); without them the tests that need them skip, naming the package.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from edgemix.backends.executorch import native
from edgemix.errors import EXIT_TOOLCHAIN, ToolchainError

needs_gpp = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed (Debian package g++)")
needs_arm = pytest.mark.skipif(
    shutil.which("aarch64-linux-gnu-g++") is None or shutil.which("qemu-aarch64-static") is None,
    reason="arm64 toolchain not installed (Debian packages g++-aarch64-linux-gnu, qemu-user-static)")

BATCH = 2
N_IMAGES = 5  # not a multiple of the batch: the runner's zero-padding of the last batch is exercised


def _fmnist_model() -> torch.nn.Module:
    from edgemix.models import DEFAULT_WEIGHTS, build_model, load_model, resolve_spec

    if DEFAULT_WEIGHTS["fmnist"].is_file():
        return load_model("fmnist")[0]
    torch.manual_seed(0)
    model = build_model(resolve_spec("fmnist")).eval()
    # The untrained head is zero-initialised, which would make every output 0 and every comparison
    # vacuous; random head weights give logits spread like a trained model's.
    torch.nn.init.normal_(model.head.weight, std=0.1)
    torch.nn.init.normal_(model.head.bias, std=0.1)
    return model


def _images(n: int, seed: int) -> torch.Tensor:
    """Model-ready Fashion-MNIST images from the shipped sample (normalised, N x 1 x 28 x 28)."""
    from edgemix.data import load_dataset, to_model_input
    from edgemix.models import resolve_spec

    data = load_dataset("sample", split="test")
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
    return to_model_input(data.images[idx], resolve_spec("fmnist")).contiguous()


@pytest.fixture(scope="module")
def int8_program(tmp_path_factory):
    """An INT8 fmnist .pte (PT2E, XNNPACK quantizer, per-channel symmetric) and its program manager."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                         get_symmetric_quantization_config)
    from executorch.exir import to_edge_transform_and_lower
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    torch.manual_seed(0)
    model = _fmnist_model()
    example = _images(BATCH, seed=1)
    prepared = prepare_pt2e(torch.export.export(model, (example,)).module(),
                            XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True)))
    calib = _images(32, seed=2)
    for i in range(0, len(calib), BATCH):
        prepared(calib[i:i + BATCH])
    quantized = convert_pt2e(prepared)
    manager = to_edge_transform_and_lower(torch.export.export(quantized, (example,)),
                                          partitioner=[XnnpackPartitioner()]).to_executorch()
    pte = tmp_path_factory.mktemp("native") / "fmnist_int8.pte"
    pte.write_bytes(manager.buffer)
    return pte, manager


def _python_runtime(pte, x: np.ndarray) -> np.ndarray:
    """The reference: the same .pte through executorch's Python runtime, padded batches as the runner does."""
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(str(pte)).load_method("forward")
    out = []
    for i in range(0, len(x), BATCH):
        chunk = np.zeros((BATCH, *x.shape[1:]), np.float32)
        chunk[:len(x[i:i + BATCH])] = x[i:i + BATCH]
        out.append(method.execute([torch.from_numpy(chunk)])[0].numpy()[:len(x[i:i + BATCH])])
    return np.concatenate(out)


@pytest.fixture(scope="module")
def inputs_and_reference(int8_program):
    x = _images(N_IMAGES, seed=3).numpy()
    return x, _python_runtime(int8_program[0], x)


def _cosine(a, b) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ------------------------------------------------------------------------------------------ x86-64

@needs_gpp
def test_x86_runner_matches_python_runtime(int8_program, inputs_and_reference):
    x, ref = inputs_and_reference
    out, run = native.run_pte(int8_program[0], x, arch="x86_64", threads=1, warmup=1, iterations=2)
    assert out.shape == ref.shape == (N_IMAGES, 10)
    # Same XNNPACK x86 kernels and integer arithmetic as the Python runtime; only float ops outside
    # the delegate could round differently, so the fp32-vs-fp32 tolerance applies.
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    assert not run.emulated and run.cpu is None and run.threads == 1
    assert run.batch_size == BATCH and run.images == N_IMAGES
    assert len(run.run_ms) == 3 * 2  # 3 batches (2 + 2 + 1 padded) x 2 timed iterations
    assert run.repeatable and run.median_ms > 0


@needs_gpp
def test_build_is_cached_by_source_and_version():
    first = native.build_runner("x86_64")
    mtime = first.stat().st_mtime_ns
    again = native.build_runner("x86_64")
    assert again == first and again.stat().st_mtime_ns == mtime  # reused, not recompiled
    assert f"et{native.executorch_version()}" in first.parent.name
    assert (first.parent / "libexecutorch_backend_xnnpack.so").is_file()  # self-contained folder
    assert str(first).startswith(str(native.cache_dir()))


@needs_gpp
def test_bundled_program_cases_are_checked(int8_program, inputs_and_reference, tmp_path):
    from executorch.devtools import BundledProgram
    from executorch.devtools.bundled_program.config import MethodTestCase, MethodTestSuite
    from executorch.devtools.bundled_program.serialize import serialize_from_bundled_program_to_flatbuffer

    x, ref = inputs_and_reference
    good = MethodTestCase(inputs=[torch.from_numpy(x[:BATCH])], expected_outputs=[torch.from_numpy(ref[:BATCH])])
    bad = MethodTestCase(inputs=[torch.from_numpy(x[:BATCH])], expected_outputs=[torch.from_numpy(ref[:BATCH] + 1)])
    for cases, expect_pass in (([good], True), ([good, bad], False)):
        bpte = tmp_path / f"case{len(cases)}.bpte"
        bpte.write_bytes(serialize_from_bundled_program_to_flatbuffer(
            BundledProgram(int8_program[1], [MethodTestSuite(method_name="forward", test_cases=cases)])))
        res = native.run_bundled(bpte, arch="x86_64", atol=1e-5, rtol=0)  # same kernels: fp32 tolerance
        assert res.passed is expect_pass
        assert [c["pass"] for c in res.cases] == [True, False][:len(cases)]
        np.testing.assert_allclose(res.outputs[:BATCH * 10].reshape(BATCH, 10), ref[:BATCH], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- arm64

@needs_arm
def test_arm64_cortex_a76_matches_python_runtime(int8_program, inputs_and_reference):
    x, ref = inputs_and_reference
    out, run = native.run_pte(int8_program[0], x, arch="aarch64", cpu="cortex-a76", threads=1)
    assert run.emulated and run.cpu == "cortex-a76" and "asimddp" in run.cpu_features
    # NEON dotprod kernels instead of AVX ones: both accumulate int8 products exactly in int32 and
    # requantize in fp32, so outputs agree up to a rounding tie per requantization (one int8 step of a
    # layer, ~1/255 of its range); 1% of the logit range and the same classes bound that.
    span = float(np.abs(ref).max())
    assert np.abs(out - ref).max() <= 0.01 * span, np.abs(out - ref).max()
    assert _cosine(out, ref) > 0.9999
    assert (out.argmax(1) == ref.argmax(1)).all()


def _qemu_version() -> tuple[int, int]:
    text = subprocess.run(["qemu-aarch64-static", "--version"], capture_output=True, text=True).stdout
    major, minor = re.search(r"version (\d+)\.(\d+)", text).groups()
    return int(major), int(minor)


@needs_arm
def test_selftest_marks_sme_emulation_untrusted(int8_program, inputs_and_reference):
    x, ref = inputs_and_reference
    profiles = native.run_profiles(int8_program[0], x[:BATCH], ["cortex-a76", "max"])
    a76, sme = profiles["cortex-a76"].trust, profiles["max"].trust
    assert a76.trusted and ("sdot_s8", "ok", 0, 256) in a76.checks
    assert "sme" in sme.cpu_features
    out = profiles["max"].outputs
    if sme.trusted:
        # an emulator whose SMOPA is right (QEMU with the 2024 "Fix 32-bit SMOPA") must agree too
        assert _cosine(out, ref[:BATCH]) > 0.9999
    else:
        assert [c[0] for c in sme.checks if c[1] == "wrong"] == ["smopa_s8_s32"]
        assert "emulator" in sme.reason
        assert _cosine(out, ref[:BATCH]) < 0.99  # the divergence the self-test explains
    if _qemu_version() < (8, 0):
        assert not sme.trusted  # Debian 12's qemu 7.2 lacks the SMOPA fix: the known, explained case


# ------------------------------------------------------------------------------- missing toolchain

def _hide(monkeypatch, *tools):
    real = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name in tools else real(name, *a, **k))


OTHER_ARCH = "aarch64" if native.host_arch() == "x86_64" else "x86_64"


def test_missing_cross_compiler_names_the_package(monkeypatch):
    package = native.ARCHES[OTHER_ARCH].cross_package  # g++-aarch64-linux-gnu on an x86-64 host
    _hide(monkeypatch, f"{native.ARCHES[OTHER_ARCH].triplet}-g++")
    with pytest.raises(ToolchainError) as err:
        native.build_runner(OTHER_ARCH)
    assert err.value.exit_code == EXIT_TOOLCHAIN == 3
    assert package in str(err.value) and f"apt-get install {package}" in str(err.value)


def test_missing_host_compiler_names_the_package(monkeypatch):
    _hide(monkeypatch, "g++")
    with pytest.raises(ToolchainError, match=r"install the Debian package g\+\+: apt-get install g\+\+ "):
        native.build_runner(native.host_arch())


@needs_arm
def test_missing_emulator_names_the_package(monkeypatch, tmp_path):
    native.build_runner("aarch64")  # built while the emulator is still visible
    _hide(monkeypatch, "qemu-aarch64-static")
    pte = tmp_path / "never_loaded.pte"
    pte.write_bytes(b"")  # the emulator check comes before the program is read
    with pytest.raises(ToolchainError, match="qemu-user-static"):
        native.run_pte(pte, np.zeros((1, 1, 28, 28), np.float32), arch="aarch64")
    with pytest.raises(ToolchainError, match="qemu-user-static"):
        native.check_toolchain("aarch64")


@needs_arm
def test_broken_cross_compiler_is_a_toolchain_error(monkeypatch, tmp_path):
    fake = tmp_path / "bin" / "aarch64-linux-gnu-g++"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo broken-g++ 0; exit 0; }\n"
                    "echo 'cc1plus: fatal error: cannot execute' >&2; exit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    with pytest.raises(ToolchainError) as err:
        native.build_runner("aarch64", force=True)
    assert "g++-aarch64-linux-gnu" in str(err.value) and "cannot execute" in str(err.value)
    assert not any(p.name.startswith(".build-") for p in (native.cache_dir() / "runners").iterdir())

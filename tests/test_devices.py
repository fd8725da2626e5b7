"""Which device does which part of a build (edgemix.devices): the logic with CUDA absent and with a
stated fake, and the real thing on a CUDA machine."""

import pytest
import torch

from edgemix import devices
from edgemix.errors import UsageError

ROLES = ("reference", "calibration", "qat")


def test_auto_without_cuda_runs_everything_on_the_cpu():
    p = devices.plan("auto", cuda=False)
    assert [p[r] for r in ROLES] == ["cpu"] * 3 and p["artifact"] == "cpu" and p["cuda_name"] is None
    assert p["cpu_name"]


def test_auto_with_cuda_moves_the_fp32_work_and_keeps_the_artifact_on_the_cpu():
    p = devices.plan("auto", cuda=True, cuda_name="NVIDIA H200 (stated)")
    assert [p[r] for r in ROLES] == ["cuda"] * 3
    assert p["artifact"] == "cpu" and p["cuda_name"] == "NVIDIA H200 (stated)"


def test_cpu_can_be_forced_on_a_cuda_machine():
    p = devices.plan("cpu", cuda=True, cuda_name="x")
    assert [p[r] for r in ROLES] == ["cpu"] * 3 and p["cuda_name"] is None


def test_cuda_without_a_gpu_and_unknown_names_are_usage_errors():
    with pytest.raises(UsageError, match="no CUDA device is visible"):
        devices.plan("cuda", cuda=False)
    with pytest.raises(UsageError, match="did you mean 'cuda'"):
        devices.plan("cdua", cuda=True, cuda_name="x")


def test_to_device_is_a_no_op_on_the_cpu():
    t = torch.ones(2)
    assert devices.to_device(t, "cpu") is t


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (FP32 work on the GPU)")
def test_phone_and_jetson_builds_do_the_fp32_work_on_cuda(tmp_path):
    """On a CUDA machine: the reference, calibration and QAT run there, the report says so, and the
    artifact (verified on the host CPU) still agrees with the FP32 reference."""
    import json

    from conftest import run_cli

    for target in ("phone", "jetson"):
        out = tmp_path / target
        p = run_cli("build", "--target", target, "--device", "cuda", "--qat-epochs", "0.05", "--eval-limit", "200",
                    "--latency-runs", "5", "--latency-seconds", "0", "--no-isa-check", "--out", out)
        assert p.returncode == 0, p.stdout + p.stderr
        r = json.loads((out / "report.json").read_text())
        assert [r["devices"][k] for k in ROLES] == ["cuda"] * 3 and r["devices"]["artifact"] == "cpu"
        assert r["reference"]["device"] == "cuda" and r["drift"]["agreement"] >= 0.95


XEON_AMX = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8 avx_vnni
"""
EPYC = """model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx2 fma
"""
ORIN = """processor\t: 0
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
"""


@pytest.mark.parametrize("text, isa", [
    (XEON_AMX, ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"]),
    (EPYC, ["avx2"]),
    (ORIN, ["asimddp"]),
    ("", []),
])
def test_host_facts_name_the_int8_and_bf16_instruction_sets(text, isa):
    """Reports, the suite and the device script record these beside every figure (the same INT8
    program is 0.19x torch eager on one x86 host and 0.32x on another with AMX)."""
    from edgemix.resources import device_script

    assert device_script().isa_features(text) == isa


def test_machine_facts_carry_isa_and_threads():
    from edgemix.verify.report import machine_facts

    facts = machine_facts()
    assert isinstance(facts["isa"], list) and facts["torch_threads"] == torch.get_num_threads() and facts["cpu"]

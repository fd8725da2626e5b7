"""The Mixer's relatives through both targets, end to end through the real command: phone builds
of CycleMLP and ConvMixer and jetson builds of all three (their small Fashion-MNIST variants, random
weights: this checks the lowering and the proof on the written artifact), and the trained
checkpoints shipped for each."""

import json
import platform

import onnx
import pytest

from conftest import run_cli
from edgemix.backends.onnx_graph import op_counts
from edgemix.backends.tensorrt import ort_session
from edgemix.resources import device_script

FAST = ("--random-weights", "--eval-limit", "100", "--latency-runs", "5", "--latency-seconds", "0")


def _build(tmp_path, model, target, *extra):
    out = tmp_path / f"{model}_{target}"
    p = run_cli("build", "--target", target, "--model", model, *FAST, *extra, "--out", out)
    assert p.returncode == 0, p.stdout + p.stderr
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("model", ["cyclemlp-fmnist", "convmixer-fmnist"])
def test_relatives_phone_build_is_one_xnnpack_delegate(tmp_path, model):
    r = _build(tmp_path, model, "phone", "--no-isa-check")  # the arm64 emulation: tests/test_build.py
    dele = r["details"]["delegation"]
    assert r["model"] == model and r["backend"] == "executorch"
    assert dele["partitions"] == 1 and dele["not_delegated"] == [] and dele["all_linear_conv_delegated"]
    if model == "cyclemlp-fmnist":
        assert "LayerNorms as linear-mean/sub/mul/rsqrt" in r["details"]["export_rewrite"]
    else:  # ConvMixer's depthwise branches and affines stay in float, and still run inside the delegate;
        # its 1x1 convs and head are dynamically quantized GEMMs by default (the stem conv stays float)
        assert ("left in float by the INT8 quantizer: DepthwiseBranch, ChannelAffine; activations: dynamic, "
                "the family's default") in r["details"]["export_rewrite"]
        assert "at run time" in r["quantization"]["scheme"] and r["quantization"]["calibration_images"] == 0
        assert r["fp32_comparison"]["float_fallback"]["Conv2d"] == 7
    # random weights: the INT8 program still computes nearly the FP32 function (cosine), measured on the .pte
    assert r["drift"]["samples"] == 100 and r["drift"]["cosine_mean"] > 0.95
    assert r["latency_ms"]["p50"] > 0 and r["fp32_comparison"]["size_ratio"] < 0.5


@pytest.mark.parametrize("model", ["vip-fmnist", "convmixer-fmnist", "cyclemlp-fmnist"])
def test_relatives_jetson_build_passes_the_tensorrt_check(tmp_path, model):
    """CycleMLP: its fixed shift kernels are Constant nodes shared by the blocks of a stage; onnxsim
    merges their identical Q/DQ pairs and the layout pass stores them as INT8 weights."""
    r = _build(tmp_path, model, "jetson")
    assert r["provenance"]["weights_format"] == "random-init"
    compat = r["details"]["compat"]
    assert compat["ok"] and compat["qdq_pairs"] > 0 and compat["int8_weights"] > 0
    assert r["drift"]["cosine_mean"] > 0.95 and r["latency_ms"]["p50"] > 0
    # ConvMixer's and CycleMLP's Conv outputs are quantized too (the family's choice), so that
    # onnxruntime, the host proxy, runs every Conv as an integer kernel
    quant, artifact = r["quantization"], tmp_path / f"{model}_jetson" / r["artifact"]["files"]["model"]["name"]
    if model == "vip-fmnist":
        assert quant["conv_outputs"] is False and "Conv outputs" not in quant["scheme"]
        return
    convs = r["details"]["onnx"]["ops"]["Conv"]
    assert quant["conv_outputs"] is True and quant["conv_outputs_quantized"] == convs
    assert quant["scheme"].endswith("and on Conv outputs")
    ort_session(artifact, 1, tmp_path / "optimized.onnx")
    ops = op_counts(onnx.load(str(tmp_path / "optimized.onnx")))
    if platform.machine().lower() in device_script().X86_MACHINES:  # uint8 form: QLinearConv on x86
        assert ops["QLinearConv"] == convs and ops["Conv"] == 0, ops
    if model == "convmixer-fmnist":  # its BatchNorms as Mul + Add: the NHWC Transposes cancel
        assert ops["BatchNormalization"] == 0 and ops["Transpose"] <= 2, ops


# full Fashion-MNIST test set (10,000 images), host CPU: edgemix eval --model ALIAS --data fashion-mnist
SHIPPED_TOP1 = {"convmixer-fmnist": 0.9085, "vip-fmnist": 0.9333, "cyclemlp-fmnist": 0.9134}


@pytest.mark.parametrize("model", sorted(SHIPPED_TOP1))
def test_shipped_relatives_are_trained(model):
    """Each relative's shipped checkpoint, used when --weights is left out, on the 1,000-image sample:
    far above chance (random weights give about 10%) and within 2.5 points of its full-set figure
    (the sample's own spread: 1,000 images give a standard error of about 0.9 point)."""
    p = run_cli("eval", "--model", model, "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["samples"] == 1000 and r["weights"].endswith(f"{model}.pt")
    assert abs(r["top1"] - SHIPPED_TOP1[model]) < 0.025, r["top1"]

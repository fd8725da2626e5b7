"""The TensorRT backend: QDQ ONNX (PTQ and QAT), the compatibility check, the device build script,
the onnxruntime host proxy and the per-layer sensitivity fallback.

TensorRT itself cannot run here; the engine build is tested only where ``tensorrt`` imports next
to a CUDA GPU, and skipped elsewhere with that reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgemix.backends.base import BuildJob, batched_predict, get_backend
from edgemix.backends.onnx_graph import op_counts
from edgemix.backends.tensorrt.export import check_dq_kept, export_onnx, simplify_onnx
from edgemix.backends.tensorrt import OnnxRuntimePredictor, tensorrt_status
from edgemix.backends.tensorrt.rules import check_tensorrt_compat
from edgemix.config import resolve_recipe, resolve_target
from edgemix.data import load_dataset, stratified_indices, to_model_input
from edgemix.errors import UsageError
from edgemix.backends.tensorrt import qdq, sensitivity
from edgemix.train import TrainConfig, fit, seed_everything

TRT_OK, TRT_WHY = tensorrt_status()


# ---------------------------------------------------------------- shared fixtures

@pytest.fixture(scope="module")
def fmnist():
    """The shipped fmnist checkpoint, else a model trained briefly (6 steps) on the shipped sample:
    enough for non-trivial logits, which is all drift checks need."""
    from edgemix.models import DEFAULT_WEIGHTS, build_model, load_model, resolve_spec

    if DEFAULT_WEIGHTS["fmnist"].is_file():
        return load_model("fmnist")[0]
    seed_everything(0)
    spec = resolve_spec("fmnist")
    model = build_model(spec)
    train = load_dataset("sample", "train")
    train = train.subset(stratified_indices(train.labels, 384, 0))
    fit(model, list(model.parameters()), spec, train,
        TrainConfig(epochs=1.0, batch_size=64, lr=3e-3, warmup_epochs=0.2, augment=False))
    return model.eval()


@pytest.fixture(scope="module")
def data(fmnist):
    spec = fmnist.spec
    train, test = load_dataset("sample", "train"), load_dataset("sample", "test")
    calib = to_model_input(train.images[stratified_indices(train.labels, 128, 0)], spec)
    evaluation = to_model_input(test.images[stratified_indices(test.labels, 300, 0)], spec)
    return {"train": train, "calib": calib, "eval": evaluation}


def make_job(model, data, tmp: Path, precision="int8", **kw) -> BuildJob:
    target = resolve_target("jetson")  # batch_sizes [1, 8]: dynamic batch, profile 1/1/8
    return BuildJob(model=model, spec=model.spec, target=target, precision=precision,
                    recipe=resolve_recipe("default"), calib_inputs=data["calib"], stage_dir=tmp,
                    basename=f"fmnist_jetson_{precision}", **kw)


@pytest.fixture(scope="module")
def int8_build(fmnist, data, tmp_path_factory):
    seed_everything(0)
    backend = get_backend("tensorrt")
    stages = []
    job = make_job(fmnist, data, tmp_path_factory.mktemp("int8"), stage=lambda *a: stages.append(a))
    artifact = backend.build(job)
    return backend, artifact, stages


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# ---------------------------------------------------------------- PTQ build

def test_int8_build_writes_checked_qdq_onnx(int8_build, fmnist):
    _, art, stages = int8_build
    assert [s[0] for s in stages] == ["calibrate", "export", "trt-check", "engine"]  # one line per stage
    proto = onnx.load(str(art.files["model"]))
    onnx.checker.check_model(proto, full_check=True)
    assert art.runtime == "onnxruntime" and art.batch_size == 1 and art.dynamic_batch
    assert art.details["compat"]["ok"] and art.files["compat"].is_file()
    report = check_tensorrt_compat(proto, "10.3", precision="int8", batch_range=(1, 1, 8))
    assert report.ok, report.format()
    assert not list(art.files["model"].parent.glob(".*tmp*"))  # temp names were all renamed away
    # every quantized weight ships as INT8: the file is little more than a quarter of the FP32 parameters
    assert report.int8_weights == len(qdq.quantizable_layers(fmnist))
    fp32_bytes = 4 * sum(p.numel() for p in fmnist.parameters())
    assert art.files["model"].stat().st_size < 0.35 * fp32_bytes


def test_qdq_layout_is_what_tensorrt_wants(int8_build, fmnist):
    _, art, _ = int8_build
    proto = onnx.load(str(art.files["model"]))
    rows = qdq.qdq_layout(proto)
    gemms = [r for r in rows if r["weight_quantized"]]
    # every Linear and the patch Conv: weight and input both through Q/DQ
    assert len(gemms) == len(qdq.quantizable_layers(fmnist)) == art.quantization["quantized_layers"]
    for r in gemms:
        w, a = r["weight"], r["activation"]
        assert w["per_channel"] and w["axis"] == r["weight_expected_axis"], r
        assert not a["per_channel"], r
        assert w["zero_point_zero"] and a["zero_point_zero"] and w["dtype"] == a["dtype"] == "INT8", r
        assert w["scale_min"] > 0 and a["scale_min"] > 0
    # torch's weight transposes were folded: MatMul weights are (in, out) with the DQ axis on 1
    assert any(r["op"] == "MatMul" and r["weight_expected_axis"] == 1 for r in gemms)
    producers = {o: n for n in proto.graph.node for o in n.output}
    assert all(producers[n.input[1]].op_type == "DequantizeLinear" for n in proto.graph.node if n.op_type == "MatMul")
    folded = [f for f in art.quantization["layout_fixes"] if f.startswith("folded weight transpose")]
    assert len(folded) == sum(r["op"] == "MatMul" for r in gemms)
    # LayerNorm and GELU (Erf) stay float: nothing quantizes their inputs
    counts = op_counts(proto)
    assert counts["LayerNormalization"] == 2 * fmnist.spec.depth + 1 and counts["Erf"] == 2 * fmnist.spec.depth
    assert art.details["float_ops"]["LayerNormalization"] == counts["LayerNormalization"]


def test_onnxruntime_proxy_matches_fp32(int8_build, fmnist, data):
    backend, art, _ = int8_build
    pred = backend.load_predictor(art, threads=2)
    x = data["eval"].numpy()
    out = batched_predict(pred, x)
    with torch.no_grad():
        ref = fmnist(data["eval"]).numpy()
    cos = cosines(out, ref)
    agree = float((out.argmax(1) == ref.argmax(1)).mean())
    # int8 vs fp32: per-channel INT8 on 18 GEMMs moves logits by ~1e-3 relative (measured mean
    # cosine 0.99998); bounds leave room for other seeds/checkpoints but catch a broken scale/axis,
    # which drops the cosine below 0.9. Agreement: the jetson profile's budget (0.97).
    assert cos.mean() > 0.999 and cos.min() > 0.99, (cos.mean(), cos.min())
    assert agree >= 0.97
    # the dynamic batch axis really takes other batch sizes
    assert pred(x[:5]).shape == (5, fmnist.spec.num_classes)
    np.testing.assert_allclose(pred(x[:5]), out[:5], rtol=1e-4, atol=1e-4)  # same kernels, batch-size rounding only


@pytest.mark.skipif(TRT_OK, reason="TensorRT and a GPU are here: the engine is built, not scripted "
                                    "(test_engine_built_with_tensorrt_api)")
def test_build_engine_script_has_the_trtexec_flags(int8_build):
    _, art, _ = int8_build
    engine = art.details["engine"]
    assert engine["status"] == "to_build_on_device" and engine["reason"] == TRT_WHY
    script = art.files["engine_script"].read_text()
    for flag in ("--onnx=fmnist_jetson_int8.onnx", "--int8", "--fp16", "--minShapes=input:1x1x28x28",
                 "--optShapes=input:1x1x28x28", "--maxShapes=input:8x1x28x28", "--memPoolSize=workspace:1024",
                 "--timingCacheFile=fmnist_jetson_int8.timing.cache", "--saveEngine=fmnist_jetson_int8.engine.partial",
                 "mv -f fmnist_jetson_int8.engine.partial fmnist_jetson_int8.engine"):
        assert flag in script, flag
    assert os.access(art.files["engine_script"], os.X_OK)
    assert subprocess.run(["bash", "-n", str(art.files["engine_script"])]).returncode == 0


def _fake_tools(folder: Path, trt="10.3.0.30-1+cuda12.5", jetpack="6.1+b123", with_trtexec=True) -> dict:
    """A PATH with fake dpkg-query (the versions) and trtexec (records its arguments)."""
    folder.mkdir(exist_ok=True)
    (folder / "dpkg-query").write_text(f"""#!/bin/sh
case "$*" in *libnvinfer-bin|*tensorrt) printf '%s' '{trt}' ;; *nvidia-jetpack*) printf '%s' '{jetpack}' ;; *) exit 1 ;; esac
""")
    if with_trtexec:
        (folder / "trtexec").write_text('#!/bin/sh\necho "$@" > trtexec.args\n'
                                        'for a in "$@"; do case "$a" in --saveEngine=*) touch "${a#*=}";; esac; done\n')
    for f in folder.iterdir():
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "TRTEXEC"}
    env["PATH"] = f"{folder}:/usr/bin:/bin"
    return env


@pytest.mark.skipif(Path("/usr/src/tensorrt/bin/trtexec").exists(), reason="a real trtexec is installed")
def test_build_engine_script_checks_the_device(int8_build, tmp_path):
    _, art, _ = int8_build
    script = art.files["engine_script"]
    run = lambda env: subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,  # noqa: E731
                                     cwd=tmp_path)
    r = run(_fake_tools(tmp_path / "none", with_trtexec=False))
    assert r.returncode == 3 and "trtexec not found" in r.stderr and "/usr/src/tensorrt/bin/trtexec" in r.stderr
    r = run(_fake_tools(tmp_path / "old", trt="8.6.2.3-1+cuda11.4"))
    assert r.returncode == 3 and "TensorRT 10.3" in r.stderr and "8.6.2" in r.stderr
    r = run(_fake_tools(tmp_path / "jp", jetpack="5.1.2-b104"))
    assert r.returncode == 3 and "JetPack 6.1" in r.stderr and "5.1.2" in r.stderr
    r = run(_fake_tools(tmp_path / "ok"))
    assert r.returncode == 0, r.stderr
    folder = script.parent
    try:
        args = (folder / "trtexec.args").read_text()
        assert "--int8 --fp16" in args and "--maxShapes=input:8x1x28x28" in args
        # the provenance record the device runner checks before loading the engine: its format, and
        # accepted for this machine's facts and the build's flags, refused for a --no-fp16 run
        from edgemix.resources import device_script

        dev = device_script()
        record = json.loads((folder / "fmnist_jetson_int8.engine.json").read_text())
        assert record["tensorrt"] == "10.3.0.30-1+cuda12.5" and record["precision"] == "int8" and record["fp16"]
        expected = dev.engine_provenance("10.3.0.30-1+cuda12.5", "unknown-gpu", None, None, "int8", True,
                                         dev.file_sha256(str(art.files["model"])), record["batch_range"])
        engine = str(folder / "fmnist_jetson_int8.engine")
        assert dev.engine_mismatches(engine, expected) == []
        assert "fp16" in dev.engine_mismatches(engine, {**expected, "fp16": False})[0]
        assert (folder / "fmnist_jetson_int8.engine").is_file()  # renamed from .partial after trtexec succeeded
        assert not list(folder.glob("*.partial"))
    finally:
        for name in ("trtexec.args", "fmnist_jetson_int8.engine", "fmnist_jetson_int8.engine.json"):
            (folder / name).unlink(missing_ok=True)


def test_static_batch_qdq_runs_integer_gemms_on_the_host(fmnist, data, tmp_path):
    """A static-shape QDQ graph must not lose its INT8 GEMMs to onnxruntime's MatMul+Add -> Gemm fusion."""
    from edgemix.backends.tensorrt import ort_session

    job = make_job(fmnist, data, tmp_path / "build")
    job.target = job.target.model_copy(update={"batch_sizes": [1]})
    art = get_backend("tensorrt").build(job)
    assert not art.dynamic_batch
    exported = op_counts(onnx.load(str(art.files["model"])))
    optimized = tmp_path / "optimized.onnx"
    ort_session(art.files["model"], 1, optimized)
    ops = onnx.load(str(optimized)).graph.node
    integer = sum(n.op_type in ("MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger") for n in ops)
    assert integer == exported["MatMul"], op_counts(onnx.load(str(optimized)))


def test_fp16_build_is_plain_fp32_onnx(fmnist, data, tmp_path):
    art = get_backend("tensorrt").build(make_job(fmnist, data, tmp_path, precision="fp16"))
    proto = onnx.load(str(art.files["model"]))
    assert not {"QuantizeLinear", "DequantizeLinear"} & set(op_counts(proto))
    engine = art.details["engine"]
    if TRT_OK:  # an FP16 engine was built here
        assert engine["status"] == "built" and art.files["engine"].stat().st_size > 0
    else:
        flags = engine["command"]
        assert "--fp16" in flags and "--int8" not in flags
    pred = get_backend("tensorrt").load_predictor(art, threads=2)
    with torch.no_grad():
        ref = fmnist(data["eval"][:16]).numpy()
    np.testing.assert_allclose(pred(data["eval"][:16].numpy()), ref, rtol=1e-4, atol=1e-5)  # fp32 vs fp32


def test_backend_options():
    from edgemix.backends.tensorrt import qdq_settings

    backend = get_backend("tensorrt")
    s = qdq_settings(backend.parse_options({"keep_fp32": "head, blocks.0.mlp_tokens.fc2", "smooth_quant": "0.5",
                                            "bias_correction": "true"}))
    assert s.keep_fp32 == ("head", "blocks.0.mlp_tokens.fc2") and s.smooth_quant == 0.5 and s.bias_correction
    assert qdq_settings(backend.parse_options({})) == qdq.QDQSettings()
    assert backend.parse_options({"keep_fp32": ["head"], "bias_correction": True}).keep_fp32 == ("head",)
    with pytest.raises(UsageError, match="did you mean 'keep_fp32'"):
        backend.parse_options({"keep_fp23": ["head"]})
    with pytest.raises(UsageError, match="smooth_quant='2'.*less than or equal to 1"):
        backend.parse_options({"smooth_quant": "2"})
    # one boolean rule for every backend: the same strings mean the same thing
    et = get_backend("executorch")
    for text, value in (("true", True), ("on", True), ("1", True), ("no", False), ("off", False)):
        assert backend.parse_options({"bias_correction": text}).bias_correction is value
        assert et.parse_options({"patch_linear": text}).patch_linear is value
    with pytest.raises(UsageError, match="patch_linear='maybe'"):
        et.parse_options({"patch_linear": "maybe"})


def test_request_checks():
    backend, target = get_backend("tensorrt"), resolve_target("jetson")
    with pytest.raises(UsageError, match="precision"):
        backend.check_request(target, "int4", 0)
    with pytest.raises(UsageError, match="int8"):
        backend.check_request(target, "fp16", 1.0)
    backend.check_request(target, "int8", 0.5)  # QAT + dynamic batch are declared


@pytest.mark.skipif(not TRT_OK, reason=TRT_WHY)
@pytest.mark.tensorrt
def test_engine_built_with_tensorrt_api(int8_build):
    import tensorrt as trt

    _, art, _ = int8_build
    engine = art.details["engine"]
    assert engine["status"] == "built" and art.files["engine"].stat().st_size > 0
    assert art.files["timing_cache"].is_file() and engine["profile"] == {"min": 1, "opt": 1, "max": 8}
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    assert runtime.deserialize_cuda_engine(art.files["engine"].read_bytes()) is not None


# ---------------------------------------------------------------- QAT

def test_qat_build(fmnist, data, tmp_path):
    seed_everything(0)
    train = data["train"].subset(stratified_indices(data["train"].labels, 64, 1))
    job = make_job(fmnist, data, tmp_path, qat_epochs=1.0, train_set=train,
                   train_config=TrainConfig(epochs=1.0, batch_size=32, lr=1e-4, warmup_epochs=0.0, augment=False))
    job.calib_inputs = data["calib"][:32]
    art = get_backend("tensorrt").build(job)
    assert art.quantization["qat"]["steps"] == 2 and art.quantization["qat_epochs"] == 1.0
    proto = onnx.load(str(art.files["model"]))
    assert check_tensorrt_compat(proto, "10.3", precision="int8", batch_range=(1, 1, 8)).ok
    assert all(r["weight"]["per_channel"] for r in qdq.qdq_layout(proto) if r["weight_quantized"])
    out = get_backend("tensorrt").load_predictor(art, 2)(data["eval"][:64].numpy())
    with torch.no_grad():
        ref = fmnist(data["eval"][:64]).numpy()
    # two fine-tuning steps at lr 1e-4 move weights a little: the model still tracks FP32 closely
    assert np.isfinite(out).all() and cosines(out, ref).mean() > 0.99


# ---------------------------------------------------------------- sensitivity and fallback

def test_sensitivity_ranks_layers_and_fallback_meets_budget(int8_build, fmnist, data):
    from edgemix.config import DriftBudget

    _, art, _ = int8_build
    proto = onnx.load(str(art.files["model"]))
    x = data["eval"][:64]
    with torch.no_grad():
        ref = fmnist(x).numpy()

    def evaluate(pred):  # what the pipeline passes: its drift measurement on a predictor
        out = batched_predict(pred, x.numpy())
        return {"cosine_mean": float(cosines(out, ref).mean()),
                "agreement": float((out.argmax(1) == ref.argmax(1)).mean())}

    # a budget the full-INT8 graph misses on purpose (cosine above what it reaches), met once the
    # most sensitive layers are FP32: the fallback keeps them in ranking order and stops there
    full = evaluate(OnnxRuntimePredictor(proto, 2, 1, True))["cosine_mean"]
    budget = DriftBudget(min_cosine=1 - (1 - full) / 2, min_agreement=0.0)
    result = sensitivity.plan_fallback(art.files["model"], fmnist, x, budget, evaluate)
    ranked = [r["layer"] for r in result["ranking"]]
    drifts = [r["drift"] for r in result["ranking"]]
    assert sorted(ranked) == sorted(qdq.quantizable_layers(fmnist))
    assert drifts == sorted(drifts, reverse=True) and drifts[0] > 0 and "| 1 |" in result["table_md"]
    assert result["met"] and result["keep_fp32"] == ranked[:len(result["keep_fp32"])]
    assert 1 <= len(result["keep_fp32"]) < len(ranked) and not result["steps"][0]["met"]
    assert result["steps"][-1]["cosine_mean"] >= budget.min_cosine

    # with every layer's Q/DQ removed the graph is the FP32 model again (weights restored): fp32 vs fp32
    plain = sensitivity.strip_qdq(proto, ranked, fmnist.state_dict())
    assert not {"QuantizeLinear", "DequantizeLinear"} & set(op_counts(plain))
    np.testing.assert_allclose(OnnxRuntimePredictor(plain, 2, 1, True)(x.numpy()), ref, rtol=1e-5, atol=1e-5)
    assert sensitivity.meets_budget({"top1_delta": -0.5, "agreement": 0.99, "cosine_mean": 0.999}, DriftBudget())
    assert not sensitivity.meets_budget({"top1_delta": -1.5}, DriftBudget())


def test_keep_fp32_excludes_layers_via_nncf(fmnist, data):
    q = qdq.quantize_ptq(fmnist, data["calib"][:32], resolve_recipe("default"),
                         qdq.QDQSettings(keep_fp32=("head", "blocks.0.mlp_tokens.fc2")))
    proto, _ = qdq.export_qdq(q, fmnist.spec, batch=1, dynamic_batch=False, opset=17)
    quantized = {r["layer"] for r in qdq.qdq_layout(proto) if r["weight_quantized"]}
    assert quantized == set(qdq.quantizable_layers(fmnist)) - {"head", "blocks.0.mlp_tokens.fc2"}
    with pytest.raises(UsageError, match="did you mean"):
        qdq.quantize_ptq(fmnist, data["calib"][:8], resolve_recipe("default"), qdq.QDQSettings(keep_fp32=("heda",)))


@pytest.mark.parametrize("alias,keep", [
    ("cyclemlp-fmnist", ("network.2.0.attn.proj", "network.0.1.mlp.fc2", "network.1.proj", "network.0.1.attn.sfc_w")),
    ("vip-fmnist", ("network.2.1.attn.mlp_h", "network.0.0.mlp.fc1", "head")),
])
def test_keep_fp32_finds_layers_nested_in_stages(alias, keep):
    """CycleMLP's and ViP's stages are Sequentials in a ModuleList, and NNCF names their ops by call
    scope (network.2.0.attn.proj is "0/attn/proj/linear/1"): the layers are found by the weight they
    read. A CycleFC (its own weight, applied with F.conv2d) is a layer too; its fixed one-hot shift
    kernel, exact in INT8 and no module's weight, is not one."""
    from edgemix.models import build_model, resolve_spec

    torch.manual_seed(0)
    model = build_model(resolve_spec(alias)).eval()
    assert len(qdq.quantizable_layers(model)) == 35 and set(keep) <= set(qdq.quantizable_layers(model))
    q = qdq.quantize_ptq(model, torch.randn(8, 1, 28, 28), resolve_recipe("default"), qdq.QDQSettings(keep_fp32=keep))
    proto, _ = qdq.export_qdq(q, model.spec, batch=1, dynamic_batch=False, opset=17)
    quantized = {r["layer"] for r in qdq.qdq_layout(proto) if r["weight_quantized"]}
    modules = set(qdq.quantizable_layers(model))
    assert modules & quantized == modules - set(keep)


# ---------------------------------------------------------------- hand-made graphs: check and fixes

def qdq_matmul(*, act_zp=0, act_scale=0.05, w_scale=None, w_axis=1, act_per_channel=False, extra=None,
               shape=(1, 4), opset=17, zp_type=TensorProto.INT8, drop_zp=False) -> onnx.ModelProto:
    """input -> Q/DQ -> MatMul(W through Q/DQ) -> logits; one knob per TensorRT rule."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    w_scale = np.full(3, 0.02, np.float32) if w_scale is None else np.asarray(w_scale, np.float32)
    a_scale = np.full(4, act_scale, np.float32) if act_per_channel else np.array(act_scale, np.float32)
    np_zp = {TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8}[zp_type]
    a_zp = np.full(a_scale.shape, act_zp, np_zp)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(w_scale, "w_scale"),
             numpy_helper.from_array(np.zeros(w_scale.shape, np.int8), "w_zp"),
             numpy_helper.from_array(a_scale, "a_scale"), numpy_helper.from_array(a_zp, "a_zp")]
    a_args = ["a_scale"] if drop_zp else ["a_scale", "a_zp"]
    axis = {"axis": 1} if act_per_channel else {}
    nodes = [helper.make_node("QuantizeLinear", ["input", *a_args], ["xq"], name="act_q", **axis),
             helper.make_node("DequantizeLinear", ["xq", *a_args], ["xdq"], name="act_dq", **axis),
             helper.make_node("QuantizeLinear", ["W", "w_scale", "w_zp"], ["wq"], name="w_q", axis=w_axis),
             helper.make_node("DequantizeLinear", ["wq", "w_scale", "w_zp"], ["wdq"], name="w_dq", axis=w_axis),
             helper.make_node("MatMul", ["xdq", "wdq"], ["mm"], name="fc")]
    out = "mm"
    if extra:
        nodes.append(helper.make_node(extra, ["mm"], ["extra_out"], name=f"bad_{extra.lower()}"))
        out = "extra_out"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None if extra else [shape[0], 3])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_good_handmade_graph_passes():
    report = check_tensorrt_compat(qdq_matmul(), "10.3")
    assert report.ok, report.format()
    assert report.qdq_pairs == 2 and report.checked_against == "10.x"


@pytest.mark.parametrize("model, rule, named", [
    (qdq_matmul(act_zp=3), "qdq-zero-point", "act_q"),
    (qdq_matmul(w_scale=[0.02, -0.01, 0.02]), "qdq-scale", "w_dq"),
    (qdq_matmul(w_scale=[0.02, 0.0, 0.02]), "qdq-scale", "w_q"),
    (qdq_matmul(extra="Unique"), "unsupported-op", "bad_unique"),
    (qdq_matmul(shape=("n", 4)), "shape", "input"),  # no profile bounds the batch axis
    (qdq_matmul(shape=(1, "features")), "shape", "input"),
    (qdq_matmul(zp_type=TensorProto.UINT8), "qdq-type", "act_dq"),
    (qdq_matmul(drop_zp=True), "qdq-type", "act_q"),  # no zero point = uint8
    (qdq_matmul(w_axis=0, w_scale=[0.02] * 4), "qdq-axis", "w_dq"),  # input channels, not output
    (qdq_matmul(act_per_channel=True), "qdq-axis", "act_q"),
    (qdq_matmul(opset=21), "opset", None),
])
def test_bad_graphs_are_rejected_with_the_node_named(model, rule, named):
    report = check_tensorrt_compat(model, "10.3", precision="int8")
    assert not report.ok
    hits = [i for i in report.issues if i.rule == rule]
    assert hits, report.format()
    if named:
        assert any(named in n for i in hits for n in i.nodes), report.format()
    assert all(i.fix for i in report.issues)
    with pytest.raises(UsageError) as e:
        report.raise_if_failed()
    assert rule in str(e.value) and (named is None or named in str(e.value))


def test_version_tables():
    assert check_tensorrt_compat(qdq_matmul(extra="Gelu", opset=20), "10.3").ok
    r = check_tensorrt_compat(qdq_matmul(extra="Gelu", opset=17), "8.6")
    assert [i.rule for i in r.issues] == ["unsupported-op"] and r.issues[0].nodes == ["bad_gelu"]
    r = check_tensorrt_compat(qdq_matmul(extra="LayerNormalization"), "8.5")
    assert "opset <= 16" in r.issues[0].fix
    assert check_tensorrt_compat(qdq_matmul(shape=("batch", 4)), "10.3", batch_range=(1, 1, 8)).ok


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return OnnxRuntimePredictor(model, 1, len(x), False)(x)


def test_layout_fix_folds_weight_transpose_and_keeps_numbers():
    """torch's Linear export (DQ(W (out,in), axis 0) -> Transpose -> MatMul) becomes TensorRT's form."""
    m = qdq_matmul(w_axis=0, w_scale=[0.02] * 4)  # W (4, 3) read as torch's (out=4, in=3) ...
    g = m.graph
    g.node[4].input[1] = "wT"  # ... transposed in the graph before the MatMul
    g.node.insert(4, helper.make_node("Transpose", ["wdq"], ["wT"], name="w_transpose", perm=[1, 0]))
    g.input[0].type.tensor_type.shape.dim[1].dim_value = 3
    x = np.random.default_rng(1).standard_normal((1, 3)).astype(np.float32)
    before = _ort(m, x)
    # TensorRT follows the scale axis through the Transpose (axis 0 of W = axis 1 of W^T): valid
    # as exported; the fold only makes it explicit for TensorRT's and onnxruntime's pattern matchers
    assert check_tensorrt_compat(m, "10.3").ok
    wrong = onnx.ModelProto()
    wrong.CopyFrom(m)
    for n in wrong.graph.node:
        if n.name in ("w_q", "w_dq"):
            n.attribute[0].i = 1  # scales on the input channels (3 of them) instead
    wrong.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.full(3, 0.02, np.float32), "w_scale"))
    wrong.graph.initializer[2].CopyFrom(numpy_helper.from_array(np.zeros(3, np.int8), "w_zp"))
    issues = check_tensorrt_compat(wrong, "10.3").issues
    assert [i.rule for i in issues] == ["qdq-axis"] and "w_dq" in issues[0].nodes[0]
    fixed, fixes = qdq.to_tensorrt_layout(m)
    assert len(fixes) == 2 and "w_transpose" in fixes[0] and "INT8" in fixes[1]
    assert "Transpose" not in op_counts(fixed) and check_tensorrt_compat(fixed, "10.3").ok, \
        check_tensorrt_compat(fixed, "10.3").format()
    np.testing.assert_allclose(_ort(fixed, x), before, rtol=1e-6, atol=1e-6)  # same math, new layout


def test_layout_fix_turns_uint8_pairs_into_int8():
    m = qdq_matmul(zp_type=TensorProto.UINT8, act_scale=0.01)
    x = np.abs(np.random.default_rng(2).standard_normal((1, 4))).astype(np.float32)  # uint8 covers x >= 0 only
    before = _ort(m, x)
    fixed, fixes = qdq.to_tensorrt_layout(m)
    assert any("uint8" in f for f in fixes) and check_tensorrt_compat(fixed, "10.3").ok
    # int8 over the same range has half the resolution: within one (new) quantization step per input
    step = 0.01 * 255 / 127
    w = numpy_helper.to_array(qdq_matmul().graph.initializer[0])  # fixed in place: W is INT8 there now
    np.testing.assert_allclose(_ort(fixed, x), before, atol=step * np.abs(w).sum(0).max())


def test_weights_are_stored_int8_with_the_same_numbers():
    """Q(FP32 W) -> DQ becomes INT8 W -> DQ: onnxruntime computes exactly what it computed before."""
    m = qdq_matmul(w_scale=[0.02, 0.05, 0.01])
    x = np.random.default_rng(3).standard_normal((1, 4)).astype(np.float32)
    before = _ort(m, x)
    w = numpy_helper.to_array(m.graph.initializer[0])
    fixed, fixes = qdq.to_tensorrt_layout(m)
    assert fixes == ["stored 1 weights as INT8 initializers read by DequantizeLinear (Q folded at build)"]
    stored = numpy_helper.to_array(next(i for i in fixed.graph.initializer if i.name == "W"))
    assert stored.dtype == np.int8
    # ONNX QuantizeLinear: round half to even, per output channel; saturate at 127 (0.01 scale, |w| ~ 2)
    expect = np.clip(np.rint(w / np.array([0.02, 0.05, 0.01], np.float32)), -128, 127)
    np.testing.assert_array_equal(stored, expect.astype(np.int8))
    assert [n.name for n in fixed.graph.node if n.op_type == "QuantizeLinear"] == ["act_q"]
    np.testing.assert_array_equal(_ort(fixed, x), before)
    report = check_tensorrt_compat(fixed, "10.3")
    assert report.ok and report.qdq_pairs == 2 and report.int8_weights == 1, report.format()


def test_onnxsim_keeps_qdq():
    m = qdq_matmul()
    simplified = simplify_onnx(m)
    assert op_counts(simplified)["QuantizeLinear"] == op_counts(simplified)["DequantizeLinear"] == 2


def _shared_kernel_graph() -> onnx.ModelProto:
    """Two MatMuls whose weights are one Constant through two identical Q/DQ pairs (what the exporter
    writes for CycleFC's fixed shift kernel, shared by the blocks of a stage)."""
    k = np.eye(4, dtype=np.float32)
    nodes = [helper.make_node("Constant", [], ["K"], value=numpy_helper.from_array(k)),
             helper.make_node("QuantizeLinear", ["input", "a_s", "zp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "a_s", "zp"], ["x"])]
    x = "x"
    for i in range(2):
        nodes += [helper.make_node("QuantizeLinear", ["K", "w_s", "zp"], [f"kq{i}"]),
                  helper.make_node("DequantizeLinear", [f"kq{i}", "w_s", "zp"], [f"k{i}"]),
                  helper.make_node("MatMul", [x, f"k{i}"], [f"y{i}"], name=f"fc{i}")]
        x = f"y{i}"
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "a_s"),
             numpy_helper.from_array(np.array(1 / 127, np.float32), "w_s"),
             numpy_helper.from_array(np.array(0, np.int8), "zp")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_onnxsim_may_merge_identical_qdq_pairs():
    """onnxsim merges the duplicate Q/DQ pair: fewer Q/DQ nodes, but both MatMuls still read a
    dequantized weight and compute what they did, so the result is accepted (CycleMLP jetson builds
    were refused before this)."""
    m = _shared_kernel_graph()
    simplified = simplify_onnx(m)
    assert op_counts(simplified)["DequantizeLinear"] < op_counts(m)["DequantizeLinear"]
    x = np.random.default_rng(0).standard_normal((1, 4)).astype(np.float32)
    np.testing.assert_array_equal(_ort(simplified, x), _ort(m, x))


def test_a_qdq_pair_folded_to_float_is_refused():
    m = _shared_kernel_graph()
    folded = onnx.ModelProto()
    folded.CopyFrom(m)
    fc1 = next(n for n in folded.graph.node if n.name == "fc1")
    fc1.input[1] = "K"  # the second weight read in float: that layer would silently leave INT8
    with pytest.raises(RuntimeError, match=r"fewer dequantized inputs \{'MatMul': \(3, 2\)\}"):
        check_dq_kept(m, folded)


# ---------------------------------------------------------------- S/16 (long)

@pytest.mark.slow
def test_s16_qdq_build_time_check_and_speed(tmp_path):
    """S/16 (random weights), 64 calibration images: under 2 minutes, TensorRT-clean, and faster
    than FP32 on onnxruntime (same process, interleaved runs: the 2 shared cores are noisy)."""
    from edgemix.models import build_model, resolve_spec

    seed_everything(0)
    torch.set_num_threads(2)
    spec = resolve_spec("s16")
    model = build_model(spec).eval()
    torch.nn.init.normal_(model.head.weight, std=0.02)  # the zero-init head would give all-zero logits
    calib = torch.randn(64, 3, 224, 224)
    t0 = time.perf_counter()
    q = qdq.quantize_ptq(model, calib, resolve_recipe("fast64"))
    proto, _ = qdq.export_qdq(q, spec, batch=1, dynamic_batch=True, opset=17)
    seconds = time.perf_counter() - t0
    assert seconds < 120, seconds
    assert check_tensorrt_compat(proto, "10.3", batch_range=(1, 1, 8)).ok
    fp32 = export_onnx(model, spec, batch=1, dynamic_batch=True, opset=17)
    preds = {k: OnnxRuntimePredictor(p, 2, 1, True) for k, p in (("fp32", fp32), ("int8", proto))}
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    times = {k: [] for k in preds}
    for _ in range(3):
        for p in preds.values():
            p(x)
    for _ in range(10):
        for k, p in preds.items():
            t = time.perf_counter()
            p(x)
            times[k].append(time.perf_counter() - t)
    med = {k: float(np.median(v)) for k, v in times.items()}
    assert med["int8"] < med["fp32"], med


def test_build_and_device_script_share_one_onnxruntime_session(tmp_path, monkeypatch):
    """The host build, `edgemix bench` and the device script open onnxruntime through one function
    (the device script's, which runs without edgemix): a static QDQ model benched on a device runs
    the same integer GEMMs the build verified, not the float-GEMM graph MatMulAddFusion makes."""
    from edgemix.backends.tensorrt import ort_session
    from edgemix.resources import device_script

    path = tmp_path / "tiny.onnx"
    torch.onnx.export(torch.nn.Linear(4, 3), (torch.zeros(1, 4),), str(path), dynamo=False)
    dev = device_script()
    calls, real = [], dev.ort_session
    monkeypatch.setattr(dev, "ort_session", lambda *a, **k: calls.append(k) or real(*a, **k))
    ort_session(path, 1)  # the build's
    dev.OrtRuntime(str(path), 1, qdq=True)  # the device's, for an INT8 (QDQ) artifact
    assert [c["qdq"] for c in calls] == [False, True]
    so_seen = {}
    import onnxruntime as ort

    monkeypatch.setattr(ort, "InferenceSession",
                        lambda model, so, providers=None, disabled_optimizers=None:
                        so_seen.update(spin=so.get_session_config_entry("session.intra_op.allow_spinning"),
                                       level=so.graph_optimization_level, disabled=disabled_optimizers))
    real(ort, str(path), 2, qdq=True)
    assert so_seen == {"spin": "0", "level": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                       "disabled": ["MatMulAddFusion"]}


def _int8_conv_graph() -> onnx.ModelProto:
    """input -> Q -> DQ -> Conv (int8 per-channel weights) -> Q/DQ -> Relu -> output, the input's Q also
    read by a second DQ (-> Relu -> a second output; onnxruntime's own s8->u8 pass takes only a Q with
    one consumer), and a third output that is a QuantizeLinear's int8 tensor itself."""
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (8, 4, 3, 3)).astype(np.int8)
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "sx"), numpy_helper.from_array(np.array(0, np.int8), "zx"),
             numpy_helper.from_array(np.array(0.2, np.float32), "sy"), numpy_helper.from_array(np.array(0, np.int8), "zy"),
             numpy_helper.from_array(w, "w_q"), numpy_helper.from_array(np.full(8, 0.01, np.float32), "sw"),
             numpy_helper.from_array(np.zeros(8, np.int8), "zw")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "sx", "zx"], ["x_dq"]),
             helper.make_node("DequantizeLinear", ["w_q", "sw", "zw"], ["w_dq"], axis=0),
             helper.make_node("Conv", ["x_dq", "w_dq"], ["y"], pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["y", "sy", "zy"], ["y_q"]),
             helper.make_node("DequantizeLinear", ["y_q", "sy", "zy"], ["y_dq"]),
             helper.make_node("Relu", ["y_dq"], ["out"]),
             helper.make_node("QuantizeLinear", ["out", "sy", "zy"], ["out_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "sx", "zx"], ["x_dq2"]),
             helper.make_node("Relu", ["x_dq2"], ["skip"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 16, 16])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8, 16, 16]),
                               helper.make_tensor_value_info("out_q", TensorProto.INT8, [1, 8, 16, 16]),
                               helper.make_tensor_value_info("skip", TensorProto.FLOAT, [1, 4, 16, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_host_proxy_gives_onnxruntime_uint8_activations_with_the_same_outputs(tmp_path, monkeypatch):
    """TensorRT wants int8 Q/DQ with zero point 0; onnxruntime's x86 integer Conv takes uint8 only. The
    proxy session shifts each activation Q/DQ pair to uint8 with zero point 128: the same outputs, the
    int8 Conv now an integer kernel, the weights and a Q whose int8 tensor leaves the graph untouched."""
    import platform

    import onnxruntime as ort

    from edgemix.backends.tensorrt import ort_session
    from edgemix.resources import device_script

    dev = device_script()
    model = _int8_conv_graph()
    converted = onnx.ModelProto()
    converted.CopyFrom(model)
    assert dev.uint8_activations(onnx, converted) == 5  # x's Q and both its DQs, y's pair; not w, not out_q
    zp = {n.output[0]: n.input[2] for n in converted.graph.node if len(n.input) > 2}
    inits = {i.name: numpy_helper.to_array(i) for i in converted.graph.initializer}
    assert inits[zp["x_q"]].dtype == np.uint8 and inits[zp["x_q"]] == 128 == inits[zp["x_dq2"]] == inits[zp["y_dq"]]
    assert inits[zp["w_dq"]].dtype == np.int8 and inits[zp["out_q"]].dtype == np.int8

    x = np.random.default_rng(1).standard_normal((1, 4, 16, 16)).astype(np.float32) * 3  # some clamp at ±127
    plain = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    proxy = dev.ort_session(ort, converted.SerializeToString(), 1, qdq=True)
    for a, b in zip(plain.run(None, {"x": x}), proxy.run(None, {"x": x})):
        np.testing.assert_array_equal(a, b)

    path = tmp_path / "int8.onnx"
    onnx.save(model, str(path))
    optimized = tmp_path / "optimized.onnx"
    session = ort_session(path, 1, optimized)  # the build's session, from the file as written
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], plain.run(None, {"x": x})[0])
    ops = op_counts(onnx.load(str(optimized)))
    if platform.machine().lower() in dev.X86_MACHINES:
        assert ops["QLinearConv"] == 1 and ops["Conv"] == 0, ops
    else:  # ARM: onnxruntime fuses int8 itself, the model is given as written
        monkeypatch.setattr(dev, "uint8_activations", lambda *a: pytest.fail("converted off x86"))
        ort_session(path, 1)
    assert onnx.load(str(path)) == model  # the artifact on disk is never rewritten


def test_batchnorm_after_an_activation_becomes_the_affine_it_computes():
    """ConvMixer's BatchNorm follows a GELU: the layout pass writes it as per-channel Mul + Add (which
    onnxruntime can move its NHWC Transposes through), with the GELU's scalar 0.5 folded into the
    scale; the same numbers. A Conv's BatchNorm, which every runtime folds into the Conv, is left."""
    rng = np.random.default_rng(3)
    c = 4

    def bn_inits(prefix):
        return [numpy_helper.from_array(v.astype(np.float32), f"{prefix}_{k}") for k, v in
                (("g", rng.uniform(0.5, 2, c)), ("b", rng.standard_normal(c)), ("m", rng.standard_normal(c)),
                 ("v", rng.uniform(0.1, 3, c)))]

    half = helper.make_node("Constant", [], ["half"], value=numpy_helper.from_array(np.array(0.5, np.float32)))
    nodes = [half,
             helper.make_node("Conv", ["x", "w"], ["conv"], name="conv"),
             helper.make_node("BatchNormalization", ["conv", *[f"bn0_{k}" for k in "gbmv"]], ["bn0"], name="bn0"),
             helper.make_node("Erf", ["bn0"], ["act"]),
             helper.make_node("Mul", ["act", "half"], ["scaled"]),
             helper.make_node("BatchNormalization", ["scaled", *[f"bn1_{k}" for k in "gbmv"]], ["bn1"], name="bn1",
                              epsilon=1e-3),
             helper.make_node("Mul", ["bn1", "half"], ["y"])]  # the shared constant is still read here
    graph = helper.make_graph(
        nodes, "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 5, 5])],
        [numpy_helper.from_array(rng.standard_normal((c, c, 1, 1)).astype(np.float32), "w"),
         *bn_inits("bn0"), *bn_inits("bn1")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((1, c, 5, 5)).astype(np.float32)
    before = _ort(model, x)
    fixed, fixes = qdq.to_tensorrt_layout(model)
    assert fixes == ["1 BatchNormalizations (after an activation) written as per-channel Mul + Add, "
                     "1 scalar Muls folded into them"]
    ops = op_counts(fixed)
    assert ops["BatchNormalization"] == 1 and ops["Mul"] == 2 and ops["Add"] == 1 and ops["Constant"] == 1
    assert [n.name for n in fixed.graph.node if n.op_type == "BatchNormalization"] == ["bn0"]
    assert not any(i.name.startswith("bn1_") for i in fixed.graph.initializer)  # its statistics are gone
    onnx.checker.check_model(fixed, full_check=True)
    np.testing.assert_allclose(_ort(fixed, x), before, rtol=1e-5, atol=1e-5)


def test_conv_output_quantizers_take_their_range_from_the_float_conv():
    """The quantizers added after each Conv (ConvMixer, CycleMLP on jetson) sit where NNCF left the
    output in float, and the min-max recipe gives each the largest |output| of the FP32 model's Conv
    over the calibration batches (NNCF's own quantizers off while it is measured)."""
    from nncf.torch.function_hook.wrapper import get_hook_storage

    from edgemix.models import build_model, resolve_spec

    torch.manual_seed(0)
    model = build_model(resolve_spec("convmixer-fmnist")).eval()
    calib = torch.randn(16, 1, 28, 28)
    plain = qdq.quantize_ptq(model, calib, resolve_recipe("default"), qdq.QDQSettings())
    q = qdq.quantize_ptq(model, calib, resolve_recipe("default"), qdq.QDQSettings(conv_outputs=True))
    added = sorted(set(get_hook_storage(q).post_hooks.keys()) - set(get_hook_storage(plain).post_hooks.keys()))
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(added) == len(convs) == 13 and all("/conv2d/" in k for k in added)
    stem = get_hook_storage(q).post_hooks["stem/0/conv2d/0__0"]["0"]
    with torch.no_grad():
        expected = model.stem[0](calib).abs().max()
    assert stem.signed and float(stem.scale.detach()) == pytest.approx(float(expected), rel=1e-6)


def test_stripping_every_convmixer_layer_leaves_the_fp32_function():
    """The sensitivity ranking runs a layer in float by removing its Q/DQ pairs, and for a Conv with a
    quantized output (ConvMixer on jetson) that pair too, as the rebuild with the layer in FP32 has
    none: with every layer stripped no Q/DQ is left and the graph computes the FP32 model."""
    from edgemix.models import build_model, resolve_spec

    torch.manual_seed(0)
    model = build_model(resolve_spec("convmixer-fmnist")).eval()
    x = torch.randn(4, 1, 28, 28)
    q = qdq.quantize_ptq(model, x, resolve_recipe("default"), qdq.QDQSettings(conv_outputs=True))
    proto, _ = qdq.export_qdq(q, model.spec, batch=4, dynamic_batch=False, opset=17)
    assert qdq.conv_outputs_quantized(proto) == 13
    stripped = sensitivity.strip_qdq(proto, sensitivity.quantized_layers(proto), model.state_dict())
    ops = op_counts(stripped)
    assert ops["QuantizeLinear"] == 0 and ops["DequantizeLinear"] == 0, ops
    with torch.no_grad():
        np.testing.assert_allclose(_ort(stripped, x.numpy()), model(x).numpy(), rtol=1e-4, atol=1e-4)

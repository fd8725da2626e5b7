"""End to end: `edgemix build` for each target on the shipped model and sample, then gate and report.

Each target is built once per module (real export, quantization, lowering, verification of the
written artifact) and the other tests read what it wrote.
"""

import json
import shutil
import tomllib
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from conftest import assert_clean_error, run_cli
from edgemix.verify.gate import validate_report

EVAL = "300"  # stratified test images: enough for the budgets' resolution, quick on 2 cores


def _build(out, target, *extra):
    # 100 interleaved rounds: the INT8-vs-FP32 sign test needs them on fmnist's sub-millisecond runs
    p = run_cli("build", "--target", target, "--eval-limit", EVAL, "--latency-runs", "100", "--out", out, *extra)
    assert p.returncode == 0, p.stdout + p.stderr
    return p


@pytest.fixture(scope="module")
def phone(tmp_path_factory):
    out = tmp_path_factory.mktemp("phone") / "fmnist_phone_int8"
    return out, _build(out, "phone")


@pytest.fixture(scope="module")
def jetson(tmp_path_factory):
    out = tmp_path_factory.mktemp("jetson") / "fmnist_jetson_int8"
    return out, _build(out, "jetson")


def _report(out):
    r = json.loads((out / "report.json").read_text())
    validate_report(r, str(out))
    return r


def _fixed_latency(out, dst, p50=1.0, fp32_p50=2.0, noise=0.02):
    """A copy of a real build whose latency figures are fixed numbers: the gate's latency logic is
    judged on these, never on a live measurement whose noise depends on the machine's load."""
    shutil.copytree(out, dst)
    r = json.loads((dst / "report.json").read_text())
    r["latency_ms"].update(p50=p50, p90=p50 * 1.1, p99=p50 * 1.2, mean=p50, noise_ms=noise)
    rounds = r["fp32_comparison"]["paired_rounds"]
    r["fp32_comparison"].update(fp32_p50_ms=fp32_p50, fp32_p90_ms=fp32_p50 * 1.1, fp32_noise_ms=2 * noise,
                                latency_ratio=p50 / fp32_p50, int8_faster=p50 < fp32_p50,
                                int8_wins=rounds if p50 < fp32_p50 else 0, sign_test_p=0.5**rounds)
    (dst / "report.json").write_text(json.dumps(r))
    return dst


def test_phone_build_artifacts_and_report(phone):
    out, proc = phone
    for stage in ("reference", "export", "calibrate", "lower", "write", "verify", "latency", "isa", "report"):
        assert f"[{stage:>9}]" in proc.stdout, stage  # one line per stage
    # and nothing else: no library warnings, torchao load failures or cpuinfo lines between them
    lines = proc.stdout.splitlines() + proc.stderr.splitlines()
    assert [ln for ln in lines if not (ln.startswith("[") or ln.startswith("fmnist -> "))] == [], lines
    r = _report(out)
    assert (r["model"], r["target"], r["backend"], r["precision"]) == ("fmnist", "android-arm64", "executorch", "int8")
    assert (out / "fmnist_phone_int8.pte").stat().st_size == r["artifact"]["bytes"]
    assert (out / "fmnist_phone_int8.bpte").is_file() and (out / "report.md").read_text().startswith("# edgemix build")
    cfg = tomllib.loads((out / "config.resolved.toml").read_text())
    assert cfg["build"]["precision"] == "int8" and cfg["calibration"]["images"] == 128
    assert cfg["target"]["budget"]["max_top1_drop"] == 1.0  # every default made explicit
    assert r["deployed"]["runtime"] == "executorch" and r["drift"]["samples"] == int(EVAL)
    # INT8 of a trained model: inside the phone profile's budget (1 pt, 97% agreement)
    assert r["drift"]["top1_delta"] >= -1.0 and r["drift"]["agreement"] >= 0.97
    dele = r["details"]["delegation"]
    # every op of the Mixer in one XNNPACK delegate: LayerNorm rewritten, stem as patchify + Linear
    assert dele["all_linear_conv_delegated"] is True and dele["partitions"] == 1 and dele["not_delegated"] == []
    assert dele["delegated"]["aten.linear.default"] >= 4 * 4 + 1 + 1
    assert r["fp32_comparison"]["size_ratio"] < 0.35
    assert r["reference"]["from_cache"] is False and r["fp32_comparison"]["fp32_from_cache"] is False
    # each stage's own peak memory; the build's is the largest of them (the model and toolchain load
    # before the first stage, so every stage holds at least the FP32 weights)
    peaks = {row["name"]: row["peak_rss_mb"] for row in r["stages"]}
    assert set(peaks) >= {"reference", "calibrate", "lower", "verify"} and min(peaks.values()) > 100
    assert r["peak_rss_mb"] >= max(peaks.values())
    # which device did what: without CUDA all FP32 work on the CPU; the artifact always on the host CPU
    if not torch.cuda.is_available():
        assert {k: r["devices"][k] for k in ("reference", "calibration", "qat", "artifact")} == dict.fromkeys(
            ("reference", "calibration", "qat", "artifact"), "cpu")
        assert r["devices"]["cuda_name"] is None and r["reference"]["device"] == "cpu"


@pytest.mark.parametrize("which", ["phone", "jetson"])
def test_report_md_renders_every_section_of_its_target(request, which):
    out = request.getfixturevalue(which)[0]
    md = (out / "report.md").read_text()
    common = ["# edgemix build: fmnist", "## Accuracy against the FP32 reference", "## Host latency",
              "INT8 vs the FP32 artifact of the same target", "## Files", "## Stages", "## Provenance"]
    own = {"phone": ["## Drift on the phone's instruction set", "## Delegation"],
           "jetson": ["## TensorRT engine", "## TensorRT compatibility check"]}[which]
    for section in common + own:
        assert section in md, section
    if which == "jetson":  # the check's own findings, not an empty block
        assert '"ok": true' in md.split("## TensorRT compatibility check", 1)[1]


def test_phone_isa_drift_flags_untrusted_emulation(phone):
    r = _report(phone[0])
    prof = {p["cpu"]: p for p in r["isa_drift"]["profiles"]}
    assert prof["native"]["trusted"] and prof["cortex-a76"]["trusted"]
    # arm64 kernels on a dotprod-class core agree with the host's to quantization noise
    assert prof["cortex-a76"]["agreement"] >= 0.97 and prof["cortex-a76"]["max_abs_vs_host"] < 0.1
    assert prof["max"]["trusted"] is False and "smopa" in prof["max"]["reason"].lower()
    assert r["isa_drift"]["images"] == 64  # fmnist fits the profile's whole count in its GMAC budget
    # the runners and self-tests were readied in the side thread while the .pte was lowered
    assert r["isa_drift"]["prepared_beside_lowering_s"] >= 0
    assert "readied beside the lowering" in next(s["produced"] for s in r["stages"] if s["name"] == "isa")


def test_isa_image_count_scales_with_model_cost():
    from edgemix.config import resolve_target
    from edgemix.models import resolve_spec
    from edgemix.pipeline import isa_image_count

    phone = resolve_target("phone").executorch
    assert isa_image_count(phone, resolve_spec("fmnist"), 300) == 64
    assert isa_image_count(phone, resolve_spec("fmnist"), 10) == 10
    assert isa_image_count(phone, resolve_spec("s16"), 1000) == 2  # 8 GMACs / 3.8 GMACs per image
    assert isa_image_count(phone, resolve_spec("h14"), 1000) == 1  # never zero


def test_jetson_build_qdq_onnx_and_engine_script(jetson):
    out, proc = jetson
    r = _report(out)
    assert r["backend"] == "tensorrt" and r["deployed"]["runtime"] == "onnxruntime"
    model = onnx.load(out / "fmnist_jetson_int8.onnx")
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 17 and ops.count("DequantizeLinear") >= 17
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in inits:
            assert not inits[n.input[2]].any() and inits[n.input[2]].dtype == np.int8  # symmetric INT8
    engine = r["details"]["engine"]
    from edgemix.backends.tensorrt import tensorrt_status

    if tensorrt_status()[0]:  # tensorrt imports next to a CUDA GPU: the engine is built here
        assert engine["status"] == "built" and (out / "fmnist_jetson_int8.engine").is_file()
    else:
        assert engine["status"] == "to_build_on_device"
        script = (out / "build_engine.sh").read_text()
        assert "trtexec" in script and "--int8" in script and "--minShapes" in script and "--maxShapes" in script
    assert r["drift"]["top1_delta"] >= -1.0 and r["drift"]["agreement"] >= 0.97


def test_gate_passes_good_builds_with_junit(phone, jetson, tmp_path):
    for built, _ in (phone, jetson):
        out = _fixed_latency(built, tmp_path / built.name)  # accuracy as built, latency fixed: no load dependence
        junit = tmp_path / f"{out.name}.xml"
        p = run_cli("gate", out, "--junit", junit, "--max-latency-ratio", "1.5")
        assert p.returncode == 0, p.stdout + p.stderr
        suite = ET.parse(junit).getroot()
        assert suite.tag == "testsuite" and suite.get("failures") == "0"
        names = {c.get("name") for c in suite.iter("testcase")}
        assert {"top1_drop_vs_fp32", "agreement", "cosine_mean"} <= names


def test_gate_catches_corrupted_activation_scale(jetson, tmp_path):
    """A real regression: one activation scale of the QDQ model x64, re-verified with onnxruntime."""
    import onnxruntime as ort

    from edgemix.data import load_dataset, stratified_indices, to_model_input
    from edgemix.models import load_model
    from edgemix.verify.drift import drift_metrics
    from edgemix.verify.reference import reference_logits

    src, _ = jetson
    bad = tmp_path / "damaged"
    shutil.copytree(src, bad)
    path = bad / "fmnist_jetson_int8.onnx"
    model = onnx.load(path)
    inits = {i.name: i for i in model.graph.initializer}
    # the first activation QuantizeLinear after the stem: its scale is a scalar initializer
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"
         and n.input[1] in inits and numpy_helper.to_array(inits[n.input[1]]).size == 1]
    target = inits[q[1].input[1]]
    target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) * 64, target.name))
    onnx.save(model, path)

    fp32, _ = load_model("fmnist")
    ds = load_dataset("sample", "test")
    ds = ds.subset(stratified_indices(ds.labels, int(EVAL), 0))
    ref = reference_logits(fp32, ds, fp32.spec)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = to_model_input(ds.images, fp32.spec).numpy()
    dep = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[i:i + 1]})[0] for i in range(len(x))])
    r = json.loads((bad / "report.json").read_text())
    d = drift_metrics(ref, dep, ds.labels.numpy())
    r["deployed"]["top1"] = d.pop("deployed_top1")
    d.pop("reference_top1")
    r["drift"] = d
    (bad / "report.json").write_text(json.dumps(r))
    p = run_cli("gate", bad)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "FAIL  agreement" in p.stdout and "budget >= 0.97" in p.stdout and "Traceback" not in p.stderr


def test_baseline_update_and_regression_vs_baseline(phone, tmp_path):
    out = _fixed_latency(phone[0], tmp_path / "build")
    base = tmp_path / "baselines" / "phone.json"
    p = run_cli("gate", out, "--baseline", base, "--update-baseline")
    assert p.returncode == 0 and base.is_file(), p.stdout + p.stderr
    assert run_cli("gate", out, "--baseline", base).returncode == 0
    # a baseline that was 3 points more accurate and 10x faster: both regressions are caught
    b = json.loads(base.read_text())
    assert "samples" not in b["latency_ms"] and b["latency_ms"]["runs"] >= 100  # summary, not raw rounds
    b["deployed"]["top1"] += 0.03
    b["latency_ms"]["p50"] /= 10
    b["latency_ms"]["noise_ms"] = 0
    base.write_text(json.dumps(b))
    p = run_cli("gate", out, "--baseline", base)
    assert p.returncode == 1
    # by default latency is judged as INT8/FP32 within each run: 10x better in the baseline's run
    assert "FAIL  top1_drop_vs_baseline" in p.stdout and "FAIL  int8_fp32_ratio_vs_baseline" in p.stdout
    p = run_cli("gate", out, "--baseline", base, "--latency-basis", "ms")
    assert p.returncode == 1 and "FAIL  latency_p50_vs_baseline" in p.stdout, p.stdout


def test_gate_latency_vs_baseline_survives_a_slower_machine(phone, tmp_path):
    """A baseline written on a machine twice as fast: absolute milliseconds fail, the INT8/FP32 ratio
    timed in the same run does not; an INT8 path that lost speed against its own FP32 still fails."""
    out = _fixed_latency(phone[0], tmp_path / "build")
    base = tmp_path / "phone.json"
    assert run_cli("gate", out, "--baseline", base, "--update-baseline").returncode == 0
    b = json.loads(base.read_text())
    b["latency_ms"]["p50"] /= 2
    b["fp32_comparison"]["fp32_p50_ms"] /= 2
    for side, key in ((b["latency_ms"], "noise_ms"), (b["fp32_comparison"], "fp32_noise_ms")):
        side[key] = 0
    base.write_text(json.dumps(b))
    p = run_cli("gate", out, "--baseline", base)
    assert p.returncode == 0 and "PASS  int8_fp32_ratio_vs_baseline" in p.stdout, p.stdout
    p = run_cli("gate", out, "--baseline", base, "--latency-basis", "ms")
    assert p.returncode == 1 and "FAIL  latency_p50_vs_baseline" in p.stdout, p.stdout
    b["fp32_comparison"]["fp32_p50_ms"] *= 4  # the baseline's INT8 was twice as far ahead of its FP32
    base.write_text(json.dumps(b))
    p = run_cli("gate", out, "--baseline", base)
    assert p.returncode == 1 and "FAIL  int8_fp32_ratio_vs_baseline" in p.stdout, p.stdout
    del b["fp32_comparison"]
    base.write_text(json.dumps(b))
    assert_clean_error(run_cli("gate", out, "--baseline", base, "--latency-basis", "fp32"), 2,
                       "the baseline has none")
    p = run_cli("gate", out, "--baseline", base)  # auto: falls back to milliseconds
    assert "latency_p50_vs_baseline" in p.stdout, p.stdout
    assert_clean_error(run_cli("gate", out, "--latency-basis", "fp23"), 2, "did you mean 'fp32'")


def test_gate_usage_errors(tmp_path, phone):
    assert_clean_error(run_cli("gate", tmp_path / "nothing"), 2, "no build report")
    bad = tmp_path / "bad"
    shutil.copytree(phone[0], bad)
    r = json.loads((bad / "report.json").read_text())
    del r["drift"]["agreement"]
    (bad / "report.json").write_text(json.dumps(r))
    assert_clean_error(run_cli("gate", bad), 2, "does not match the edgemix report schema")


@pytest.mark.parametrize("option,value,needle", [
    ("--min-agreement", "2", "--min-agreement 2.0 is out of range; it takes a fraction in [0, 1]"),
    ("--max-top1-drop", "-1", "--max-top1-drop -1.0 is out of range; it takes points >= 0"),
    ("--min-cosine", "1.5", "--min-cosine 1.5 is out of range"),
    ("--max-latency-ratio", "0", "--max-latency-ratio 0.0 is out of range"),
])
def test_gate_budget_out_of_range_is_a_usage_error(phone, option, value, needle):
    assert_clean_error(run_cli("gate", phone[0], option, value), 2, needle)


def test_gate_refuses_a_baseline_of_another_build(phone, jetson, tmp_path):
    base = tmp_path / "jetson.json"
    # the jetson build with fixed latency figures: its own gate passes whatever the machine's load
    jetson_build = _fixed_latency(jetson[0], tmp_path / "fmnist_jetson_int8")
    p = run_cli("gate", jetson_build, "--baseline", base, "--update-baseline")
    assert p.returncode == 0, p.stdout + p.stderr
    before = base.read_bytes()
    assert_clean_error(run_cli("gate", phone[0], "--baseline", base), 2, "the baseline is for another build",
                       "target 'android-arm64' vs 'jetson-orin-nano'")
    # --update-baseline over another build's baseline would silently replace it: refused too
    assert_clean_error(run_cli("gate", phone[0], "--baseline", base, "--update-baseline"), 2,
                       "the baseline is for another build")
    assert base.read_bytes() == before


def test_gate_output_paths_never_replace_foreign_files(phone, tmp_path, read_only):
    out = phone[0]
    notes = tmp_path / "notes.xml"
    notes.write_text("<notes>mine</notes>\n")
    assert_clean_error(run_cli("gate", out, "--junit", notes), 2,
                       f"--junit {notes} already exists and is not a JUnit report written by edgemix")
    assert notes.read_text() == "<notes>mine</notes>\n"
    mine = tmp_path / "budget.json"
    mine.write_text('{"my": "data"}')
    assert_clean_error(run_cli("gate", out, "--baseline", mine, "--update-baseline"), 2,
                       f"--baseline {mine} already exists and is not a baseline written by edgemix")
    assert mine.read_text() == '{"my": "data"}'
    for option in ("--junit", "--baseline"):
        extra = ["--update-baseline"] if option == "--baseline" else []
        assert_clean_error(run_cli("gate", out, option, notes / "x", *extra), 2,
                           f"{notes / 'x'}: {notes} is a file, not a folder")
        ro = read_only(tmp_path / f"ro{option}")
        assert_clean_error(run_cli("gate", out, option, ro / "x", *extra), 2, f"{ro / 'x'}", "Read-only file system")
    junit = tmp_path / "gate.xml"  # edgemix's own JUnit file is replaced on the next run
    for _ in range(2):
        assert run_cli("gate", _fixed_latency(out, tmp_path / f"b{_}"), "--junit", junit).returncode == 0


def test_report_side_by_side(phone, jetson):
    p = run_cli("report", phone[0], jetson[0])
    assert p.returncode == 0, p.stderr
    assert "android-arm64" in p.stdout and "jetson-orin-nano" in p.stdout and "change" in p.stdout


def test_rebuild_with_same_fingerprint_is_skipped(phone):
    out, _ = phone
    before = (out / "report.json").read_text()
    p = run_cli("build", "--target", "phone", "--eval-limit", EVAL, "--latency-runs", "100", "--out", out)
    assert p.returncode == 0 and "up to date" in p.stdout
    assert (out / "report.json").read_text() == before


def test_forced_rebuild_reuses_cached_reference_and_fp32_artifact(phone, tmp_path):
    out, _ = phone
    again = tmp_path / "again"
    p = _build(again, "phone", "--force", "--no-isa-check")
    assert "(from the build cache)" in p.stdout
    first, second = _report(out), _report(again)
    assert second["reference"]["from_cache"] is True and second["fp32_comparison"]["fp32_from_cache"] is True
    # the cached reference is the same reference: same top-1, and the same INT8 artifact drifts the same
    assert second["reference"]["top1"] == first["reference"]["top1"]
    assert second["drift"]["agreement"] == first["drift"]["agreement"]
    assert second["artifact"]["files"]["model"]["sha256"] == first["artifact"]["files"]["model"]["sha256"]
    assert second["fp32_comparison"]["fp32_bytes"] == first["fp32_comparison"]["fp32_bytes"]


def test_bad_build_requests_fail_fast_and_keep_previous_build(phone, tmp_path):
    out, _ = phone
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    assert_clean_error(run_cli("build", "--target", "phone", "--precision", "fp32", "--qat-epochs", "1", "--out", out),
                       2, "--qat-epochs 1.0 needs --precision int8")
    assert_clean_error(run_cli("build", "--target", "phone", "--precision", "fp16", "--out", out), 2, "fp16")
    assert_clean_error(run_cli("build", "--target", "phne"), 2, "did you mean 'phone'")
    assert_clean_error(run_cli("build", "--target", "phone", "--device", "cdua", "--out", out), 2,
                       "did you mean 'cuda'")
    if not torch.cuda.is_available():
        assert_clean_error(run_cli("build", "--target", "phone", "--device", "cuda", "--out", out), 2,
                           "--device cuda was asked for but no CUDA device")
    assert_clean_error(run_cli("build", "--target", "phone", "--image-size", "32", "--out", out), 2,
                       "wrong-shaped", "--image-size")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    recipe = tmp_path / "empty.toml"
    recipe.write_text(f'data = "{tmp_path / "empty"}"\nimages = 16\n')
    assert_clean_error(run_cli("build", "--target", "phone", "--calib", recipe, "--out", out), 2, "holds no images")
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before  # nothing lost
    assert not [p for p in out.parent.iterdir() if ".staging" in p.name]  # nothing half-written


def test_out_of_range_build_options_are_usage_errors(tmp_path):
    out = tmp_path / "kept"
    out.mkdir()
    (out / "report.json").write_text("{}")
    p = run_cli("build", "--target", "phone", "--latency-seconds", "-1", "--latency-runs", "1", "--out", out, "--force")
    assert_clean_error(p, 2, "--latency-seconds -1.0", "--latency-runs 1", "greater than or equal")
    assert [f.name for f in out.iterdir()] == ["report.json"] and (out / "report.json").read_text() == "{}"


def test_phone_qat_build_runs(tmp_path):
    """QAT end to end on a few steps (the accuracy claim is in the README, on the full set)."""
    out = tmp_path / "qat"
    p = run_cli("build", "--target", "phone", "--qat-epochs", "0.1", "--train-data", "sample", "--eval-limit", "100",
                "--no-compare-fp32", "--no-isa-check", "--latency-runs", "5", "--latency-seconds", "0", "--out", out)
    assert p.returncode == 0, p.stdout + p.stderr
    r = _report(out)
    assert "[      qat]" in p.stdout and "[   select]" in p.stdout
    assert r["latency_ms"]["runs"] == 5  # no time floor asked: exactly the runs asked
    # QAT must earn its cost: PTQ's and QAT's written artifacts side by side, the better one shipped
    sel = r["quantization"]["qat_selection"]
    assert sel["qat_epochs"] == 0.1 and sel["images"] == 100 and sel["rule"] == "better"
    assert "mean squared error" in sel["qat_loss"]  # the default schedule: MSE on the FP32 logits, lr 3e-5
    resolved = tomllib.loads((out / "config.resolved.toml").read_text())["build"]
    assert (resolved["qat_lr"], resolved["qat_loss"]) == (3e-5, "mse")
    assert (sel["qat_lr"], sel["qat_batch_size"]) == (3e-5, 64)  # the schedule, in the report too
    md = (out / "report.md").read_text()
    assert f"kept **{sel['kept'].upper()}**" in md and "0.1 epochs, lr 3e-05, batch 64" in md
    assert sel["kept"] == ("ptq" if sel["ptq"]["agreement"] > sel["qat"]["agreement"] else "qat")
    assert r["drift"]["agreement"] == sel[sel["kept"]]["agreement"]  # what ships is what was kept
    assert r["quantization"]["qat_epochs"] == (0.1 if sel["kept"] == "qat" else 0.0)
    assert not list(out.glob(".ptq*")) and not list(out.rglob("*.ptq*"))  # the loser is gone
    assert r["drift"]["agreement"] >= 0.9


def _fallback_build(tmp_path, min_cosine: str, eval_limit: int):
    """`build --fallback` of the default model for a jetson profile whose cosine budget is ``min_cosine``."""
    from edgemix.config import TARGETS_DIR

    strict = (TARGETS_DIR / "jetson-orin-nano.toml").read_text().replace("min_cosine = 0.98", f"min_cosine = {min_cosine}")
    profile = tmp_path / "strict-jetson.toml"
    profile.write_text(strict)
    out = tmp_path / "fb"
    return run_cli("build", "--target", profile, "--fallback", "--eval-limit", str(eval_limit), "--no-compare-fp32",
                   "--latency-runs", "5", "--out", out), out


def test_jetson_fallback_keeps_sensitive_layers_until_budget(tmp_path):
    """A profile with a stricter cosine budget than INT8 meets: the build ranks the layers and keeps
    the most sensitive ones in FP32 until the budget is met, and says which."""
    p, out = _fallback_build(tmp_path, "0.99995", 100)
    assert p.returncode == 0, p.stdout + p.stderr
    fb = _report(out)["details"]["fallback"]
    assert fb["met"] and fb["keep_fp32"], fb["steps"]
    assert len(fb["ranking"]) == 18  # 16 block Linears + head + stem Conv, ranked
    assert fb["keep_fp32"] == [r["layer"] for r in fb["ranking"]][:len(fb["keep_fp32"])]  # most sensitive first
    assert _report(out)["drift"]["cosine_mean"] >= 0.99995
    assert "layers kept in FP32" in p.stdout and "Per-layer sensitivity" in (out / "report.md").read_text()


def test_jetson_fallback_that_needs_every_layer_in_fp32_is_refused(tmp_path):
    """A budget INT8 cannot meet with any layer left INT8: a clear exit 2 naming the way out, and no
    output folder (not an INT8 build with no Q/DQ left, which the TensorRT check would reject)."""
    p, out = _fallback_build(tmp_path, "1.0", 50)
    assert_clean_error(p, 2, "with every quantized layer of 'fmnist' in FP32 (18 layers)", "--precision fp16")
    assert not out.exists()

import json

import pytest

from conftest import assert_clean_error, run_cli


def test_models_lists_every_variant_json():
    p = run_cli("models", "--json")
    assert p.returncode == 0, p.stderr
    rows = {r["alias"]: r for r in json.loads(p.stdout)}
    assert list(rows)[:8] == ["s32", "s16", "b32", "b16", "l32", "l16", "h14", "fmnist"]
    assert rows["s16"]["params_m"] == 18.53 and rows["b16"]["gmacs"] == 12.602
    assert rows["fmnist"]["shipped_weights"] is True and rows["fmnist"]["family"] == "mixer"
    # the relatives, each with its family and the paper's size
    assert rows["convmixer-1536-20"]["family"] == "convmixer" and rows["convmixer-1536-20"]["params_m"] == 51.63
    assert rows["vip-m7"]["family"] == "vip" and rows["vip-m7"]["params_m"] == 55.27
    assert rows["cyclemlp-b2"]["family"] == "cyclemlp" and rows["cyclemlp-b2"]["gmacs"] == 3.876


def test_models_table_and_help():
    p = run_cli("models")
    assert p.returncode == 0 and "Mixer-H/14" in p.stdout and "GMACs" in p.stdout
    h = run_cli("--help")
    assert h.returncode == 0 and "Exit codes" in h.stdout


def test_targets_list():
    p = run_cli("targets")
    assert p.returncode == 0 and "jetson-orin-nano" in p.stdout and "android-arm64" in p.stdout
    data = json.loads(run_cli("targets", "--json").stdout)
    assert data["host-cpu"]["runner"]["kind"] == "local"


def test_eval_shipped_model_json():
    p = run_cli("eval", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["device"] in ("cpu", "cuda") and r["samples"] == 1000 and r["model"] == "fmnist"
    assert r["top1"] > 0.85  # the shipped checkpoint: ~91% on the full test set
    assert len(r["per_class"]) == 10


def test_eval_saves_reference_logits(tmp_path):
    import numpy as np

    p = run_cli("eval", "--limit", "50", "--save-logits", tmp_path / "ref.npz")
    assert p.returncode == 0, p.stderr
    z = np.load(tmp_path / "ref.npz")
    assert z["logits"].shape == (50, 10) and str(z["device"]) in ("cpu", "cuda")


def test_eval_errors(tmp_path):
    assert_clean_error(run_cli("eval", "--model", "s61"), 2, "unknown model 's61'", "did you mean 's16'")
    corrupt = tmp_path / "bad.pt"
    corrupt.write_bytes(b"\x00" * 50)
    assert_clean_error(run_cli("eval", "--weights", corrupt), 2, "corrupt or truncated")
    assert corrupt.read_bytes() == b"\x00" * 50
    (tmp_path / "empty").mkdir()
    assert_clean_error(run_cli("eval", "--data", tmp_path / "empty"), 2, "holds no images")
    assert_clean_error(run_cli("eval", "--model", "s16"), 2, "no shipped weights")
    assert_clean_error(run_cli("eval", "--split", "tset"), 2, "did you mean 'test'")
    bad_target = tmp_path / "t.toml"
    bad_target.write_text("backend = 3\n")
    assert_clean_error(run_cli("eval", "--device", "gpu"), 2, "unknown device 'gpu'")


def test_eval_device_cuda_without_cuda_is_a_usage_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: test_eval_reference_on_cuda runs instead")
    assert_clean_error(run_cli("eval", "--device", "cuda"), 2, "--device cuda was asked for but no CUDA device")


@pytest.mark.gpu
def test_eval_reference_on_cuda():
    """The FP32 reference on the GPU gives the CPU's top-1 (argmax over fp32 logits; a flip needs a
    near-tie, and 1,000 images allow at most 2)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible to torch")
    cpu = json.loads(run_cli("eval", "--device", "cpu", "--json").stdout)
    gpu = json.loads(run_cli("eval", "--device", "cuda", "--json").stdout)
    assert gpu["device"] == "cuda" and abs(gpu["top1"] - cpu["top1"]) <= 0.002

"""Bad input found by trying edgemix as a new user would: each case runs the real command and checks
the exit code, the message, and that nothing that existed before was changed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import assert_clean_error, run_cli
from edgemix.data.idx import write_idx


def _tree(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- numbers out of range: exit 2, not a traceback

@pytest.mark.parametrize("args,needle", [
    (("eval", "--batch-size", "0"), "--batch-size must be >= 1, got 0"),
    (("eval", "--batch-size", "-1"), "--batch-size must be >= 1, got -1"),
    (("eval", "--limit", "0"), "--limit must be >= 1, got 0"),
    (("build", "--target", "phone", "--num-classes", "-1"), "--num-classes must be >= 1, got -1"),
    (("build", "--target", "phone", "--image-size", "0"), "--image-size must be >= 1, got 0"),
    (("train", "--label-smoothing", "2"), "--label-smoothing must be in [0, 1), got 2.0"),
    (("train", "--weight-decay", "-1"), "--weight-decay must be >= 0"),
    (("train", "--limit", "0"), "--limit must be >= 1, got 0"),
])
def test_out_of_range_numbers_are_usage_errors(tmp_path, args, needle):
    assert_clean_error(run_cli(*args, cwd=tmp_path), 2, needle)
    assert not list(tmp_path.iterdir())  # failed before writing anything


# ---------------------------------------------------------------- broken edgemix checkpoints

def _checkpoint(path, drop=None, spec_drop=None):
    from edgemix.models import load_model
    from edgemix.models.checkpoints import FORMAT, FORMAT_VERSION

    model, _ = load_model("fmnist")
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "spec": model.spec.to_dict(),
               "state_dict": model.state_dict(), "meta": {}}
    if drop:
        del payload[drop]
    if spec_drop:
        del payload["spec"][spec_drop]
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("kwargs,needle", [
    ({"drop": "state_dict"}, "has no state_dict of tensors (it holds: format, format_version, meta, spec)"),
    ({"spec_drop": "hidden_dim"}, "the stored model spec is incomplete or unknown: missing hidden_dim"),
    ({"drop": "spec"}, "has no model spec"),
])
def test_incomplete_edgemix_checkpoint_is_a_usage_error(tmp_path, kwargs, needle):
    ckpt = _checkpoint(tmp_path / "broken.pt", **kwargs)
    assert_clean_error(run_cli("eval", "--weights", ckpt, "--limit", "20"), 2, str(ckpt), needle)


# ---------------------------------------------------------------- data whose labels the model does not have

def test_labels_outside_the_models_classes_are_rejected(tmp_path):
    data = tmp_path / "idx"
    data.mkdir()
    rng = np.random.default_rng(0)
    labels = np.arange(40, dtype=np.uint8) % 10
    labels[3] = 200
    write_idx(data / "t10k-images-idx3-ubyte", rng.integers(0, 255, (40, 28, 28), dtype=np.uint8))
    write_idx(data / "t10k-labels-idx1-ubyte", labels)
    assert_clean_error(run_cli("eval", "--data", data), 2, "has labels 0..200, but the model has 10 classes")


# ---------------------------------------------------------------- output paths: never someone else's file, no tracebacks

def test_eval_save_logits_paths(tmp_path, read_only):
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    assert_clean_error(run_cli("eval", "--limit", "20", "--save-logits", blocker / "logits.npz"), 2,
                       f"cannot write the reference logits to {blocker / 'logits.npz'}: {blocker} is a file, not a folder")
    assert blocker.read_text() == "mine"
    foreign = tmp_path / "results.npz"
    np.savez(foreign, accuracy=np.array([0.9]))
    before = foreign.read_bytes()
    assert_clean_error(run_cli("eval", "--limit", "20", "--save-logits", foreign), 2,
                       f"--save-logits {foreign} already exists and is not a reference-logits file written by edgemix")
    assert foreign.read_bytes() == before
    ours = tmp_path / "ref.npz"
    assert run_cli("eval", "--limit", "20", "--save-logits", ours).returncode == 0
    first = np.load(ours)["logits"]
    p = run_cli("eval", "--limit", "30", "--save-logits", ours)  # its own file: replaced
    assert p.returncode == 0, p.stderr
    assert np.load(ours)["logits"].shape == (30, 10) and first.shape == (20, 10)
    ro = read_only(tmp_path / "ro")
    assert_clean_error(run_cli("eval", "--limit", "20", "--save-logits", ro / "logits.npz"), 2,
                       f"cannot write the reference logits to {ro / 'logits.npz'}", "Read-only file system")


def test_train_out_paths(tmp_path, read_only):
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    assert_clean_error(run_cli("train", "--data", "sample", "--out", blocker), 2, f"--out {blocker} is a file")
    assert_clean_error(run_cli("train", "--data", "sample", "--out", blocker / "run"), 2,
                       f"cannot create the training folder {blocker / 'run'}: {blocker} is a file, not a folder")
    assert blocker.read_text() == "mine"
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.pt").write_text("my own model, not edgemix's")
    (run / "notes.txt").write_text("notes")
    before = _tree(run)
    assert_clean_error(run_cli("train", "--data", "sample", "--out", run), 2,
                       f"--out {run / 'model.pt'} already exists and is not a checkpoint written by edgemix")
    assert _tree(run) == before
    ro = read_only(tmp_path / "ro")
    assert_clean_error(run_cli("train", "--data", "sample", "--out", ro / "run"), 2,
                       f"cannot create the training folder {ro / 'run'}", "Read-only file system")


# ---------------------------------------------------------------- the build cache on a read-only file system

def test_read_only_cache_says_once_that_nothing_is_cached(tmp_path, read_only):
    cache = read_only(tmp_path / "cache")
    p = run_cli("build", "--target", "jetson", "--eval-limit", "50", "--latency-runs", "3", "--latency-seconds", "0",
                "--out", tmp_path / "out", env={"EDGEMIX_CACHE_DIR": str(cache)})
    assert p.returncode == 0, p.stderr
    assert p.stderr.count(f"warning: the build cache {cache} is not writable") == 1, p.stderr
    assert "Read-only file system" in p.stderr and (tmp_path / "out" / "report.json").is_file()

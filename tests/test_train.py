import subprocess
import sys

import torch

from conftest import REPO, assert_clean_error, run_cli
from edgemix.models.checkpoints import read_edgemix_checkpoint


def test_train_writes_checkpoints_and_learns(tmp_path):
    out = tmp_path / "run"
    p = run_cli("train", "--data", "sample", "--limit", "1000", "--epochs", "2", "--batch-size", "64",
                "--out", out, "--seed", "1")
    assert p.returncode == 0, p.stderr
    assert "epoch 2:" in p.stdout and (out / "model.pt").is_file() and (out / "last.pt").is_file()
    ckpt = read_edgemix_checkpoint(out / "model.pt")
    hist = ckpt["meta"]["history"]
    assert ckpt["spec"]["name"] == "fmnist" and "optimizer" not in ckpt
    # 32 steps on 1,000 images: far above chance (10%; its 95% upper bound on 1,000 images is ~12%)
    assert hist[-1]["eval_top1"] > 0.25


def test_resume_continues_from_last(tmp_path):
    out = tmp_path / "run"
    assert run_cli("train", "--data", "sample", "--limit", "256", "--epochs", "1", "--batch-size", "64",
                   "--out", out).returncode == 0
    p = run_cli("train", "--data", "sample", "--limit", "256", "--epochs", "2", "--batch-size", "64",
                "--out", out, "--resume", out / "last.pt")
    assert p.returncode == 0, p.stderr
    hist = read_edgemix_checkpoint(out / "model.pt")["meta"]["history"]
    assert [h["epoch"] for h in hist] == [1, 2] and hist[1]["step"] == 8
    assert "epoch 1:" not in p.stdout  # the first epoch was not re-run


def test_resume_from_weights_only_file_is_clear_error(tmp_path):
    out = tmp_path / "run"
    assert run_cli("train", "--data", "sample", "--limit", "128", "--epochs", "1", "--out", out).returncode == 0
    p = run_cli("train", "--data", "sample", "--epochs", "1", "--out", out, "--resume", out / "model.pt")
    assert_clean_error(p, 2, "no training state", "last.pt")


def test_ddp_two_processes_gloo(tmp_path):
    """torchrun with 2 CPU processes: gloo process group, rank 0 writes, and the gradients really are
    averaged: two ranks each taking half of a 128-image batch end with the same weights as one
    process taking the whole batch (one step: the seeded permutation puts images 0..63 on rank 0 and
    64..127 on rank 1, which is exactly the single process's one batch)."""
    common = ["--data", "sample", "--limit", "128", "--epochs", "1", "--no-augment", "--warmup-epochs", "0",
              "--threads", "1", "--eval-data", "sample"]
    env = {"CI": "true", "PATH": "/usr/bin:/bin"}
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "edgemix.cli", "train", *common, "--batch-size", "64", "--out", str(ddp)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    p = subprocess.run([sys.executable, "-m", "edgemix.cli", "train", *common, "--batch-size", "128", "--out",
                        str(single)], capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = read_edgemix_checkpoint(ddp / "model.pt"), read_edgemix_checkpoint(single / "model.pt")
    assert a["meta"]["world_size"] == 2 and b["meta"]["world_size"] == 1
    assert a["meta"]["history"][-1]["step"] == b["meta"]["history"][-1]["step"] == 1
    for k, v in a["state_dict"].items():
        # gloo's allreduce and one batch sum the same gradients in another order (float32 rounding);
        # AdamW's first step is ~lr * sign(grad), so 1e-6 absolute is far below a wrong or missing average
        torch.testing.assert_close(v, b["state_dict"][k], rtol=0, atol=1e-6, msg=k)
    assert a["state_dict"]["head.weight"].abs().sum() > 0  # the head starts at zero: the step happened


def test_train_bad_input(tmp_path):
    assert_clean_error(run_cli("train", "--model", "s61", "--data", "sample"), 2, "did you mean 's16'")
    assert_clean_error(run_cli("train", "--data", tmp_path / "nothing"), 2, "does not exist")
    assert_clean_error(run_cli("train", "--data", "sample", "--epochs", "0"), 2, "--epochs must be > 0")

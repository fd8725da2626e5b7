"""The public Python API on a model edgemix has never seen: a small Conv/LayerNorm/GELU/Linear
classifier (not a Mixer), trained for a few steps on the shipped sample, through both targets."""

import subprocess
import sys

import pytest
import torch
from torch import nn

import edgemix
from edgemix.data import load_dataset, stratified_indices
from edgemix.errors import UsageError

FAST = {"latency_runs": 5, "latency_seconds": 0, "isa_check": False, "quiet": True}


class SmallNet(nn.Module):
    """Patchify conv, one pre-norm MLP block with a skip, a linear head on all tokens."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 32, 4, 4)
        self.norm = nn.LayerNorm(32)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Linear(49 * 32, 10)

    def forward(self, x):
        t = self.stem(x).flatten(2).transpose(1, 2)
        t = t + self.mlp(self.norm(t))
        return self.head(t.flatten(1))


class WithBesselI0(SmallNet):
    def forward(self, x):
        return super().forward(torch.special.i0(x))


def _tensors(split, n):
    ds = load_dataset("sample", split)
    ds = ds.subset(stratified_indices(ds.labels, n, 0))
    return ds.images, ds.labels


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    net = SmallNet()
    images, labels = _tensors("train", 2000)
    x = (images.float() / 255 - 0.5) / 0.5
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for step in range(150):  # ~2 s: enough to be far above chance, so drift has something to measure
        i = torch.randint(0, len(x), (64,))
        loss = nn.functional.cross_entropy(net(x[i]), labels[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def test_evaluate_a_users_module_on_tensors(trained):
    images, labels = _tensors("test", 300)
    r = edgemix.evaluate(trained, (images, labels), input_shape=(1, 28, 28), mean=(0.5,), std=(0.5,))
    assert r.samples == 300 and r.logits.shape == (300, 10) and r.model == "small-net"
    assert r.top1 > 0.6  # trained, not chance (0.1); the bound holds with a wide margin


@pytest.mark.parametrize("target", ["phone", "jetson"])
def test_build_a_users_module_for_each_target(trained, tmp_path, target):
    images, labels = _tensors("test", 300)
    before = [p.clone() for p in trained.parameters()]
    result = edgemix.build(trained, target=target, input_shape=(1, 28, 28), mean=(0.5,), std=(0.5,),
                           eval_data=(images, labels), out=tmp_path / "out", **FAST)
    assert isinstance(result, edgemix.BuildResult) and result.out == tmp_path / "out"
    assert result.artifact.is_file() and result.artifact.suffix == {"phone": ".pte", "jetson": ".onnx"}[target]
    assert result.report["model"] == "small-net" and result.report["provenance"]["weights_format"] == "module"
    d = result.drift
    assert d.samples == 300 and d.reference_top1 > 0.6
    # INT8 of a trained model: the target's budget (1 pt, 97% agreement) with room
    assert d.top1_delta >= -2.0 and d.agreement >= 0.95 and d.cosine_mean > 0.99
    lat = result.latency
    assert lat.p50_ms > 0 and lat.runs >= 5 and lat.int8_fp32_ratio is not None and lat.fp32_p50_ms > 0
    assert all(torch.equal(a, b) for a, b in zip(before, trained.parameters()))  # the user's model untouched
    gate = edgemix.gate(result.out)
    assert {c.name for c in gate.checks} >= {"top1_drop_vs_fp32", "agreement", "cosine_mean"}
    assert all(c.passed for c in gate.checks if c.name in ("top1_drop_vs_fp32", "agreement", "cosine_mean"))


@pytest.mark.parametrize("target,needle", [
    ("phone", "the op aten::i0 is not in the Core ATen opset ExecuTorch runs"),
    ("jetson", "the op aten::i0 has no ONNX export"),
])
def test_an_op_the_backend_cannot_take_is_refused_before_work(tmp_path, target, needle):
    out = tmp_path / "out"
    with pytest.raises(UsageError) as e:
        edgemix.build(WithBesselI0(), target=target, input_shape=(1, 28, 28), out=out, **FAST)
    assert needle in str(e.value) and "with-bessel-i0" in str(e.value)
    assert not out.exists()


@pytest.mark.parametrize("kwargs,needle", [
    ({}, "needs input_shape=(channels, height, width)"),
    ({"input_shape": (1, 28)}, "is not (channels, height, width)"),
    ({"input_shape": (3, 28, 28)}, "does not run on a (1, 3, 28, 28) input"),
    ({"input_shape": (1, 28, 28), "mean": (0.5, 0.5)}, "need 1 values each"),
])
def test_bad_module_descriptions(kwargs, needle):
    with pytest.raises(UsageError, match=None) as e:
        edgemix.build(SmallNet(), target="phone", **kwargs, **FAST)
    assert needle in str(e.value)


def test_bad_tensor_data_is_a_usage_error(trained):
    with pytest.raises(UsageError, match="images must be a"):
        edgemix.build(trained, input_shape=(1, 28, 28), eval_data=(torch.zeros(4, 28, 28), torch.zeros(4)), **FAST)
    with pytest.raises(UsageError, match="labels must be"):
        edgemix.build(trained, input_shape=(1, 28, 28), eval_data=(torch.zeros(4, 1, 28, 28), torch.zeros(3)), **FAST)


def test_import_edgemix_is_light():
    """`import edgemix` (and so `edgemix --help`) must not pay for torch; the API loads on first use."""
    code = "import sys, edgemix; assert 'torch' not in sys.modules; edgemix.build; assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

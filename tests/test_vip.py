"""The Vision Permutator family (edgemix/models/vip.py): sizes, the function against the authors'
formulation, their checkpoint layout, the image-size contract and the edge exports."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgemix.errors import CheckpointError, UsageError
from edgemix.models import registry, vip  # importing vip registers its family
from edgemix.models.checkpoints import load_weights


@pytest.fixture
def listed(monkeypatch):
    """The family visible to families() / family_of() (load_weights, macs) while the registry's
    FAMILY_MODULES does not name it yet; harmless once it does."""
    if "vip" not in registry.FAMILY_MODULES:
        monkeypatch.setattr(registry, "FAMILY_MODULES", (*registry.FAMILY_MODULES, "vip"))


# a config small enough to test on a CPU that still has every structural case: a stride-2
# transition with a width change, two segment sizes, mlp_ratio 2 and 3
SMALL = vip.ViPSpec("small", layers=(2, 1), transitions=(True, False), segment_dim=(8, 4), mlp_ratios=(3, 2),
                    embed_dims=(32, 48), patch_size=4, img_size=32, num_classes=7)


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """O(1) activations everywhere, LayerNorm affines away from (1, 0), so every path counts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)
    return model.eval()


def test_family_registered(listed):
    fam = registry.families()["vip"]
    assert fam.title == "Vision Permutator" and fam.spec_cls is vip.ViPSpec
    assert set(fam.variants) == {"vip-s14", "vip-s7", "vip-m7", "vip-l7", "vip-fmnist"}
    assert fam.paper_names["vip-m7"] == "ViP-Medium/7"
    assert registry.family_of(vip.VARIANTS["vip-s7"]) is fam
    assert vip.VARIANTS["vip-fmnist"].summary() == "layers 2-2, dims 112-140, segments 7-7, patch 4"
    assert vip.VARIANTS["vip-s7"].summary().endswith("patch 7, /2 after stage 0")


@pytest.mark.parametrize("alias, millions", [("vip-s14", 29.9), ("vip-s7", 25.1), ("vip-m7", 55.3),
                                             ("vip-l7", 87.8)])
def test_paper_parameter_counts(alias, millions):
    torch.manual_seed(0)
    with torch.device("meta"):  # no memory, no init arithmetic
        model = vip.build_model(vip.VARIANTS[alias])
    n = sum(p.numel() for p in model.parameters())
    print(f"{alias}: {n} parameters")
    # the paper rounds to 0.1M; 0.05M is that rounding
    assert abs(n / 1e6 - millions) <= 0.05, n


def test_macs_on_meta(listed):
    torch.manual_seed(0)
    spec = vip.VARIANTS["vip-fmnist"]
    model = vip.build_model(spec)
    from edgemix.models.module import count_macs

    assert spec.macs() == count_macs(model, torch.zeros(1, 1, 28, 28)) > 0  # exact: same hooks, same graph


# ------------------------------------------------------------------ the authors' formulation

def authors_forward(sd: dict, spec: vip.ViPSpec, x: torch.Tensor) -> torch.Tensor:
    """The authors' forward, written from their paper code's shapes: 5-D reshapes/permutes,
    softmax(dim=0) over the permuted (3, B, C), token mean over a flattened (B, HW, C)."""

    def lin(t, key):
        return F.linear(t, sd[f"{key}.weight"], sd.get(f"{key}.bias"))

    def ln(t, key):
        return F.layer_norm(t, t.shape[-1:], sd[f"{key}.weight"], sd[f"{key}.bias"], spec.ln_eps)

    def mlp(t, key):
        return lin(F.gelu(lin(t, f"{key}.fc1")), f"{key}.fc2")

    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=spec.patch_size)
    x = x.permute(0, 2, 3, 1)
    j, n = 0, len(spec.layers)
    for i, depth in enumerate(spec.layers):
        seg = spec.segment_dim[i]
        for b in range(depth):
            p = f"network.{j}.{b}"
            t = ln(x, f"{p}.norm1")
            B, H, W, C = t.shape
            S = C // seg
            h = t.reshape(B, H, W, seg, S).permute(0, 3, 2, 1, 4).reshape(B, seg, W, H * S)
            h = lin(h, f"{p}.attn.mlp_h").reshape(B, seg, W, H, S).permute(0, 3, 2, 1, 4).reshape(B, H, W, C)
            w = t.reshape(B, H, W, seg, S).permute(0, 1, 3, 2, 4).reshape(B, H, seg, W * S)
            w = lin(w, f"{p}.attn.mlp_w").reshape(B, H, seg, W, S).permute(0, 1, 3, 2, 4).reshape(B, H, W, C)
            c = lin(t, f"{p}.attn.mlp_c")
            a = (h + w + c).permute(0, 3, 1, 2).flatten(2).mean(2)
            a = mlp(a, f"{p}.attn.reweight").reshape(B, C, 3).permute(2, 0, 1).softmax(dim=0)
            a = a.unsqueeze(2).unsqueeze(2)
            x = x + lin(h * a[0] + w * a[1] + c * a[2], f"{p}.attn.proj") / spec.skip_lam
            x = x + mlp(ln(x, f"{p}.norm2"), f"{p}.mlp") / spec.skip_lam
        j += 1
        if i < n - 1 and (spec.transitions[i] or spec.embed_dims[i] != spec.embed_dims[i + 1]):
            k = 2 if spec.transitions[i] else 1
            x = F.conv2d(x.permute(0, 3, 1, 2), sd[f"network.{j}.proj.weight"], sd[f"network.{j}.proj.bias"],
                         stride=k).permute(0, 2, 3, 1)
            j += 1
    x = ln(x, "norm")
    B, C = x.shape[0], x.shape[-1]
    return lin(x.reshape(B, -1, C).mean(1), "head")


@pytest.mark.parametrize("spec", [SMALL, SMALL.with_overrides(skip_lam=2.0), vip.VARIANTS["vip-fmnist"]],
                         ids=["small", "small-skip-lam-2", "vip-fmnist"])
def test_forward_equals_authors_formulation(spec):
    torch.manual_seed(1)
    model = randomize(vip.build_model(spec), seed=1)
    x = torch.randn(3, spec.in_chans, spec.img_size, spec.img_size)
    with torch.no_grad():
        ours, theirs = model(x), authors_forward(model.state_dict(), spec, x)
    assert ours.shape == (3, spec.num_classes)
    assert theirs.std() > 0.1  # the comparison is not between two near-zero outputs
    # FP32 vs FP32, same ops in another order (4-D vs 5-D permutes, mean over (2, 3) vs a flat mean)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ the authors' checkpoints

@pytest.mark.parametrize("wrap", ["state_dict_ema", "state_dict", "module.", "model."])
def test_authors_checkpoint_loads(listed, tmp_path, wrap):
    torch.manual_seed(2)
    src = randomize(vip.build_model(SMALL), seed=2)
    sd = src.state_dict()  # the authors' key layout: the same names
    if wrap.endswith("."):  # a DDP-saved or wrapped-model state dict, keys prefixed
        payload = {f"{wrap}{k}": v for k, v in sd.items()}
    else:
        payload = {wrap: sd, "epoch": 299}  # a training checkpoint: the container is unwrapped
    path = tmp_path / "vip_small.pth"
    torch.save(payload, path)

    dst = randomize(vip.build_model(SMALL), seed=3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(dst(x), src(x))
        prov = load_weights(dst, path)
        assert torch.equal(dst(x), src(x))  # identical weights, identical function: bit-exact
    assert prov["format"] == "state-dict" and prov["reset"] == []


def test_importer_keeps_tensors_drops_the_rest():
    t = torch.zeros(2, dtype=torch.float16)
    sd, unexpected = registry.FAMILIES["vip"].import_state_dict(
        {"model.head.bias": t, "norm.weight": t, "epoch": 3, "args": {"lr": 1e-3}}, SMALL)
    assert set(sd) == {"head.bias", "norm.weight"} and sd["head.bias"].dtype == torch.float32
    assert unexpected == ["epoch", "args"]


@pytest.mark.parametrize("fault", ["renamed", "wrong-shape"])
def test_checkpoint_mismatch_is_listed(listed, tmp_path, fault):
    torch.manual_seed(4)
    sd = vip.build_model(SMALL).state_dict()
    if fault == "renamed":
        sd["network.0.1.attn.mlp_hh.weight"] = sd.pop("network.0.1.attn.mlp_h.weight")
        needles = ["missing keys (1): network.0.1.attn.mlp_h.weight",
                   "unexpected keys (1): network.0.1.attn.mlp_hh.weight"]
    else:
        sd["network.2.0.attn.proj.weight"] = sd["network.2.0.attn.proj.weight"][:, :40]
        needles = ["wrong-shaped keys: network.2.0.attn.proj.weight is [48, 40] in the file, model expects [48, 48]"]
    path = tmp_path / "bad.pth"
    torch.save({"state_dict_ema": sd}, path)
    with pytest.raises(CheckpointError) as e:
        load_weights(vip.build_model(SMALL), path)
    for n in needles:
        assert n in str(e.value), str(e.value)


# ------------------------------------------------------------------ the image-size contract

@pytest.mark.parametrize("alias, size, fits", [("vip-s7", 256, 224), ("vip-s14", 448, 224), ("vip-m7", 112, 224),
                                               ("vip-l7", 230, 224), ("vip-fmnist", 32, 28)])
def test_image_size_must_fit_the_segments(alias, size, fits):
    torch.manual_seed(5)
    with pytest.raises(UsageError) as e:
        vip.VARIANTS[alias].with_overrides(img_size=size)
    msg = str(e.value)
    assert f"image size {size}" in msg and f"use image size {fits}" in msg, msg
    spec = vip.VARIANTS[alias].with_overrides(img_size=fits, num_classes=5)
    assert spec.img_size == fits and spec.num_classes == 5


def test_fmnist_variant_fits():
    torch.manual_seed(6)
    spec = vip.VARIANTS["vip-fmnist"].with_overrides(img_size=28)
    assert spec.grids() == list(spec.segment_dim) == [7, 7]
    model = vip.build_model(spec).eval()
    assert 0.3e6 <= sum(p.numel() for p in model.parameters()) <= 1e6
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_inconsistent_specs_are_refused():
    torch.manual_seed(7)
    with pytest.raises(UsageError, match="cannot all equal the token grid"):
        SMALL.with_overrides(segment_dim=(8, 8))  # stage 1 sees a 4x4 grid after the transition
    with pytest.raises(UsageError, match="not a multiple of its segment_dim"):
        SMALL.with_overrides(embed_dims=(36, 48))
    with pytest.raises(UsageError, match="one entry per stage"):
        SMALL.with_overrides(layers=(1, 1, 1))


def test_spec_round_trips():
    torch.manual_seed(8)
    for spec in (*vip.VARIANTS.values(), SMALL):
        back = vip.ViPSpec.from_dict(spec.to_dict())
        assert back == spec and hash(back) == hash(spec)


# ------------------------------------------------------------------ edge exports

def test_executorch_xnnpack_takes_everything(listed):
    pytest.importorskip("executorch.exir")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
        XnnpackPartitioner,
    )
    from executorch.exir import to_edge_transform_and_lower
    from executorch.extension.pybindings.portable_lib import (
        _load_for_executorch_from_buffer,
    )

    from edgemix.backends.executorch.delegation import (
        _partitioner_reasons,
        delegation_report,
    )

    torch.manual_seed(9)
    model = randomize(vip.build_model(vip.VARIANTS["vip-fmnist"]), seed=9)
    x = torch.randn(1, 1, 28, 28)
    from edgemix.backends.executorch.passes import export_view

    view, what = export_view(model)  # what the ExecuTorch backend lowers
    assert "LayerNorm" in what
    assert view.head.weight is model.head.weight  # shared parameters, untouched module tree
    assert any(isinstance(m, nn.LayerNorm) for m in model.modules())
    with torch.no_grad():
        ref = model(x)
        # the LayerNorm rewritten as linear-means and rsqrt: float rounding apart, the same function
        torch.testing.assert_close(view(x), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.export.export(model, (x,)).module()(x), ref, rtol=1e-6, atol=1e-6)

    with _partitioner_reasons() as reasons:
        edge = to_edge_transform_and_lower(torch.export.export(view, (x,)), partitioner=[XnnpackPartitioner()])
    report = delegation_report(edge.exported_program().graph_module, reasons)
    assert report["outside_ops"] == 0, report["not_delegated"]
    assert report["partitions"] == 1
    gemms = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules())
    assert report["gemm_not_delegated"] == 0 and report["gemm_delegated"] >= gemms

    pte = edge.to_executorch().buffer  # held: the runtime reads the program from this memory
    program = _load_for_executorch_from_buffer(pte)
    out = program.forward((x,))[0]
    # XNNPACK's own FP32 kernels (other accumulation order, fused GEMM epilogues)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_onnx_export_matches_onnxruntime():
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(10)
    model = randomize(vip.build_model(vip.VARIANTS["vip-fmnist"]), seed=10)
    buf = io.BytesIO()
    torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), buf, dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 1, 28, 28)  # another batch than exported: the graph does not bake it in
    out = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    with torch.no_grad():
        # onnxruntime's FP32 kernels (MLAS GEMMs, fused LayerNormalization) vs PyTorch's
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)

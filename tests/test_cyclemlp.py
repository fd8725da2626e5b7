"""CycleMLP family (edgemix/models/cyclemlp.py): CycleFC against deform_conv2d's sampling, sizes and
costs of the paper variants, the forward against the authors' formulation, the authors' checkpoint
layout, and export to ExecuTorch/XNNPACK and ONNX."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import edgemix.models.cyclemlp as cm  # registers the family
from edgemix.errors import CheckpointError, UsageError
from edgemix.models import registry

FMNIST = cm.VARIANTS["cyclemlp-fmnist"]
# 3 stages, channel counts that are not multiples of 3, maps down to 2 x 2: every token is a border one
TINY = cm.CycleMLPSpec("tiny", layers=(2, 1, 1), embed_dims=(8, 13, 16), mlp_ratios=(2, 3, 1), img_size=32,
                       in_chans=2, num_classes=5, mean=(0.5, 0.5), std=(0.25, 0.25))


@pytest.fixture(autouse=True)
def _cyclemlp_listed(monkeypatch):
    """family_of() (used by load_weights) only looks at registry.FAMILY_MODULES, which does not list
    cyclemlp yet; the test lists it for its duration instead of editing the registry."""
    if "cyclemlp" not in registry.FAMILY_MODULES:
        monkeypatch.setattr(registry, "FAMILY_MODULES", (*registry.FAMILY_MODULES, "cyclemlp"))


def authors_offsets(c: int, kernel) -> np.ndarray:
    """The authors' gen_offset for a 1x3 / 3x1 CycleFC, written out: (2c,) as dy, dx per channel."""
    off = np.zeros(2 * c)
    for i in range(c):
        off[2 * i + (1 if kernel == (1, 3) else 0)] = (i + 1) % 3 - 1
    return off


def deform_conv_ref(x, weight, bias, offsets):
    """torchvision's deform_conv2d with a 1x1 kernel, stride 1, no padding and one offset group per
    input channel, in float64 NumPy: bilinear sampling of channel i at (p + dy_i, q + dx_i), a sample
    at or beyond one pixel outside the image reading 0, each corner outside the image reading 0."""
    x = np.asarray(x, np.float64)
    b_, c, h, w = x.shape
    sampled = np.zeros_like(x)
    pp, qq = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    for i in range(c):
        y, xq = pp + offsets[2 * i], qq + offsets[2 * i + 1]
        inside = (y > -1) & (y < h) & (xq > -1) & (xq < w)
        y0, x0 = np.floor(y).astype(int), np.floor(xq).astype(int)
        ly, lx = y - y0, xq - x0
        acc = np.zeros((b_, h, w))
        for cy, wy in ((y0, 1 - ly), (y0 + 1, ly)):
            for cx, wx in ((x0, 1 - lx), (x0 + 1, lx)):
                ok = inside & (cy >= 0) & (cy < h) & (cx >= 0) & (cx < w)
                vals = x[:, i, np.clip(cy, 0, h - 1), np.clip(cx, 0, w - 1)]
                acc += np.where(ok, wy * wx, 0.0) * vals
        sampled[:, i] = acc
    w2 = np.asarray(weight, np.float64).reshape(weight.shape[0], c)
    return np.einsum("oi,bihw->bohw", w2, sampled) + np.asarray(bias, np.float64)[None, :, None, None]


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights far from the init (zero biases, LayerNorms at 1/0, a uniform softmax), so that every
    branch and every parameter shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "norm" in name and name.endswith("weight") else 0.3 * noise)
    return model.eval()


@pytest.mark.parametrize("kernel", [(1, 3), (3, 1)])
def test_cyclefc_matches_deform_conv_sampling(kernel):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    c, o = 7, 5  # 7: the offset pattern (0, +1, -1) does not tile the channels
    fc = cm.CycleFC(c, o, kernel)
    with torch.no_grad():
        fc.weight.copy_(torch.from_numpy(rng.standard_normal((o, c, 1, 1))))
        fc.bias.copy_(torch.from_numpy(rng.standard_normal(o)))
    assert torch.equal(cm.cycle_offsets(c, kernel).flatten(), torch.from_numpy(authors_offsets(c, kernel)).float())
    x = rng.standard_normal((2, c, 5, 6)).astype(np.float32)
    with torch.no_grad():
        got = fc(torch.from_numpy(x)).numpy()
    want = deform_conv_ref(x, fc.weight.detach().numpy(), fc.bias.detach().numpy(), authors_offsets(c, kernel))
    # fp32 vs float64, sums of 7 products of O(1) values: rounding ~1e-6
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # the borders are where a shift reads zeros: the first/last row (3x1) or column (1x3) must differ
    # from a wrap-around (circular) shift, or this test would not see a roll implementation
    rolled = torch.stack([torch.roll(torch.from_numpy(x)[:, i], shifts=(-int(authors_offsets(c, kernel)[2 * i]),
                                                                         -int(authors_offsets(c, kernel)[2 * i + 1])),
                                     dims=(1, 2)) for i in range(c)], 1)
    wrapped = F.conv2d(rolled, fc.weight, fc.bias).detach().numpy()
    assert np.abs(wrapped - want).max() > 1e-2


def param_formula(spec) -> int:
    """The authors' module tree counted by hand."""
    n = spec.in_chans * 49 * spec.embed_dims[0] + spec.embed_dims[0]
    for i, (layers, c, r) in enumerate(zip(spec.layers, spec.embed_dims, spec.mlp_ratios)):
        q = c // 4
        block = (4 * c + c * c + 2 * (c * c + c) + (c * q + q + q * 3 * c + 3 * c) + (c * c + c)
                 + (c * r * c + r * c + r * c * c + c))
        n += layers * block
        if i + 1 < len(spec.layers):
            n += 9 * c * spec.embed_dims[i + 1] + spec.embed_dims[i + 1]
    c = spec.embed_dims[-1]
    return n + 2 * c + c * spec.num_classes + spec.num_classes


def macs_formula(spec) -> int:
    """Per image, the paper's convention: a CycleFC costs C*C per position (its shift is free)."""
    side = (spec.img_size + 4 - 7) // 4 + 1
    total = side * side * spec.embed_dims[0] * spec.in_chans * 49
    for i, (layers, c, r) in enumerate(zip(spec.layers, spec.embed_dims, spec.mlp_ratios)):
        # per token: mlp_c, sfc_h, sfc_w, proj (C*C each) and the MLP; per image: the reweighting MLP
        total += layers * (side * side * (4 + 2 * r) * c * c + c * (c // 4) + (c // 4) * 3 * c)
        if i + 1 < len(spec.layers):
            side = (side + 2 - 3) // 2 + 1
            total += side * side * spec.embed_dims[i + 1] * c * 9
    return total + spec.embed_dims[-1] * spec.num_classes


# The paper's table has 15/27/38/52/76 M and 2.1/3.9/6.9/10.1/12.3 GFLOPs (multiply-accumulates).
# B5's count from the authors' code is 75,747,280 = 75.75 M, so its tenth is 75.7 here (75.8 misses by 0.053).
PAPER = {"cyclemlp-b1": (15.2, 2.1), "cyclemlp-b2": (26.8, 3.9), "cyclemlp-b3": (38.4, 6.9),
         "cyclemlp-b4": (51.8, 10.1), "cyclemlp-b5": (75.7, 12.3)}


@pytest.mark.parametrize("alias", list(PAPER))
def test_paper_variants_size_and_cost(alias):
    torch.manual_seed(0)
    spec = cm.VARIANTS[alias]
    with torch.device("meta"):  # shapes only: B5 costs no memory
        model = cm.build_model(spec)
    params = sum(p.numel() for p in model.parameters())
    assert params == param_formula(spec)
    millions, gmacs = PAPER[alias]
    assert abs(params / 1e6 - millions) < 0.05, params  # the paper's figures are rounded to 0.1 M
    assert spec.macs() == macs_formula(spec)
    assert abs(spec.macs() / 1e9 - gmacs) < 0.1, spec.macs()  # rounded to 0.1 G in the paper
    assert registry.family_of(spec).paper_names[alias] == f"CycleMLP-B{alias[-1]}"
    assert not any(k.endswith(("offset", "shift")) for k in model.state_dict())


def test_fmnist_variant_is_small():
    torch.manual_seed(0)
    model = cm.build_model(FMNIST)
    params = sum(p.numel() for p in model.parameters())
    assert 300_000 <= params <= 1_000_000, params
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert len(FMNIST.mean) == len(FMNIST.std) == FMNIST.in_chans == 1


def test_spec_roundtrip_and_validation():
    torch.manual_seed(0)
    for spec in (*cm.VARIANTS.values(), TINY):
        assert registry.spec_from_dict(spec.to_dict()) == spec
    with pytest.raises(UsageError, match="one value per stage"):
        cm.CycleMLPSpec("bad", (2, 2), (64,), (4, 4)).validate()
    with pytest.raises(UsageError, match="too small"):
        FMNIST.with_overrides(img_size=2)
    assert FMNIST.with_overrides(num_classes=3).num_classes == 3


def authors_forward(sd: dict, spec, x: torch.Tensor) -> torch.Tensor:
    """The authors' CycleNet.forward, written out in float64 from a state dict, CycleFC by the
    NumPy deform_conv2d reference with the authors' offsets."""
    sd = {k: v.double() for k, v in sd.items()}

    def ln(t, p):
        return F.layer_norm(t, t.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], 1e-5)

    def mlp(t, p):
        return F.linear(F.gelu(F.linear(t, sd[p + ".fc1.weight"], sd[p + ".fc1.bias"])), sd[p + ".fc2.weight"],
                        sd[p + ".fc2.bias"])

    def cycle_fc(t, p, kernel):  # NCHW in and out
        c = t.shape[1]
        out = deform_conv_ref(t.numpy(), sd[p + ".weight"].numpy(), sd[p + ".bias"].numpy(), authors_offsets(c, kernel))
        return torch.from_numpy(out)

    x = F.conv2d(x.double(), sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=4, padding=2)
    x = x.permute(0, 2, 3, 1)
    j = 0
    for i, layers in enumerate(spec.layers):
        for b in range(layers):
            p = f"network.{j}.{b}"
            y = ln(x, p + ".norm1")
            bsz, c = y.shape[0], y.shape[-1]
            h = cycle_fc(y.permute(0, 3, 1, 2), p + ".attn.sfc_h", (1, 3)).permute(0, 2, 3, 1)
            w = cycle_fc(y.permute(0, 3, 1, 2), p + ".attn.sfc_w", (3, 1)).permute(0, 2, 3, 1)
            cc = F.linear(y, sd[p + ".attn.mlp_c.weight"])
            a = (h + w + cc).permute(0, 3, 1, 2).flatten(2).mean(2)
            a = mlp(a, p + ".attn.reweight").reshape(bsz, c, 3).permute(2, 0, 1).softmax(dim=0)
            a = a.unsqueeze(2).unsqueeze(2)
            y = F.linear(h * a[0] + w * a[1] + cc * a[2], sd[p + ".attn.proj.weight"], sd[p + ".attn.proj.bias"])
            x = x + y
            x = x + mlp(ln(x, p + ".norm2"), p + ".mlp")
        if i + 1 < len(spec.layers):
            x = F.conv2d(x.permute(0, 3, 1, 2), sd[f"network.{j + 1}.proj.weight"], sd[f"network.{j + 1}.proj.bias"],
                         stride=2, padding=1).permute(0, 2, 3, 1)
        j += 2
    x = ln(x, "norm").reshape(x.shape[0], -1, x.shape[-1])
    return F.linear(x.mean(1), sd["head.weight"], sd["head.bias"])


def test_forward_matches_authors_formulation():
    torch.manual_seed(0)
    model = randomize(cm.build_model(TINY), seed=1)
    x = torch.randn(3, 2, 32, 32)
    with torch.no_grad():
        got = model(x)
    want = authors_forward(model.state_dict(), TINY, x)
    assert want.abs().max() > 0.5  # logits of O(1): the tolerance below is meaningful
    # fp32 model vs float64 reference through 4 blocks, LayerNorm-bounded activations: ~1e-6 rounding
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    fmnist = randomize(cm.build_model(FMNIST), seed=2)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        got = fmnist(x)
    torch.testing.assert_close(got.double(), authors_forward(fmnist.state_dict(), FMNIST, x), atol=1e-5, rtol=0)


def authors_checkpoint(model, path, change=None, drop=None):
    """The authors' layout: the state dict plus each CycleFC's offset buffer, inside {'model': ...}."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for name, m in model.named_modules():
        if isinstance(m, cm.CycleFC):
            off = authors_offsets(m.in_channels, m.kernel)
            sd[f"{name}.offset"] = torch.from_numpy(off).float().reshape(1, -1, 1, 1)
    if change:
        key, index, value = change
        sd[key][0, index, 0, 0] = value
    if drop:
        del sd[drop]
    torch.save({"model": sd, "epoch": 299}, path)
    return path


def test_authors_checkpoint_loads(tmp_path):
    from edgemix.models.checkpoints import load_weights

    torch.manual_seed(0)
    source = randomize(cm.build_model(FMNIST), seed=3)
    target = cm.build_model(FMNIST).eval()
    prov = load_weights(target, authors_checkpoint(source, tmp_path / "CycleMLP_fmnist.pth"))
    assert prov["format"] == "state-dict" and prov["reset"] == []
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))  # the same weights, the same ops: bit for bit

    key = "network.2.1.attn.sfc_w.offset"
    bad = authors_checkpoint(source, tmp_path / "bad_offset.pth", change=(key, 10, 1.0))  # dy of channel 5 (-1)
    with pytest.raises(CheckpointError) as err:
        load_weights(cm.build_model(FMNIST), bad)
    assert key in str(err.value) and "dy of channel 5 is 1, expected -1" in str(err.value)
    assert "fixed offsets" in str(err.value)

    missing = authors_checkpoint(source, tmp_path / "missing.pth", drop="network.0.1.attn.mlp_c.weight")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): network\.0\.1\.attn\.mlp_c\.weight"):
        load_weights(cm.build_model(FMNIST), missing)


def test_import_state_dict_prefixes_and_strays():
    torch.manual_seed(0)
    sd = cm.build_model(FMNIST).state_dict()
    wrapped = {f"model.{k}": v for k, v in sd.items()} | {"model.network.0.0.attn.sfc_h.offset":
                                                          cm.cycle_offsets(64, (1, 3)), "note": "trained"}
    out, unexpected = cm.import_state_dict(wrapped, FMNIST)
    assert set(out) == set(sd) and unexpected == ["note"]
    with pytest.raises(CheckpointError, match=r"network\.0\.0\.attn\.sfc_h\.offset has shape \[1, 64, 1, 1\]"):
        cm.import_state_dict({"network.0.0.attn.sfc_h.offset": torch.zeros(1, 64, 1, 1)}, FMNIST)


def test_fmnist_lowers_to_xnnpack_whole():
    pytest.importorskip("executorch")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    from edgemix.backends.executorch.delegation import _partitioner_reasons, delegation_report

    torch.manual_seed(0)
    model = randomize(cm.build_model(FMNIST), seed=4)
    from edgemix.backends.executorch.passes import export_view

    view, what = export_view(model)  # what the ExecuTorch backend lowers
    assert "LayerNorms" in what and "4 token mixers' output Linear applied to (B, H*W, C) rows" in what
    assert isinstance(view.network[0][0].attn.proj, cm.RowProjection)
    assert type(model.network[0][0].attn.proj) is torch.nn.Linear  # the caller's model is untouched
    x = torch.randn(1, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
        # the export form is the same function (LayerNorm's mean as a Linear: fp32 rounding only)
        torch.testing.assert_close(view(x), ref, atol=1e-5, rtol=0)
    with _partitioner_reasons() as reasons:
        edge = to_edge_transform_and_lower(torch.export.export(view, (x,)), partitioner=[XnnpackPartitioner()])
    report = delegation_report(edge.exported_program().graph_module, reasons)
    print("delegation:", report)
    assert report["outside_ops"] == 0, report["not_delegated"]
    assert report["partitions"] == 1
    buffer = edge.to_executorch().buffer  # the runtime reads it in place: it must outlive the method
    method = Runtime.get().load_program(buffer).load_method("forward")
    out = method.execute([x])[0]
    # XNNPACK's fp32 kernels sum in another order than ATen's: rounding only, logits of O(1)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_fmnist_exports_to_onnx(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = randomize(cm.build_model(FMNIST), seed=5)
    path = tmp_path / "cyclemlp.onnx"
    torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # the 2 cores are shared
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = torch.randn(3, 1, 28, 28)  # another batch than the export's: the reshapes keep the batch dynamic
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    # onnxruntime's fp32 kernels vs PyTorch's: rounding only, logits of O(1)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_phone_dynamic_activations_lower_with_the_rows_export_form(tmp_path):
    """XNNPACK refused CycleMLP's dynamic INT8 program while a layout copy sat between the output
    Linear's dequantize and the GEMM; with the Linear on (B, H*W, C) rows (the export form) the copy
    comes before the run-time quantization: one XNNPACK partition, every GEMM dynamically quantized."""
    pytest.importorskip("executorch", reason="the executorch package (ExecuTorch toolchain) is not installed")
    import json

    from conftest import run_cli

    out = tmp_path / "cyc"
    p = run_cli("build", "--target", "phone", "--model", "cyclemlp-fmnist", "--backend-option", "activations=dynamic",
                "--eval-limit", "50", "--no-isa-check", "--no-compare-fp32", "--latency-runs", "5",
                "--latency-seconds", "0", "--out", out)
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads((out / "report.json").read_text())
    assert "at run time" in r["quantization"]["scheme"] and r["quantization"]["calibration_images"] == 0
    assert r["details"]["delegation"]["partitions"] == 1 and r["details"]["delegation"]["not_delegated"] == []
    assert r["drift"]["agreement"] >= 0.96


def test_phone_dynamic_activations_are_refused_cleanly_when_xnnpack_cannot_lower_them(tmp_path, monkeypatch):
    """Without that export form XNNPACK still rejects the program: a usage error naming the model, the
    option and the library's reason, pointing at static activations; nothing written."""
    pytest.importorskip("executorch", reason="the executorch package (ExecuTorch toolchain) is not installed")
    import dataclasses

    import edgemix

    monkeypatch.setitem(registry.FAMILIES, "cyclemlp",
                        dataclasses.replace(registry.FAMILIES["cyclemlp"], export_form=None))
    out = tmp_path / "cyc"
    with pytest.raises(UsageError) as err:
        edgemix.build("cyclemlp-fmnist", target="phone", out=out, eval_limit=20, isa_check=False, compare_fp32=False,
                      quiet=True, backend_options={"activations": "dynamic"})
    text = str(err.value)
    for needle in ("cyclemlp-fmnist cannot be lowered with dynamic INT8 activations",
                   "Weight and Input should both be quantized", "activations=static"):
        assert needle in text, text
    assert not out.exists() and not list(tmp_path.glob(".*staging*"))

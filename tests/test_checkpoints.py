"""Checkpoint importers, checked against files written in each format's exact layout.

The JAX test compares against a NumPy forward pass computed straight from the JAX-layout arrays
(NHWC images, HWIO conv kernel, (in, out) dense kernels), so a mapping that is self-consistent
but wrong (a missing transpose) fails.
"""

import math

import numpy as np
import pytest
import torch

from edgemix.errors import CheckpointError
from edgemix.models import build_model, load_model
from edgemix.models.checkpoints import load_weights, save_checkpoint
from edgemix.models.mixer import VARIANTS

SPEC = VARIANTS["fmnist"].with_overrides(hidden_dim=16, tokens_mlp_dim=8, channels_mlp_dim=32, depth=2,
                                         img_size=8, patch_size=4, num_classes=5, in_chans=3)


def jax_params(spec, rng):
    """Random arrays named and shaped exactly like Google's vision_transformer Mixer .npz."""
    c, s, p = spec.hidden_dim, spec.num_tokens, spec.patch_size
    r = lambda *shape: rng.normal(0, 0.3, shape).astype(np.float32)
    d = {"stem/kernel": r(p, p, spec.in_chans, c), "stem/bias": r(c),
         "pre_head_layer_norm/scale": 1 + r(c), "pre_head_layer_norm/bias": r(c),
         "head/kernel": r(c, spec.num_classes), "head/bias": r(spec.num_classes)}
    for i in range(spec.depth):
        b = f"MixerBlock_{i}/"
        d |= {b + "LayerNorm_0/scale": 1 + r(c), b + "LayerNorm_0/bias": r(c),
              b + "LayerNorm_1/scale": 1 + r(c), b + "LayerNorm_1/bias": r(c),
              b + "token_mixing/Dense_0/kernel": r(s, spec.tokens_mlp_dim), b + "token_mixing/Dense_0/bias": r(spec.tokens_mlp_dim),
              b + "token_mixing/Dense_1/kernel": r(spec.tokens_mlp_dim, s), b + "token_mixing/Dense_1/bias": r(s),
              b + "channel_mixing/Dense_0/kernel": r(c, spec.channels_mlp_dim), b + "channel_mixing/Dense_0/bias": r(spec.channels_mlp_dim),
              b + "channel_mixing/Dense_1/kernel": r(spec.channels_mlp_dim, c), b + "channel_mixing/Dense_1/bias": r(c)}
    return d


def numpy_forward(d, x_nhwc, spec):
    """The official Flax model, re-done in NumPy on the JAX-layout arrays."""
    erf = np.vectorize(math.erf)
    gelu = lambda t: 0.5 * t * (1 + erf(t / np.sqrt(2)))

    def ln(t, pre):
        mu, var = t.mean(-1, keepdims=True), t.var(-1, keepdims=True)
        return (t - mu) / np.sqrt(var + 1e-6) * d[pre + "/scale"] + d[pre + "/bias"]

    def mlp(t, pre):
        return gelu(t @ d[pre + "/Dense_0/kernel"] + d[pre + "/Dense_0/bias"]) @ d[pre + "/Dense_1/kernel"] + d[pre + "/Dense_1/bias"]

    n, h, w, cin = x_nhwc.shape
    p = spec.patch_size
    patches = x_nhwc.reshape(n, h // p, p, w // p, p, cin).transpose(0, 1, 3, 2, 4, 5).reshape(n, -1, p * p * cin)
    x = patches @ d["stem/kernel"].reshape(p * p * cin, -1) + d["stem/bias"]  # (n, S, C)
    for i in range(spec.depth):
        b = f"MixerBlock_{i}/"
        x = x + mlp(ln(x, b + "LayerNorm_0").transpose(0, 2, 1), b + "token_mixing").transpose(0, 2, 1)
        x = x + mlp(ln(x, b + "LayerNorm_1"), b + "channel_mixing")
    x = ln(x, "pre_head_layer_norm").mean(1)
    return x @ d["head/kernel"] + d["head/bias"]


@pytest.fixture
def jax_npz(tmp_path):
    d = jax_params(SPEC, np.random.default_rng(0))
    path = tmp_path / "Mixer-tiny.npz"
    np.savez(path, **d)
    return path, d


def torch_logits(model, x_nhwc):
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).contiguous()).numpy()


def test_jax_npz_matches_numpy_reference(jax_npz):
    path, d = jax_npz
    model = build_model(SPEC)
    prov = load_weights(model, path)
    assert prov["format"] == "jax" and len(prov["sha256"]) == 64
    x = np.random.default_rng(1).normal(size=(3, 8, 8, 3)).astype(np.float32)
    # fp32 vs float64 NumPy: differences are rounding only
    np.testing.assert_allclose(torch_logits(model, x), numpy_forward(d, x, SPEC), atol=1e-4, rtol=1e-4)


def test_jax_npz_without_stem_transpose_would_fail(jax_npz, tmp_path):
    """Guard the guard: a conv kernel stored transposed (OIHW read as HWIO) must not match."""
    _, d = jax_npz
    bad = dict(d)
    bad["stem/kernel"] = np.ascontiguousarray(d["stem/kernel"].transpose(1, 0, 2, 3))  # swap H and W
    path = tmp_path / "bad.npz"
    np.savez(path, **bad)
    model = build_model(SPEC)
    load_weights(model, path)
    x = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype(np.float32)
    assert not np.allclose(torch_logits(model, x), numpy_forward(d, x, SPEC), atol=1e-3)


def timm_state_dict(d, spec):
    """The same weights in timm's MlpMixer layout (OIHW conv, (out, in) Linear), keys spelled out."""
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    sd = {"stem.proj.weight": t(d["stem/kernel"].transpose(3, 2, 0, 1)), "stem.proj.bias": t(d["stem/bias"]),
          "norm.weight": t(d["pre_head_layer_norm/scale"]), "norm.bias": t(d["pre_head_layer_norm/bias"]),
          "head.weight": t(d["head/kernel"].T), "head.bias": t(d["head/bias"])}
    for i in range(spec.depth):
        b = f"MixerBlock_{i}/"
        sd |= {f"blocks.{i}.norm1.weight": t(d[b + "LayerNorm_0/scale"]), f"blocks.{i}.norm1.bias": t(d[b + "LayerNorm_0/bias"]),
               f"blocks.{i}.norm2.weight": t(d[b + "LayerNorm_1/scale"]), f"blocks.{i}.norm2.bias": t(d[b + "LayerNorm_1/bias"])}
        for jax_name, timm_name in (("token_mixing", "mlp_tokens"), ("channel_mixing", "mlp_channels")):
            for k, fc in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
                sd[f"blocks.{i}.{timm_name}.{fc}.weight"] = t(d[f"{b}{jax_name}/{k}/kernel"].T)
                sd[f"blocks.{i}.{timm_name}.{fc}.bias"] = t(d[f"{b}{jax_name}/{k}/bias"])
    return sd


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_state_dict(jax_npz, tmp_path, suffix):
    _, d = jax_npz
    sd = timm_state_dict(d, SPEC)
    path = tmp_path / f"mixer{suffix}"
    if suffix == ".pth":
        torch.save(sd, path)
    else:
        from safetensors.torch import save_file
        save_file(sd, str(path))
    model = build_model(SPEC)
    assert load_weights(model, path)["format"] == "timm"
    x = np.random.default_rng(2).normal(size=(2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(torch_logits(model, x), numpy_forward(d, x, SPEC), atol=1e-4, rtol=1e-4)


def test_edgemix_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(0)
    src = build_model(SPEC)
    with torch.no_grad():  # the head starts at zero: give every weight a value, so an unloaded one shows
        for p in src.parameters():
            p.normal_(0, 0.5)
    save_checkpoint(tmp_path / "m.pt", src, {"note": "unit"})
    dst = build_model(SPEC)
    x0 = torch.randn(2, 3, 8, 8)
    assert not torch.allclose(dst.eval()(x0), src.eval()(x0))  # a fresh model differs before loading
    prov = load_weights(dst, tmp_path / "m.pt")
    assert prov["format"] == "edgemix" and prov["meta"] == {"note": "unit"}
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(dst.eval()(x), src.eval()(x), atol=0, rtol=0)  # same weights: bit-identical


def test_mismatch_lists_missing_unexpected_and_wrong_shaped(jax_npz, tmp_path):
    _, d = jax_npz
    sd = timm_state_dict(d, SPEC)
    del sd["blocks.1.norm2.bias"]
    sd["blocks.0.extra.weight"] = torch.zeros(3)
    sd["blocks.0.mlp_channels.fc1.weight"] = torch.zeros(7, 16)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as e:
        load_weights(build_model(SPEC), tmp_path / "bad.pth")
    msg = str(e.value)
    assert "missing keys (1): blocks.1.norm2.bias" in msg
    assert "unexpected keys (1): blocks.0.extra.weight" in msg
    assert "blocks.0.mlp_channels.fc1.weight is [7, 16] in the file, model expects [32, 16]" in msg


def test_head_with_other_class_count_dropped_only_on_request(jax_npz, tmp_path):
    _, d = jax_npz
    model_spec = SPEC.with_overrides(num_classes=3)
    with pytest.raises(CheckpointError, match="--reset-head"):
        load_weights(build_model(model_spec), jax_npz[0])
    model = build_model(model_spec)
    prov = load_weights(model, jax_npz[0], reset_head=True)
    assert sorted(prov["reset"]) == ["head.bias", "head.weight"]
    # the backbone was loaded: the stem equals the file's kernel in OIHW
    np.testing.assert_array_equal(model.stem.proj.weight.detach().numpy(), d["stem/kernel"].transpose(3, 2, 0, 1))


@pytest.mark.parametrize("kind", ["truncated_pt", "garbage_npz", "truncated_safetensors", "empty_pth"])
def test_corrupt_checkpoints_are_clear_errors(tmp_path, jax_npz, kind):
    src = build_model(SPEC)
    if kind == "truncated_pt":
        save_checkpoint(tmp_path / "m.pt", src, {})
        path = tmp_path / "m.pt"
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "garbage_npz":
        path = tmp_path / "m.npz"
        path.write_bytes(b"not a zip at all")
    elif kind == "truncated_safetensors":
        from safetensors.torch import save_file
        path = tmp_path / "m.safetensors"
        save_file(src.state_dict(), str(path))
        path.write_bytes(path.read_bytes()[:100])
    else:
        path = tmp_path / "m.pth"
        path.write_bytes(b"")
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_weights(build_model(SPEC), path)
    assert path.read_bytes() == before  # nothing lost


def test_missing_checkpoint_and_unknown_suffix(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(build_model(SPEC), tmp_path / "nope.pt")
    (tmp_path / "w.h5").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"\.npz"):
        load_weights(build_model(SPEC), tmp_path / "w.h5")


def test_model_without_weights_needs_explicit_random(tmp_path):
    with pytest.raises(CheckpointError, match="--weights"):
        load_model("s32")
    model, prov = load_model("s32", allow_random=True, img_size=64)
    assert prov["format"] == "random-init" and model.spec.img_size == 64


def test_random_weights_means_random_even_where_weights_ship(tmp_path):
    """--random-weights (random_init) is what it says for a model with shipped weights too, and
    seeded; asking for it beside --weights is a usage error, not a silent choice."""
    from edgemix.errors import UsageError

    trained, prov = load_model("fmnist")
    assert prov["format"] != "random-init"
    a, prov_a = load_model("fmnist", random_init=True)
    b, _ = load_model("fmnist", random_init=True)
    assert prov_a["format"] == "random-init" and prov_a["path"] is None
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(a(x), b(x)) and not torch.allclose(a(x), trained(x))
    with pytest.raises(UsageError, match="--random-weights and --weights"):
        load_model("fmnist", tmp_path / "w.pt", random_init=True)

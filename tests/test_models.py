import pytest
import torch

from edgemix.errors import UsageError
from edgemix.models import VARIANTS, build_model, count_params, resolve_spec
from edgemix.models.mixer import MixerBlock

# Table 1 of Tolstikhin et al. (2021): (patch, C, depth, D_S, D_C, params in millions).
# The paper's parameter column counts the backbone (the classifier head depends on the
# pre-training label set); we compare rounded millions without the head.
PAPER = {
    "s32": (32, 512, 8, 256, 2048, 19), "s16": (16, 512, 8, 256, 2048, 18),
    "b32": (32, 768, 12, 384, 3072, 60), "b16": (16, 768, 12, 384, 3072, 59),
    "l32": (32, 1024, 24, 512, 4096, 206), "l16": (16, 1024, 24, 512, 4096, 207),
    "h14": (14, 1280, 32, 640, 5120, 431),
}


@pytest.mark.parametrize("alias", sorted(PAPER))
def test_variant_table_matches_paper(alias):
    patch, c, depth, ds, dc, params_m = PAPER[alias]
    spec = VARIANTS[alias]
    assert (spec.patch_size, spec.hidden_dim, spec.depth, spec.tokens_mlp_dim, spec.channels_mlp_dim) == \
        (patch, c, depth, ds, dc)
    with torch.device("meta"):
        model = build_model(spec)
    assert round(count_params(model, include_head=False) / 1e6) == params_m


def test_s16_sequence_length_and_macs():
    spec = VARIANTS["s16"]
    assert spec.num_tokens == 196  # the paper's S for /16 at 224 px
    # B/16: timm and the paper list ~12.6 GMACs per image
    assert abs(VARIANTS["b16"].macs() / 1e9 - 12.6) < 0.05


def test_forward_shapes_and_image_size_override():
    spec = resolve_spec("s32", img_size=64, num_classes=7)
    model = build_model(spec).eval()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 7)
    fm = build_model(resolve_spec("fmnist")).eval()
    assert fm(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_block_is_token_then_channel_mixing_with_skips():
    """Recompute one block by hand from its parameters: LN -> token MLP (over patches) -> skip,
    LN -> channel MLP -> skip; fp32 vs fp32, tolerance 1e-5."""
    spec = resolve_spec("fmnist")
    blk = MixerBlock(spec).eval()
    for p in blk.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, spec.num_tokens, spec.hidden_dim)
    F = torch.nn.functional
    ln = lambda t, m: F.layer_norm(t, (spec.hidden_dim,), m.weight, m.bias, spec.ln_eps)
    mlp = lambda t, m: F.linear(F.gelu(F.linear(t, m.fc1.weight, m.fc1.bias)), m.fc2.weight, m.fc2.bias)
    y = x + mlp(ln(x, blk.norm1).transpose(1, 2), blk.mlp_tokens).transpose(1, 2)
    y = y + mlp(ln(y, blk.norm2), blk.mlp_channels)
    torch.testing.assert_close(blk(x), y, atol=1e-5, rtol=1e-5)


def test_unknown_model_names_choices_and_closest():
    with pytest.raises(UsageError) as e:
        resolve_spec("s61")
    msg = str(e.value)
    assert "'s61'" in msg and "s16" in msg and "h14" in msg and "did you mean 's16'" in msg


def test_image_size_not_multiple_of_patch():
    with pytest.raises(UsageError, match="not a multiple of"):
        resolve_spec("s16", img_size=100)


def test_layernorm_affine_folds_into_the_linear_that_reads_it():
    from edgemix.models.mixer import fold_layernorm_affine

    torch.manual_seed(0)
    model = build_model(resolve_spec("fmnist")).eval()
    for m in model.modules():  # a trained-looking model: non-trivial scales, shifts and head
        if isinstance(m, torch.nn.LayerNorm):
            torch.nn.init.normal_(m.weight, 1.0, 0.5), torch.nn.init.normal_(m.bias, 0.0, 0.5)
    torch.nn.init.normal_(model.head.weight, 0.0, 0.1)
    x = torch.randn(8, 1, 28, 28)
    folded, n = fold_layernorm_affine(model)
    assert n == model.spec.depth + 1  # norm2 of every block and the pre-head norm
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
    assert folded.norm.weight is None and all(b.norm2.weight is None for b in folded.blocks)
    assert all(b.norm1.weight is not None for b in folded.blocks)  # token-side: cannot fold
    assert model.norm.weight is not None  # the caller's model is untouched

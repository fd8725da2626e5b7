"""MLP-Mixer (Tolstikhin et al., 2021) in plain PyTorch, and the variant table.

Parameter names follow timm's ``MlpMixer`` (``stem.proj``, ``blocks.N.norm1``,
``blocks.N.mlp_tokens.fc1`` ...) so that a timm state dict maps onto this module key
for key; the JAX importer maps Google's names onto the same keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from edgemix.models.registry import Family, SpecBase, import_same_keys, register


@dataclass(frozen=True)
class MixerSpec(SpecBase):
    """Everything needed to build one Mixer; stored inside edgemix checkpoints."""

    family: ClassVar[str] = "mixer"

    name: str
    patch_size: int
    hidden_dim: int  # C
    depth: int
    tokens_mlp_dim: int  # D_S
    channels_mlp_dim: int  # D_C
    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 1000
    # Per-channel input normalisation applied by the data pipeline (not the model).
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    ln_eps: float = 1e-6  # the official JAX code uses flax's default LayerNorm eps
    # Keras implementations (models/keras.py): the keras.io example uses ONE LayerNorm for both
    # pre-norms of a block and no LayerNorm before the head
    shared_norm: bool = False
    pre_head_norm: bool = True

    @property
    def num_tokens(self) -> int:  # S
        return (self.img_size // self.patch_size) ** 2

    def validate(self) -> None:
        from edgemix.errors import UsageError

        if self.img_size < self.patch_size:
            raise UsageError(f"image size {self.img_size} is smaller than {self.name}'s patch size {self.patch_size}",
                             hint=f"use an image size that is a multiple of {self.patch_size}")
        if self.img_size % self.patch_size:
            raise UsageError(
                f"image size {self.img_size} is not a multiple of {self.name}'s patch size {self.patch_size}",
                hint=f"use an image size such as {self.patch_size * (self.img_size // self.patch_size or 1)}",
            )

    def summary(self) -> str:
        return (f"patch {self.patch_size}, C {self.hidden_dim}, depth {self.depth}, D_S {self.tokens_mlp_dim}, "
                f"D_C {self.channels_mlp_dim}" + (", shared norm" if self.shared_norm else "")
                + ("" if self.pre_head_norm else ", no pre-head norm"))

    def macs(self) -> int:
        """Multiply-accumulates per image of the Linear/Conv layers (what dominates)."""
        s, c = self.num_tokens, self.hidden_dim
        stem = s * c * self.patch_size**2 * self.in_chans
        block = 2 * c * s * self.tokens_mlp_dim + 2 * s * c * self.channels_mlp_dim
        return stem + self.depth * block + c * self.num_classes


# The paper's Table 1; parameter counts (millions, head excluded) are in tests.
_IMAGENET = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
VARIANTS: dict[str, MixerSpec] = {
    "s32": MixerSpec("s32", 32, 512, 8, 256, 2048, **_IMAGENET),
    "s16": MixerSpec("s16", 16, 512, 8, 256, 2048, **_IMAGENET),
    "b32": MixerSpec("b32", 32, 768, 12, 384, 3072, **_IMAGENET),
    "b16": MixerSpec("b16", 16, 768, 12, 384, 3072, **_IMAGENET),
    "l32": MixerSpec("l32", 32, 1024, 24, 512, 4096, **_IMAGENET),
    "l16": MixerSpec("l16", 16, 1024, 24, 512, 4096, **_IMAGENET),
    "h14": MixerSpec("h14", 14, 1280, 32, 640, 5120, **_IMAGENET),
    # Small enough to train on 2 CPU cores in minutes; 7x7 tokens of 4x4 pixels.
    "fmnist": MixerSpec(
        "fmnist", 4, 128, 4, 64, 512, img_size=28, in_chans=1, num_classes=10,
        mean=(0.2860,), std=(0.3530,), ln_eps=1e-6,
    ),
}

PAPER_NAMES = {
    "s32": "Mixer-S/32", "s16": "Mixer-S/16", "b32": "Mixer-B/32", "b16": "Mixer-B/16",
    "l32": "Mixer-L/32", "l16": "Mixer-L/16", "h14": "Mixer-H/14", "fmnist": "Mixer-fmnist",
}


class Mlp(nn.Module):
    """Linear - GELU - Linear (the paper's MlpBlock)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact erf GELU, as jax.nn.gelu(approximate=False) in the release
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MixerBlock(nn.Module):
    def __init__(self, spec: MixerSpec):
        super().__init__()
        c = spec.hidden_dim
        self.norm1 = nn.LayerNorm(c, eps=spec.ln_eps)
        self.mlp_tokens = Mlp(spec.num_tokens, spec.tokens_mlp_dim)
        if not spec.shared_norm:
            self.norm2 = nn.LayerNorm(c, eps=spec.ln_eps)
        self.mlp_channels = Mlp(c, spec.channels_mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, S, C)
        x = x + self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.mlp_channels(getattr(self, "norm2", self.norm1)(x))


class PatchEmbed(nn.Module):
    def __init__(self, spec: MixerSpec):
        super().__init__()
        p = spec.patch_size
        self.proj = nn.Conv2d(spec.in_chans, spec.hidden_dim, kernel_size=p, stride=p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, S, C)


class MlpMixer(nn.Module):
    def __init__(self, spec: MixerSpec):
        super().__init__()
        self.spec = spec
        self.stem = PatchEmbed(spec)
        self.blocks = nn.Sequential(*[MixerBlock(spec) for _ in range(spec.depth)])
        self.norm = nn.LayerNorm(spec.hidden_dim, eps=spec.ln_eps) if spec.pre_head_norm else nn.Identity()
        self.head = nn.Linear(spec.hidden_dim, spec.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Paper/timm style init: truncated-normal-ish Linear weights, zero biases.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="linear")
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.norm(x).mean(dim=1)  # global average pooling over tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def count_params(model: nn.Module, include_head: bool = True) -> int:
    return sum(
        p.numel() for n, p in model.named_parameters() if include_head or not n.startswith("head.")
    )


def build_model(spec: MixerSpec) -> MlpMixer:
    return MlpMixer(spec)


def _fold_affine_into(ln: nn.LayerNorm, linear: nn.Linear) -> None:
    """linear(gamma * n + beta) == linear'(n): W' = W diag(gamma), b' = b + W beta; ln loses its affine."""
    with torch.no_grad():
        w = linear.weight.double()
        bias = linear.bias.double() if linear.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
        if ln.bias is not None:
            bias = bias + w @ ln.bias.double()
        if ln.weight is not None:
            w = w * ln.weight.double()[None, :]
        linear.weight.copy_(w.to(linear.weight.dtype))
        if linear.bias is None:
            linear.bias = nn.Parameter(bias.to(linear.weight.dtype))
        else:
            linear.bias.copy_(bias.to(linear.bias.dtype))
    ln.register_parameter("weight", None)
    ln.register_parameter("bias", None)
    ln.elementwise_affine = False


def fold_layernorm_affine(model: MlpMixer) -> tuple[MlpMixer, int]:
    """A copy of ``model`` with each LayerNorm's scale and shift folded into the Linear that reads it.

    Two LayerNorms per block feed a Linear over channels: ``norm2`` (channel MLP ``fc1``) and the
    pre-head ``norm`` (the token mean is linear, so ``head`` absorbs it). ``norm1`` cannot fold:
    its Linear mixes tokens, while its scale is per channel. The folded LayerNorms compute only
    (x - mean) / std, two element-wise ops fewer each when written as separate ops (the XNNPACK
    rewrite); the function is the same up to float rounding. Returns (copy, LayerNorms folded).
    """
    import copy

    folded = copy.deepcopy(model)
    # a block whose one LayerNorm also feeds the token MLP (shared_norm) cannot fold either
    pairs = [(b.norm2, b.mlp_channels.fc1) for b in folded.blocks if hasattr(b, "norm2")]
    if isinstance(folded.norm, nn.LayerNorm):
        pairs.append((folded.norm, folded.head))
    for ln, linear in pairs:
        _fold_affine_into(ln, linear)
    return folded, len(pairs)


register(Family(name="mixer", title="MLP-Mixer", spec_cls=MixerSpec, variants=VARIANTS, paper_names=PAPER_NAMES,
                build=build_model, import_state_dict=import_same_keys,  # timm's keys are ours;
                # Google's JAX .npz goes through checkpoints.py
                default_weights={"fmnist": "fmnist.pt"}))

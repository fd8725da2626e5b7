"""Vision Permutator (Hou et al., 2021) in plain PyTorch, and the variant table.

Parameter names are the authors' (houqb/VisionPermutator ``models/vip.py``: ``patch_embed.proj``,
``network.J.B.attn.mlp_h`` ...) so that their released state dicts load key for key.

The forward is the authors' function written for edge runtimes: their 5-D reshape/permute pairs
around ``mlp_h``/``mlp_w`` become 4-D ones (a Linear does not care in which order the other axes
lie, only the inverse must match), the branch softmax runs over the last dimension, and the two
means over tokens are means over dims (2, 3) of an NCHW tensor, the one form of mean XNNPACK takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from edgemix.errors import UsageError
from edgemix.models.registry import IMAGENET, Family, SpecBase, import_same_keys, register, trunc_normal_init


@dataclass(frozen=True)
class ViPSpec(SpecBase):
    """One Vision Permutator; per-stage tuples as in the authors' constructor."""

    family: ClassVar[str] = "vip"

    name: str
    layers: tuple[int, ...]
    transitions: tuple[bool, ...]  # a stride-2 downsample after stage i (the last entry is unused)
    segment_dim: tuple[int, ...]
    mlp_ratios: tuple[int, ...]
    embed_dims: tuple[int, ...]
    patch_size: int
    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 1000
    mean: tuple[float, ...] = IMAGENET["mean"]
    std: tuple[float, ...] = IMAGENET["std"]
    ln_eps: float = 1e-5  # the authors' nn.LayerNorm default
    skip_lam: float = 1.0

    def grids(self, first: int | None = None) -> list[int]:
        """Token grid side at each stage, starting from ``first`` (default: this image size's)."""
        g = self.img_size // self.patch_size if first is None else first
        out = []
        for i in range(len(self.layers)):
            out.append(g)
            if i < len(self.layers) - 1 and self.transitions[i]:
                g //= 2  # Conv2d(kernel 2, stride 2) floors
        return out

    def validate(self) -> None:
        n = len(self.layers)
        per_stage = ("transitions", "segment_dim", "mlp_ratios", "embed_dims")
        if n < 1 or any(len(getattr(self, f)) != n for f in per_stage):
            raise UsageError(f"{self.name}: layers, {', '.join(per_stage)} need one entry per stage each")
        for i, (dim, seg) in enumerate(zip(self.embed_dims, self.segment_dim)):
            if dim % seg:
                raise UsageError(f"{self.name}: stage {i} width {dim} is not a multiple of its segment_dim {seg}")
        # mlp_h / mlp_w are Linear(C, C) over H*S and W*S with S = C / segment_dim: they only fit
        # a token grid of exactly segment_dim x segment_dim at every stage
        if self.grids(self.segment_dim[0]) != list(self.segment_dim):
            raise UsageError(f"{self.name}: segment_dim {list(self.segment_dim)} cannot all equal the token grid "
                             f"(it halves after each stage i with transitions[i])")
        fit = self.patch_size * self.segment_dim[0]
        if self.img_size != fit:
            wrong = [(i, g, s) for i, (g, s) in enumerate(zip(self.grids(), self.segment_dim)) if g != s]
            if wrong:
                i, g, s = wrong[0]
                why = (f"gives {self.name} a {g}x{g} token grid at stage {i}, but its permute MLPs mix exactly "
                       f"{s} tokens along each axis")
            else:  # the grid fits but the patches would drop a border
                why = f"is not a multiple of {self.name}'s patch size {self.patch_size}"
            raise UsageError(f"image size {self.img_size} {why}",
                             hint=f"use image size {fit} (patch {self.patch_size} x segment {self.segment_dim[0]})")

    def summary(self) -> str:
        def dash(v):
            return "-".join(map(str, v))

        down = [i for i, t in enumerate(self.transitions[:-1]) if t]
        return (f"layers {dash(self.layers)}, dims {dash(self.embed_dims)}, segments {dash(self.segment_dim)}, "
                f"patch {self.patch_size}" + (f", /2 after stage {dash(down)}" if down else ""))


# The paper's four (the authors' vip_s14, vip_s7, vip_m7, vip_l7); parameter counts in tests/test_vip.py.
_F, _T = False, True
VARIANTS: dict[str, ViPSpec] = {
    "vip-s14": ViPSpec("vip-s14", (4, 3, 8, 3), (_F,) * 4, (16,) * 4, (3,) * 4, (384,) * 4, 14),
    "vip-s7": ViPSpec("vip-s7", (4, 3, 8, 3), (_T, _F, _F, _F), (32, 16, 16, 16), (3,) * 4, (192, 384, 384, 384), 7),
    "vip-m7": ViPSpec("vip-m7", (4, 3, 14, 3), (_F, _T, _F, _F), (32, 32, 16, 16), (3,) * 4, (256, 256, 512, 512), 7),
    "vip-l7": ViPSpec("vip-l7", (8, 8, 16, 4), (_T, _F, _F, _F), (32, 16, 16, 16), (3,) * 4, (256, 512, 512, 512), 7),
    # ~0.73M parameters, trains on 2 CPU cores: 7x7 tokens of 4x4 pixels; the width change between
    # the stages keeps a (1x1) Downsample in the graph the backends see
    "vip-fmnist": ViPSpec("vip-fmnist", (2, 2), (_F, _F), (7, 7), (3, 3), (112, 140), 4, img_size=28, in_chans=1,
                          num_classes=10, mean=(0.2860,), std=(0.3530,)),
}

PAPER_NAMES = {"vip-s14": "ViP-Small/14", "vip-s7": "ViP-Small/7", "vip-m7": "ViP-Medium/7",
               "vip-l7": "ViP-Large/7", "vip-fmnist": "ViP-fmnist"}


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact erf GELU, the authors' nn.GELU()
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class WeightedPermuteMLP(nn.Module):
    def __init__(self, dim: int, segment_dim: int):
        super().__init__()
        self.segment_dim = segment_dim
        self.mlp_c = nn.Linear(dim, dim, bias=False)
        self.mlp_h = nn.Linear(dim, dim, bias=False)
        self.mlp_w = nn.Linear(dim, dim, bias=False)
        self.reweight = Mlp(dim, dim // 4, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, H, W, C), C = seg * S
        _, hh, ww, c = x.shape
        g = self.segment_dim
        s = c // g
        # -1 for the batch: the graph does not depend on it (TensorRT's dynamic batch)
        # h: [b, w*g + k, h*S + s] = x[b, h, w, k*S + s]
        h = x.reshape(-1, hh, ww * g, s).transpose(1, 2).reshape(-1, ww * g, hh * s)
        h = self.mlp_h(h).reshape(-1, ww * g, hh, s).transpose(1, 2).reshape(-1, hh, ww, c)
        # w: [b*H + h, k, w*S + s] = x[b, h, w, k*S + s]
        w = x.reshape(-1, ww, g, s).transpose(1, 2).reshape(-1, g, ww * s)
        w = self.mlp_w(w).reshape(-1, g, ww, s).transpose(1, 2).reshape(-1, hh, ww, c)
        cc = self.mlp_c(x)
        a = (h + w + cc).permute(0, 3, 1, 2).mean((2, 3), keepdim=True).reshape(-1, c)
        # the authors' reshape (B, C, 3) -> permute -> softmax(dim=0): the same softmax, taken in place
        a = self.reweight(a).reshape(-1, c, 3).softmax(-1)

        def weight(k: int) -> torch.Tensor:  # a slice, not a select: XNNPACK has slice_copy, no select
            return a[:, :, k:k + 1].reshape(-1, 1, 1, c)

        return self.proj(h * weight(0) + w * weight(1) + cc * weight(2))


class PermutatorBlock(nn.Module):
    def __init__(self, dim: int, segment_dim: int, mlp_ratio: int, eps: float, skip_lam: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = WeightedPermuteMLP(dim, segment_dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.skip_lam = skip_lam

    def _skip(self, y: torch.Tensor) -> torch.Tensor:  # 1 in every released model: then no division op
        return y if self.skip_lam == 1.0 else y / self.skip_lam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._skip(self.attn(self.norm1(x)))
        return x + self._skip(self.mlp(self.norm2(x)))


class Downsample(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(dim_in, dim_out, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class PatchEmbed(nn.Module):
    def __init__(self, spec: ViPSpec):
        super().__init__()
        p = spec.patch_size
        self.proj = nn.Conv2d(spec.in_chans, spec.embed_dims[0], kernel_size=p, stride=p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # tokens channels-last: (B, H, W, C)


class VisionPermutator(nn.Module):
    def __init__(self, spec: ViPSpec):
        super().__init__()
        self.spec = spec
        dims = spec.embed_dims
        self.patch_embed = PatchEmbed(spec)
        network = []
        for i, depth in enumerate(spec.layers):
            network.append(nn.Sequential(*[
                PermutatorBlock(dims[i], spec.segment_dim[i], spec.mlp_ratios[i], spec.ln_eps, spec.skip_lam)
                for _ in range(depth)]))
            if i < len(spec.layers) - 1 and (spec.transitions[i] or dims[i] != dims[i + 1]):
                network.append(Downsample(dims[i], dims[i + 1], 2 if spec.transitions[i] else 1))
        self.network = nn.ModuleList(network)
        self.norm = nn.LayerNorm(dims[-1], eps=spec.ln_eps)
        self.head = nn.Linear(dims[-1], spec.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        trunc_normal_init(self, (nn.Linear,))  # the authors' init; Conv and LayerNorm as PyTorch's

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for stage in self.network:
            x = stage(x)
        x = self.norm(x)
        return x.permute(0, 3, 1, 2).mean((2, 3), keepdim=True).flatten(1)  # token mean as global avg pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def build_model(spec: ViPSpec) -> VisionPermutator:
    return VisionPermutator(spec)


register(Family(name="vip", title="Vision Permutator", spec_cls=ViPSpec, variants=VARIANTS, paper_names=PAPER_NAMES,
                build=build_model, import_state_dict=import_same_keys,  # the authors' key names are ours
                default_weights={"vip-fmnist": "vip-fmnist.pt"}))

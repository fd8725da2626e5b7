"""CycleMLP (Chen et al., 2021) as a plug-in family (models/registry.py). Module names follow the
authors' cycle_mlp.py (patch_embed.proj, network.{j}.{b}.attn.sfc_h, network.{j}.proj, norm, head)
so their checkpoints load key for key.

Their CycleFC is deform_conv2d with a 1x1 kernel and a *fixed* offset per input channel (a shift by
-1, 0 or +1 along one axis, zeros outside the image). Neither ONNX nor XNNPACK has deformable
convolution, so here the shift is a depthwise conv with a one-hot kernel and zero padding (the same
numbers, borders included), then the 1x1 conv. The offsets are thus no part of this model: the
importer checks a file's against the fixed pattern and refuses any other.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from edgemix.errors import CheckpointError, UsageError
from edgemix.models.registry import IMAGENET, Family, SpecBase, register, trunc_normal_init


@dataclass(frozen=True)
class CycleMLPSpec(SpecBase):
    family: ClassVar[str] = "cyclemlp"

    name: str
    layers: tuple[int, ...]  # blocks per stage; the number of stages is len(layers)
    embed_dims: tuple[int, ...]
    mlp_ratios: tuple[int, ...]
    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 1000
    mean: tuple[float, ...] = IMAGENET["mean"]
    std: tuple[float, ...] = IMAGENET["std"]

    def validate(self) -> None:
        n = len(self.layers)
        if n < 1 or len(self.embed_dims) != n or len(self.mlp_ratios) != n:
            raise UsageError(f"{self.name}: layers {list(self.layers)}, embed_dims {list(self.embed_dims)} and "
                             f"mlp_ratios {list(self.mlp_ratios)} need one value per stage")
        values = (*self.layers, *self.embed_dims, *self.mlp_ratios)
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values) or min(self.embed_dims) < 4:
            raise UsageError(f"{self.name}: layers, embed_dims and mlp_ratios must be positive integers, embed_dims "
                             ">= 4 (the reweighting MLP's hidden width is dim // 4)")
        if self.img_size < 3:  # the 7x7 / stride 4 / padding 2 stem yields no token below 3 px
            raise UsageError(f"image size {self.img_size} is too small for {self.name}'s 7x7 stem",
                             hint="use an image size of at least 3 (the variants use 28 or 224)")

    def summary(self) -> str:
        return (f"{len(self.layers)} stages, layers {list(self.layers)}, dims {list(self.embed_dims)}, "
                f"mlp ratios {list(self.mlp_ratios)}")

    def macs(self) -> int:
        """Multiply-accumulates per image in the paper's convention: a CycleFC costs its 1x1 (C*C per
        position); the one-hot depthwise conv that shifts its input is data movement, not counted
        (it would add 3*C per position per CycleFC: 0.005 GMACs for B1, 0.021 for B5)."""
        return _macs(self)


_IMAGENET_SPEC = dict(img_size=224, in_chans=3, num_classes=1000, **IMAGENET)
_S = (64, 128, 320, 512)
VARIANTS: dict[str, CycleMLPSpec] = {
    "cyclemlp-b1": CycleMLPSpec("cyclemlp-b1", (2, 2, 4, 2), _S, (4, 4, 4, 4), **_IMAGENET_SPEC),
    "cyclemlp-b2": CycleMLPSpec("cyclemlp-b2", (2, 3, 10, 3), _S, (4, 4, 4, 4), **_IMAGENET_SPEC),
    "cyclemlp-b3": CycleMLPSpec("cyclemlp-b3", (3, 4, 18, 3), _S, (8, 8, 4, 4), **_IMAGENET_SPEC),
    "cyclemlp-b4": CycleMLPSpec("cyclemlp-b4", (3, 8, 27, 3), _S, (8, 8, 4, 4), **_IMAGENET_SPEC),
    "cyclemlp-b5": CycleMLPSpec("cyclemlp-b5", (3, 4, 24, 3), (96, 192, 384, 768), (4, 4, 4, 4), **_IMAGENET_SPEC),
    # trainable on 2 CPU cores: the stride-4 stem gives 7x7 tokens, one downsample 4x4; ~0.62M parameters
    "cyclemlp-fmnist": CycleMLPSpec("cyclemlp-fmnist", (2, 2), (64, 128), (4, 4), img_size=28, in_chans=1,
                                    num_classes=10, mean=(0.2860,), std=(0.3530,)),
}
PAPER_NAMES = {**{f"cyclemlp-b{i}": f"CycleMLP-B{i}" for i in range(1, 6)}, "cyclemlp-fmnist": "CycleMLP-fmnist"}


def cycle_offsets(channels: int, kernel: tuple[int, int]) -> torch.Tensor:
    """The authors' fixed CycleFC offsets, (1, 2 * channels, 1, 1) as (dy, dx) per channel: along the
    kernel's long axis channel i moves by (i + k // 2) % k - k // 2, i.e. 0, +1, -1, ... for k = 3."""
    kh, kw = kernel
    if kh != 1 and kw != 1:
        raise UsageError(f"a CycleFC kernel is 1 x k or k x 1, got {kh} x {kw}")
    k = kh * kw
    along = (torch.arange(channels, device="cpu") + k // 2) % k - k // 2
    zero = torch.zeros_like(along)
    dy, dx = (zero, along) if kh == 1 else (along, zero)
    return torch.stack([dy, dx], dim=1).reshape(1, 2 * channels, 1, 1).float()


class CycleFC(nn.Module):
    """y[o, p, q] = bias[o] + sum_i weight[o, i] * x[i, p + dy_i, q + dx_i], zero outside the image."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int]):
        super().__init__()
        self.in_channels, self.kernel = in_channels, tuple(kernel)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 1, 1))  # the authors' shapes
        self.bias = nn.Parameter(torch.empty(out_channels))
        kh, kw = self.kernel
        dy, dx = cycle_offsets(in_channels, self.kernel).view(in_channels, 2).long().unbind(1)
        onehot = torch.zeros(in_channels, 1, kh, kw, device="cpu")
        onehot[torch.arange(in_channels), 0, dy + kh // 2, dx + kw // 2] = 1.0
        # derived from the fixed offsets, never trained: not in the state dict
        self.register_buffer("shift", onehot.to(self.weight.device), persistent=False)
        self.padding = (kh // 2, kw // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # NCHW -> NCHW
        x = F.conv2d(x, self.shift, padding=self.padding, groups=self.in_channels)
        return F.conv2d(x, self.weight, self.bias)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact erf GELU, as the authors' nn.GELU default
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, C): as a 4-D NCHW mean over (2, 3) with keepdim, the only mean XNNPACK has."""
    return x.permute(0, 3, 1, 2).mean((2, 3), keepdim=True).flatten(1)


class CycleMLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.mlp_c = nn.Linear(dim, dim, bias=False)
        self.sfc_h = CycleFC(dim, dim, (1, 3))
        self.sfc_w = CycleFC(dim, dim, (3, 1))
        self.reweight = Mlp(dim, dim // 4, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        c_dim = self.dim
        nchw = x.permute(0, 3, 1, 2)
        h = self.sfc_h(nchw).permute(0, 2, 3, 1)
        w = self.sfc_w(nchw).permute(0, 2, 3, 1)
        c = self.mlp_c(x)
        # reweight's output c * 3 + k weighs branch k of channel c: the authors' softmax over dim 0 of
        # the permuted (3, B, C) is this softmax over the last dim, which every runtime takes; slices
        # (not select, which XNNPACK lacks) pick the branch, -1 keeps the batch dynamic for ONNX
        a = self.reweight(_spatial_mean(h + w + c)).reshape(-1, c_dim, 3).softmax(-1)
        a0, a1, a2 = (a[:, :, k:k + 1].reshape(-1, 1, 1, c_dim) for k in range(3))
        return self.proj(h * a0 + w * a1 + c * a2)


class CycleBlock(nn.Module):
    def __init__(self, dim: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = CycleMLP(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Downsample(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, out, kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # NHWC in and out
        return self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=7, stride=4, padding=2)  # no norm, as the authors'

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # NCHW image -> NHWC tokens
        return self.proj(x).permute(0, 2, 3, 1)


class CycleNet(nn.Module):
    def __init__(self, spec: CycleMLPSpec):
        super().__init__()
        spec.validate()
        self.spec = spec
        dims = spec.embed_dims
        self.patch_embed = PatchEmbed(spec.in_chans, dims[0])
        network = []
        for i, (n, dim, ratio) in enumerate(zip(spec.layers, dims, spec.mlp_ratios)):
            network.append(nn.Sequential(*[CycleBlock(dim, ratio) for _ in range(n)]))
            if i + 1 < len(dims):  # the paper variants' transitions are all True
                network.append(Downsample(dim, dims[i + 1]))
        self.network = nn.ModuleList(network)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-5)
        self.head = nn.Linear(dims[-1], spec.num_classes)
        trunc_normal_init(self, (nn.Linear, CycleFC))  # the authors' init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for stage in self.network:
            x = stage(x)
        return self.head(_spatial_mean(self.norm(x)))


def build_model(spec: CycleMLPSpec) -> CycleNet:
    return CycleNet(spec)


@functools.lru_cache(maxsize=32)
def _macs(spec: CycleMLPSpec) -> int:
    from edgemix.models.module import count_macs

    extra = 0

    def cycle_fc(m, inp, out):  # its convs are functional, so count_macs does not see them
        nonlocal extra
        extra += out[0].numel() * m.in_channels

    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        model = CycleNet(spec)
        x = torch.zeros(1, spec.in_chans, spec.img_size, spec.img_size)
    for m in model.modules():
        if isinstance(m, CycleFC):
            m.register_forward_hook(cycle_fc)
    return count_macs(model, x) + extra


def _expected_offsets(spec: CycleMLPSpec) -> dict[str, torch.Tensor]:
    out = {}
    for i, (n, dim) in enumerate(zip(spec.layers, spec.embed_dims)):
        for b in range(n):  # stage i is network.{2i}: a downsample follows every stage but the last
            for name, kernel in (("sfc_h", (1, 3)), ("sfc_w", (3, 1))):
                out[f"network.{2 * i}.{b}.attn.{name}.offset"] = cycle_offsets(dim, kernel)
    return out


def _check_offset(key: str, found: torch.Tensor, expected: torch.Tensor) -> None:
    why = "edgemix computes CycleFC with the authors' fixed offsets only"
    hint = "a checkpoint trained with other offsets cannot be loaded"
    if tuple(found.shape) != tuple(expected.shape):
        raise CheckpointError(f"{key} has shape {list(found.shape)}, expected {list(expected.shape)}; {why}", hint)
    bad = (found.detach().float().cpu() != expected).flatten().nonzero().flatten()
    if len(bad):
        j = int(bad[0])
        raise CheckpointError(f"{key} differs from the fixed CycleFC offsets in {len(bad)} value(s): "
                              f"{('dy', 'dx')[j % 2]} of channel {j // 2} is {float(found.flatten()[j]):g}, expected "
                              f"{float(expected.flatten()[j]):g}; {why}", hint)


def import_state_dict(sd: dict, spec: CycleMLPSpec) -> tuple[dict, list[str]]:
    """The authors' keys as they are; each CycleFC's offset buffer checked against the fixed pattern
    and then dropped (this model computes the same shift with ordinary ops)."""
    expected = _expected_offsets(spec)
    out, unexpected = {}, []
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor) or not isinstance(k, str):
            unexpected.append(str(k))
            continue
        key = k.removeprefix("model.")
        if key in expected:
            _check_offset(key, v, expected[key])
            continue
        out[key] = v.float() if v.is_floating_point() else v  # an unknown *.offset is reported as unexpected
    return out, unexpected


# ------------------------------------------------------------------------------- export form

class RowProjection(nn.Module):
    """A token mixer's output Linear applied to its (B, H*W, C) rows: the same numbers.

    XNNPACK's layout pass keeps the Conv-derived branch sum in channels-last and converts it back
    just before the Linear. With dynamically quantized activations that copy lands between the
    input's dequantize and the GEMM, which XNNPACK refuses ("Weight and Input should both be
    quantized"); a reshape is an op that pass converts in front of, so the copy comes before the
    run-time quantization instead.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        return self.linear(x.reshape(b, h * w, c)).reshape(b, h, w, c)


def export_form(model: CycleNet) -> tuple[nn.Module, str]:
    from edgemix.models.module import replace_modules

    def rows(attn: CycleMLP) -> CycleMLP:
        attn.proj = RowProjection(attn.proj)
        return attn

    view, n = replace_modules(model, CycleMLP, rows)
    return view.eval(), f"{n} token mixers' output Linear applied to (B, H*W, C) rows"


register(Family(name="cyclemlp", title="CycleMLP", spec_cls=CycleMLPSpec, variants=VARIANTS,
                paper_names=PAPER_NAMES, build=build_model, import_state_dict=import_state_dict,
                export_form=export_form, default_weights={"cyclemlp-fmnist": "cyclemlp-fmnist.pt"},
                qdq_conv_outputs=True))

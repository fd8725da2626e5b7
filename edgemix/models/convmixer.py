"""ConvMixer ("Patches Are All You Need?", Trockman & Kolter): a plug-in family (models/registry.py).

Patch embedding as a strided conv, then blocks of a residual depthwise k x k conv and a pointwise
1 x 1 conv, each followed by the activation and then BatchNorm; average pooling; a linear head.
Module names follow timm's ConvMixer (stem.0 / stem.2, blocks.i.0.fn.0 / .fn.2, blocks.i.1 /
blocks.i.3, head) so timm state dicts map key for key; locuslab's release is one flat nn.Sequential
(0, 2, 3 + i, depth + 5), which the importer renumbers.

BatchNorm comes *after* the activation everywhere, so it cannot fold into the conv before it; the
export form writes each one as the per-channel affine it is in eval mode (x * s + t), which XNNPACK
delegates, where a standalone BatchNorm is not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from edgemix.errors import CheckpointError, UsageError
from edgemix.models.registry import IMAGENET, Family, SpecBase, register


@dataclass(frozen=True)
class ConvMixerSpec(SpecBase):
    family: ClassVar[str] = "convmixer"

    name: str
    dim: int  # h, the channels of every block
    depth: int
    kernel_size: int  # of the depthwise conv (odd: padding k // 2 is "same")
    patch_size: int
    activation: str = "gelu"  # "gelu" | "relu" (convmixer_768_32 was trained with ReLU)
    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 1000
    mean: tuple[float, ...] = IMAGENET["mean"]
    std: tuple[float, ...] = IMAGENET["std"]

    def validate(self) -> None:
        if self.activation not in ("gelu", "relu"):
            raise UsageError(f"ConvMixer activation '{self.activation}' is not gelu or relu")
        if self.kernel_size % 2 == 0:
            raise UsageError(f"ConvMixer kernel size {self.kernel_size} is even; 'same' padding needs an odd one")
        if self.img_size < self.patch_size:
            raise UsageError(f"image size {self.img_size} is smaller than {self.name}'s patch size {self.patch_size}",
                             hint=f"use an image size that is a multiple of {self.patch_size}")

    def summary(self) -> str:
        return f"h {self.dim}, depth {self.depth}, kernel {self.kernel_size}, patch {self.patch_size}, {self.activation}"


VARIANTS = {
    "convmixer-1536-20": ConvMixerSpec("convmixer-1536-20", 1536, 20, 9, 7),
    "convmixer-768-32": ConvMixerSpec("convmixer-768-32", 768, 32, 7, 7, activation="relu"),
    "convmixer-1024-20": ConvMixerSpec("convmixer-1024-20", 1024, 20, 9, 14),
    # trainable on 2 CPU cores: 14 x 14 patches of 2 x 2 pixels
    "convmixer-fmnist": ConvMixerSpec("convmixer-fmnist", 128, 6, 5, 2, img_size=28, in_chans=1, num_classes=10,
                                      mean=(0.2860,), std=(0.3530,)),
}
PAPER_NAMES = {"convmixer-1536-20": "ConvMixer-1536/20", "convmixer-768-32": "ConvMixer-768/32",
               "convmixer-1024-20": "ConvMixer-1024/20", "convmixer-fmnist": "ConvMixer-128/6 (fmnist)"}


class Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


def _act(spec: ConvMixerSpec) -> nn.Module:
    return nn.GELU() if spec.activation == "gelu" else nn.ReLU()


class ConvMixer(nn.Module):
    def __init__(self, spec: ConvMixerSpec):
        super().__init__()
        self.spec = spec
        h, k = spec.dim, spec.kernel_size
        self.stem = nn.Sequential(nn.Conv2d(spec.in_chans, h, spec.patch_size, stride=spec.patch_size), _act(spec),
                                  nn.BatchNorm2d(h))
        self.blocks = nn.Sequential(*[
            nn.Sequential(Residual(nn.Sequential(nn.Conv2d(h, h, k, groups=h, padding=k // 2), _act(spec),
                                                 nn.BatchNorm2d(h))),
                          nn.Conv2d(h, h, 1), _act(spec), nn.BatchNorm2d(h))
            for _ in range(spec.depth)])
        self.head = nn.Linear(h, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the average pool as a mean over (H, W) with keepdim: XNNPACK's global average pooling
        return self.head(self.blocks(self.stem(x)).mean((2, 3), keepdim=True).flatten(1))


def build_model(spec: ConvMixerSpec) -> ConvMixer:
    return ConvMixer(spec)


# ------------------------------------------------------------------------------- checkpoints

_BN_STATS = ("running_mean", "running_var")


def _from_locuslab(sd: dict, depth: int) -> dict:
    """locuslab's flat Sequential: 0 stem conv, 1 act, 2 BN, 3 .. 3 + depth - 1 the blocks, then pool,
    flatten and the head at depth + 5."""
    out = {}
    for k, v in sd.items():
        i, rest = k.split(".", 1)
        i = int(i)
        if i in (0, 2):
            out[f"stem.{i}.{rest}"] = v
        elif 3 <= i < 3 + depth:
            out[f"blocks.{i - 3}.{rest}"] = v
        elif i == depth + 5:
            out[f"head.{rest}"] = v
        else:
            out[k] = v  # reported as unexpected by the key check
    return out


def import_state_dict(sd: dict, spec: ConvMixerSpec) -> tuple[dict, list[str]]:
    """timm's keys as they are, locuslab's renumbered; BatchNorm statistics must be there (a file with
    only the learnable weights cannot reproduce the model in eval mode)."""
    tensors = {k.removeprefix("model."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    unexpected = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if tensors and all(re.match(r"\d+\.", k) for k in tensors):
        tensors = _from_locuslab(tensors, spec.depth)
    norms = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".running_mean") or k.endswith(".running_var")
             or (k.endswith(".weight") and k.rsplit(".", 1)[0] in _bn_names(spec))}
    lacking = sorted(n for n in norms if n in _bn_names(spec) and any(f"{n}.{s}" not in tensors for s in _BN_STATS))
    if lacking:
        raise CheckpointError(f"BatchNorm running statistics (running_mean, running_var) are missing for "
                              f"{len(lacking)} BatchNorm layer(s): {', '.join(lacking[:6])}"
                              + (" ..." if len(lacking) > 6 else ""),
                              hint="export the checkpoint with its buffers (model.state_dict()), not only the "
                                   "parameters")
    for n in _bn_names(spec):  # a counter BatchNorm only reads in training; some exports drop it
        tensors.setdefault(f"{n}.num_batches_tracked", torch.tensor(0))
    return {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()}, unexpected


def _bn_names(spec: ConvMixerSpec) -> set[str]:
    return {"stem.2"} | {f"blocks.{i}.{p}" for i in range(spec.depth) for p in ("0.fn.2", "3")}


# ------------------------------------------------------------------------------- export form

class ChannelAffine(nn.Module):
    """An eval-mode BatchNorm2d as the per-channel x * scale + shift it computes."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        with torch.no_grad():
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            shift = bn.bias - bn.running_mean * scale
        self.register_buffer("scale", scale.detach().reshape(1, -1, 1, 1).clone())
        self.register_buffer("shift", shift.detach().reshape(1, -1, 1, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


class DepthwiseBranch(nn.Sequential):
    """A block's residual branch (depthwise conv, activation, BatchNorm) in the export form: its own
    type, so that the ExecuTorch quantizer can leave it in float (``FLOAT_TYPES``)."""


# What the phone's INT8 quantizer leaves in float: the depthwise branches and every per-channel
# affine. Measured with ETDump on an x86 host (convmixer-fmnist, batch 1, 2 threads,
# `bench/etdump.py`): with every op in INT8, XNNPACK's INT8 depthwise conv ran at 2.1x its FP32
# time (0.31 vs 0.15 ms for the 6) and the INT8 per-channel mul/add at 1.7-3x, while the INT8 1x1
# convs ran at 0.46x, and the program (0.96 ms) was slower than the FP32 one (0.87 ms). With these in
# float it ran 0.54 ms. The depthwise convs hold 1-8% of a ConvMixer's MACs; INT8's speed is in the
# 1x1 convs, and the float branch skips its requantization error.


FLOAT_TYPES = (DepthwiseBranch, ChannelAffine)

# The phone's default activations for ConvMixer: dynamic. With the branches above in float, each
# static INT8 1x1 conv sat between two int8<->float converts and the program ran no faster than FP32
# (ETDump, convmixer-fmnist, 2026-12-01, Intel Xeon: 0.475 vs 0.482 ms; build 0.52 / 0.52 ms, the
# sign test "not faster"). XNNPACK's dynamically quantized GEMMs take and give float, one convert
# each: 0.460 ms; on the full test set 0.38 / 0.43 ms (0.90x) and 99.85% agreement against 99.54%
# static; convmixer-1024-20 0.83x, as static (docs/results/convmixer-*_phone_int8.json).
ACTIVATIONS = "dynamic"


def _float_branches(residual: nn.Module) -> nn.Module:
    residual.fn = DepthwiseBranch(*residual.fn)
    return residual


def export_form(model: ConvMixer) -> tuple[nn.Module, str]:
    from edgemix.models.module import replace_modules

    view, n = replace_modules(model, nn.BatchNorm2d, ChannelAffine)
    for block in view.blocks:
        _float_branches(block[0])
    view.float_types = FLOAT_TYPES
    view.activations = ACTIVATIONS
    return view.eval(), f"{n} BatchNorms (after an activation, not foldable into a conv) as per-channel affine mul/add"


register(Family(name="convmixer", title="ConvMixer", spec_cls=ConvMixerSpec, variants=VARIANTS,
                paper_names=PAPER_NAMES, build=build_model, import_state_dict=import_state_dict,
                export_form=export_form, default_weights={"convmixer-fmnist": "convmixer-fmnist.pt"},
                qdq_conv_outputs=True))

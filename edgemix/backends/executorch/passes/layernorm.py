"""LayerNorm as ops the XNNPACK partitioner delegates."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgemix.errors import UsageError


class XnnpackLayerNorm(nn.Module):
    """LayerNorm over the last dim, as ops the XNNPACK partitioner takes (sub, mul, rsqrt, add, linear).

    The two means over channels are a Linear with a constant 1/C row: XNNPACK's mean is global
    average pooling over the H, W of an NHWC tensor, so a mean over the innermost dim would need a
    transpose per mean; measured ~8% slower than this form (S/16 INT8, one thread). The quantizer
    is told to leave this module in float (statistics of a LayerNorm do not survive INT8).
    """

    def __init__(self, ln: nn.LayerNorm):
        super().__init__()
        if len(ln.normalized_shape) != 1:
            raise UsageError(f"cannot rewrite a LayerNorm over {tuple(ln.normalized_shape)} for XNNPACK",
                             hint="pass --backend-option decompose_layernorm=false")
        c = ln.normalized_shape[0]
        self.weight, self.bias, self.eps = ln.weight, ln.bias, ln.eps  # shared: QAT trains the originals
        self.register_buffer("average", torch.full((1, c), 1.0 / c), persistent=False)
        # eps rides in the variance mean's bias: one XNNPACK op fewer per LayerNorm
        self.register_buffer("eps_bias", torch.full((1,), float(ln.eps)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x - F.linear(x, self.average)
        y = d * torch.rsqrt(F.linear(d * d, self.average, self.eps_bias))
        if self.weight is not None:
            y = y * self.weight
        return y + self.bias if self.bias is not None else y


def decompose_layernorms(model: nn.Module) -> tuple[nn.Module, int]:
    """The model with every LayerNorm as an :class:`XnnpackLayerNorm` (shared weights); and how many."""
    from edgemix.models.module import replace_modules

    return replace_modules(model, nn.LayerNorm, XnnpackLayerNorm)

"""The patch-embedding Conv (kernel = stride) as patchify + Linear."""

from __future__ import annotations

import torch
from torch import nn

from edgemix.errors import UsageError


class PatchifyLinear(nn.Module):
    """The stem's Conv2d (kernel = stride = patch) as the matrix product it is: cut the image into
    patches with one reshape/permute/reshape, then one Linear over each patch's C*p*p pixels.

    Same function, same weights (the conv kernel flattened in its own (C, p, p) order). XNNPACK runs
    the Conv as an indirect GEMM behind an NCHW->NHWC transpose (0.54 ms of S/16's INT8 13 ms on this
    host); the permute is one int8 transpose and the Linear a plain GEMM (~0.2 ms).
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        p = conv.kernel_size[0]
        if (conv.kernel_size != (p, p) or conv.stride != (p, p) or conv.padding != (0, 0)
                or conv.dilation != (1, 1) or conv.groups != 1):
            raise UsageError(f"cannot write the stem {conv} as a patch Linear: kernel must equal stride, "
                             "no padding, dilation or groups")
        self.patch = p
        self.proj = nn.Linear(conv.in_channels * p * p, conv.out_channels, bias=conv.bias is not None)
        with torch.no_grad():
            self.proj.weight.copy_(conv.weight.reshape(conv.out_channels, -1))
            if conv.bias is not None:
                self.proj.bias.copy_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, S, hidden)
        b, c, h, w = x.shape
        p = self.patch
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return self.proj(patches.reshape(b, (h // p) * (w // p), c * p * p))

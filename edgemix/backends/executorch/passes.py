"""Export-time rewrites: an MlpMixer in the form XNNPACK delegates whole, each computing the same
function (tested to 1e-5 in FP32), and the provenance drop that keeps ExecuTorch's passes fast.
See edgemix.backends.executorch for why and the measurements."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgemix.errors import UsageError
from edgemix.models.mixer import MlpMixer, fold_layernorm_affine


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


class XnnpackMixer(nn.Module):
    """An MlpMixer's weights in the form XNNPACK delegates whole.

    - the token mean pool as global average pooling: (B, S, C) -> (B, C, S, 1) -> mean over (2, 3)
      with keepdim is the same mean over tokens in the one form XNNPACK's mean.dim accepts;
    - with ``decompose_layernorm`` every LayerNorm becomes an :class:`XnnpackLayerNorm`, the
      channel-side ones with their affine folded into the Linear that reads them;
    - with ``patch_linear`` the stem Conv becomes a :class:`PatchifyLinear`.

    The caller's model is never modified (the rewrites work on a copy or share its parameters).
    """

    def __init__(self, mixer: MlpMixer, decompose_layernorm: bool = True, patch_linear: bool = True):
        super().__init__()
        if decompose_layernorm:
            # a folded LayerNorm is (x - mean) / std alone: two delegated ops fewer each
            mixer, _ = fold_layernorm_affine(mixer)
            for parent in list(mixer.modules()):
                for name, child in list(parent.named_children()):
                    if isinstance(child, nn.LayerNorm):
                        setattr(parent, name, XnnpackLayerNorm(child))
        self.spec = mixer.spec
        # both stems map (B, C, H, W) -> (B, S, hidden)
        self.stem = PatchifyLinear(mixer.stem.proj) if patch_linear else mixer.stem
        self.blocks, self.norm, self.head = mixer.blocks, mixer.norm, mixer.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.blocks(self.stem(x)))
        _, s, c = y.shape
        pooled = y.transpose(1, 2).reshape(-1, c, s, 1).mean((2, 3), keepdim=True)
        return self.head(pooled.flatten(1))


def export_view(model: nn.Module, decompose_layernorm: bool = True,
                patch_linear: bool = True) -> tuple[nn.Module, str]:
    """The module to export and a one-line description of what was rewritten."""
    if not isinstance(model, MlpMixer):
        return model, "none (not an MlpMixer)"
    what = ["mean pool as global average pooling"]
    if decompose_layernorm:
        what.append("LayerNorm as linear-mean/sub/mul/rsqrt, the channel-side LayerNorms' affine folded "
                    "into the Linear that reads them")
    if patch_linear:
        what.append("patch-embedding Conv as patchify + Linear")
    return XnnpackMixer(model, decompose_layernorm, patch_linear).eval(), "; ".join(what)


def drop_provenance(exported: torch.export.ExportedProgram) -> int:
    """Drop each node's ``from_node`` provenance chain; returns how many nodes had one.

    torch.fx deep-copies a node's whole chain every time a pass re-creates the node, and the chain
    grows with every pass (export, prepare, convert, re-export, then the ~40 passes of edge
    conversion and XNNPACK preprocessing): measured on S/16 INT8, 4 s of the 24 s lowering went to
    those copies. Nothing in the .pte reads it; stack traces and module paths stay.
    """
    dropped = 0
    for node in exported.graph_module.graph.nodes:
        dropped += node.meta.pop("from_node", None) is not None
    return dropped

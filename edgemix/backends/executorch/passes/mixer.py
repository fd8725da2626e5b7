"""An MlpMixer in the form XNNPACK delegates whole: the other passes applied, the token mean as
global average pooling."""

from __future__ import annotations

import torch
from torch import nn

from edgemix.backends.executorch.passes.layernorm import XnnpackLayerNorm
from edgemix.backends.executorch.passes.patchify import PatchifyLinear
from edgemix.models.mixer import MlpMixer, fold_layernorm_affine


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
        # another family: its own export form (models/registry.py), then every LayerNorm in delegable ops
        from edgemix.backends.executorch.passes.layernorm import decompose_layernorms
        from edgemix.models.registry import export_form

        view, what = export_form(model)
        if decompose_layernorm:
            view, n = decompose_layernorms(view)
            if n:
                what = ("" if what == "none" else what + "; ") + f"{n} LayerNorms as linear-mean/sub/mul/rsqrt"
        return view.eval(), what
    what = ["mean pool as global average pooling"]
    if decompose_layernorm:
        what.append("LayerNorm as linear-mean/sub/mul/rsqrt, the channel-side LayerNorms' affine folded "
                    "into the Linear that reads them")
    if patch_linear:
        what.append("patch-embedding Conv as patchify + Linear")
    return XnnpackMixer(model, decompose_layernorm, patch_linear).eval(), "; ".join(what)

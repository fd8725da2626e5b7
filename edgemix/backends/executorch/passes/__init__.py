"""Export-time rewrites, one a file, each computing the same function as what it replaces (tested to
1e-5 in FP32): see edgemix.backends.executorch for why and the measurements."""

from edgemix.backends.executorch.passes.layernorm import XnnpackLayerNorm
from edgemix.backends.executorch.passes.mixer import XnnpackMixer, export_view
from edgemix.backends.executorch.passes.patchify import PatchifyLinear
from edgemix.backends.executorch.passes.provenance import drop_provenance

__all__ = ["PatchifyLinear", "XnnpackLayerNorm", "XnnpackMixer", "drop_provenance", "export_view"]

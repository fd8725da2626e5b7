"""ExecuTorch backend: torch.export -> PT2E INT8 (PTQ or QAT) -> XNNPACK delegate -> .pte.

One concern a module, as ExecuTorch lays out its own XNNPACK backend: ``quantizer`` (PT2E with
the XNNPACK quantizer, observers, PTQ/QAT), ``passes`` (the export rewrites), ``delegation`` (the
partition report), ``runtime`` (the host predictor and ETDump profile), ``native`` (the C++ runners
for x86-64 and arm64) and ``backend`` (the stages, registered as "executorch").

Besides the .pte the build writes a BundledProgram (.bpte): the same program with reference inputs
and the FP32 reference's outputs, which a device-side runner can verify without the host.

Delegation. Out of the box the XNNPACK partitioner takes every Linear, the stem Conv, GELU, the
residual adds and the transposes, but not LayerNorm (ATen's native_layer_norm has no XNNPACK
partitioner config) nor the mean over tokens (XNNPACK's only mean is global average pooling: a 4-D
tensor, dims (2, 3), keepdim). The export view below therefore writes, by default:
- the token mean in that 4-D form (one op, free);
- LayerNorm as linear-mean/sub/mul/rsqrt, which XNNPACK takes, with the affine of the channel-side
  LayerNorms folded into the Linear that reads them, so the whole Mixer is one delegate call instead
  of 18 (S/16) with a single-threaded CPU-kernel LayerNorm between each;
- the patch-embedding Conv (kernel = stride) as patchify + Linear.
Profiled with ETDump on this 2-core host (S/16 INT8, batch 1, 2 threads): a portable LayerNorm took
0.09-0.12 ms, the delegated one 0.06 ms; the stem went from 0.66 ms (NCHW->NHWC transpose + IGEMM) to
0.28 ms; the program from 13.4-13.9 ms to 11.4-11.6 ms. Fashion-MNIST drift on 10,000 images improved
with the affine folding (-0.05 pts, 99.19 % agreement, against -0.11 pts, 99.08 %). An earlier
measurement that had the LayerNorm rewrite 3.5-5 % slower was taken while onnxruntime's spinning
thread pool shared the cores. Options decompose_layernorm=false / patch_linear=false turn them off.
"""

from edgemix.backends.executorch.backend import ExecuTorchBackend, ExecuTorchOptions
from edgemix.backends.executorch.delegation import delegation_report
from edgemix.backends.executorch.passes import (PatchifyLinear, XnnpackLayerNorm, XnnpackMixer, drop_provenance,
                                                export_view)
from edgemix.backends.executorch.runtime import ExecuTorchPredictor, profile_ops

__all__ = ["ExecuTorchBackend", "ExecuTorchOptions", "ExecuTorchPredictor", "PatchifyLinear", "XnnpackLayerNorm",
           "XnnpackMixer", "delegation_report", "drop_provenance", "export_view", "profile_ops"]

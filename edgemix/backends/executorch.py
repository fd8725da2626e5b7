"""ExecuTorch backend: torch.export -> PT2E INT8 (PTQ or QAT) -> XNNPACK delegate -> .pte.

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

from __future__ import annotations

import contextlib
import logging
import operator
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgemix.backends.base import Backend, BuildJob, BuiltArtifact, register
from pydantic import BaseModel, ConfigDict, Field

from edgemix.errors import ToolchainError, UsageError
from edgemix.models.mixer import MlpMixer, fold_layernorm_affine

# ------------------------------------------------------------------------- export-time rewrite


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


# ---------------------------------------------------------------------------- delegation report

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


def _op_name(target) -> str:
    return getattr(target, "__name__", None) or str(target)


@contextlib.contextmanager
def _partitioner_reasons():
    """Collect the XNNPACK partitioner's 'WhyNoPartition' debug records as {node name: reason}."""
    reasons: dict[str, str] = {}

    class Collect(logging.Handler):
        def emit(self, record):
            why = record.msg  # the partitioner reuses one WhyNoPartition object: read it now
            node = getattr(why, "node", None)
            if node is not None and getattr(why, "reason", None):
                reasons.setdefault(node.name, why.reason)

    log = logging.getLogger("executorch.backends.xnnpack")
    handler, level, propagate = Collect(), log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False  # the debug records are for this report, not for the terminal
    try:
        yield reasons
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


_KNOWN_OUTSIDE = {
    "aten.native_layer_norm.default":
        "XNNPACK has no partitioner config for native_layer_norm; it runs on the CPU kernels between "
        "delegate calls (the default options decompose_layernorm=true rewrites it into delegated ops)",
}


def delegation_report(graph_module: torch.fx.GraphModule, reasons: dict[str, str]) -> dict:
    """Ops (by ATen name) inside XNNPACK partitions vs. left to the portable kernels, with a reason
    for every op left outside."""
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.exir.backend.canonical_partitioners.config_partitioner import format_target_name

    configured = {getattr(c, "target_name", None) for c in ALL_PARTITIONER_CONFIGS}
    delegated, outside, why = Counter(), Counter(), {}
    partitions = 0
    for node in graph_module.graph.nodes:
        if node.op == "get_attr" and node.name.startswith("lowered_module"):
            partitions += 1
            for inner in getattr(graph_module, node.target).original_module.graph.nodes:
                if inner.op == "call_function" and inner.target is not operator.getitem:
                    delegated[_op_name(inner.target)] += 1
        elif (node.op == "call_function" and node.target is not operator.getitem
              and "executorch_call_delegate" not in _op_name(node.target)):
            name = _op_name(node.target)
            outside[name] += 1
            if node.name in reasons:
                reason = f"XNNPACK partitioner rejected it: {reasons[node.name]}"
            elif name in _KNOWN_OUTSIDE:
                reason = _KNOWN_OUTSIDE[name]
            elif format_target_name(name) not in configured:
                reason = "XNNPACK has no partitioner config for this op; it runs on the portable CPU kernels"
            else:
                reason = "an XNNPACK config exists but the node was not claimed (precision or pattern not matched)"
            why.setdefault(name, [])
            if reason not in why[name]:
                why[name].append(reason)
    def gemms(counts):  # Linear and Conv, whatever form the lowering gave them
        return sum(v for k, v in counts.items()
                   if "linear" in k or "convolution" in k or k.endswith(".mm.default"))

    return {
        "partitions": partitions,
        "delegated_ops": sum(delegated.values()),
        "outside_ops": sum(outside.values()),
        "delegated": dict(sorted(delegated.items())),
        "not_delegated": [{"op": k, "count": v, "reasons": why[k]} for k, v in sorted(outside.items())],
        "gemm_delegated": gemms(delegated),
        "gemm_not_delegated": gemms(outside),
    }


# ------------------------------------------------------------------------------------- runtime

# The ExecuTorch threadpool is one per process; XNNPACK delegates keep a pointer to it from the
# moment their method is loaded. Resetting it (the only thread control the Python runtime has)
# therefore invalidates every loaded method: each predictor remembers the generation it was
# loaded in and reloads itself when the pool has been replaced since.
_POOL = {"threads": None, "generation": 0}


def _use_threads(threads: int) -> None:
    from executorch.extension.pybindings import portable_lib

    if threads < 1:
        raise UsageError(f"threads must be >= 1, got {threads}")
    if portable_lib._threadpool_get_thread_count() != threads:
        portable_lib._unsafe_reset_threadpool(threads)
        _POOL["generation"] += 1
    _POOL["threads"] = threads


class ExecuTorchPredictor:
    """Runs a written .pte with the ExecuTorch runtime (the XNNPACK delegate included)."""

    def __init__(self, path: Path, batch_size: int, dynamic_batch: bool, threads: int):
        self.path, self.batch_size, self.dynamic_batch = Path(path), batch_size, dynamic_batch
        self.threads = threads
        self._load()

    def _load(self) -> None:
        from executorch.runtime import Runtime

        _use_threads(self.threads)
        program = Runtime.get().load_program(self.path)
        self._method = program.load_method("forward")
        self._generation = _POOL["generation"]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if x.ndim != 4 or (x.shape[0] != self.batch_size and not self.dynamic_batch):
            raise UsageError(f"{self.path.name} takes float32 (B, C, H, W) batches of {self.batch_size}, "
                             f"got shape {tuple(x.shape)}", hint="use edgemix.backends.base.batched_predict")
        if self._generation != _POOL["generation"] or _POOL["threads"] != self.threads:
            self._load()
        out = self._method.execute([torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))])
        return out[0].numpy().copy()


# --------------------------------------------------------------------------------------- backend

class ExecuTorchOptions(BaseModel):
    """``--backend-option`` switches of this backend (pydantic's booleans: true/false, 1/0, yes/no, on/off)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    decompose_layernorm: bool = Field(True, description="write LayerNorm with ops XNNPACK delegates, so the "
                                      "Mixer is one delegate (false keeps ATen's native_layer_norm on the "
                                      "portable CPU kernel)")
    patch_linear: bool = Field(True, description="write the patch-embedding Conv as patchify + Linear")


@register
class ExecuTorchBackend(Backend):
    name = "executorch"
    precisions = ("int8", "fp32")
    supports_qat = True
    supports_dynamic_batch = False  # fixed batch: the XNNPACK plan is built once for one shape
    artifact_suffix = ".pte"
    options_model = ExecuTorchOptions

    def build(self, job: BuildJob) -> BuiltArtifact:
        self.check_request(job.target, job.precision, job.qat_epochs)
        try:
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
            from executorch.exir import to_edge_transform_and_lower

            from edgemix.quant import pt2e
        except ImportError as e:
            raise ToolchainError(f"the ExecuTorch toolchain cannot be imported ({e})",
                                 hint="pip install executorch==1.5.1 torchao==0.18.0") from None
        opts = self.parse_options(job.options)
        batch = job.target.export_batch
        bundle_x, bundle_y = _bundle_data(job, batch)  # bad bundle data fails before any work
        decompose = opts.decompose_layernorm
        model, rewrite = export_view(job.model, decompose, opts.patch_linear)
        float_modules = (XnnpackLayerNorm,) if decompose else ()
        example = _example_input(job, batch)

        t0 = time.perf_counter()  # exported before QAT too: a model that cannot export fails in seconds
        exported = pt2e.export_model(model, example)
        n_ops = sum(1 for n in exported.graph.nodes if n.op == "call_function")
        job.stage("export", f"torch.export graph: {n_ops} ops, batch {batch}", time.perf_counter() - t0, None)

        quant = {"scheme": "none", "observer": None, "calibration_images": 0, "qat_epochs": 0.0}
        float_ops: dict[str, int] = {}
        if job.precision == "int8":
            t0 = time.perf_counter()
            if job.qat_epochs > 0:
                converted = pt2e.qat(model, job.spec, job.train_set, job.qat_epochs, job.train_config,
                                     job.calib_inputs, job.recipe.observer, job.recipe.percentile, float_modules)
                quant.update(observer=f"{job.recipe.observer} (calibrated, then frozen for QAT)",
                             qat_epochs=float(job.qat_epochs), calibration_images=len(job.calib_inputs),
                             qat_train_images=len(job.train_set))
                produced = f"QAT {job.qat_epochs:g} epochs on {len(job.train_set)} images"
                stage_name = "qat"
            else:
                # calibrate in the recipe's batches, not the artifact's (a phone's is 1): a graph with
                # a symbolic batch for calibration, re-exported at the artifact's batch below. (Not
                # faster for S/16 on 2 cores: eager runs ~60 ms per image at batch 1 and at 32.)
                calib_batch = max(1, min(job.recipe.batch_size, len(job.calib_inputs)))
                observed = exported if calib_batch == batch else pt2e.export_model(
                    model, job.calib_inputs[:calib_batch].float(), dynamic_batch=True, max_batch=max(calib_batch, 2))
                converted = pt2e.ptq(observed, job.calib_inputs, calib_batch, job.recipe.observer,
                                     job.recipe.percentile, float_modules)
                quant.update(observer=job.recipe.observer, calibration_images=len(job.calib_inputs))
                if job.recipe.observer == "percentile":
                    quant["percentile"] = job.recipe.percentile
                produced = f"INT8 Q/DQ graph, {len(job.calib_inputs)} images, {job.recipe.observer} observers"
                stage_name = "calibrate"
            quant["scheme"] = pt2e.SCHEME
            float_ops = pt2e.float_ops(converted)
            with torch.no_grad():  # the quantized graph again at the artifact's fixed batch
                exported = torch.export.export(converted, (example,))
            job.stage(stage_name, produced, time.perf_counter() - t0, None)

        t0 = time.perf_counter()
        drop_provenance(exported)
        with _partitioner_reasons() as reasons:
            edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
        report = delegation_report(edge.exported_program().graph_module, reasons)
        gemms = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in job.model.modules())
        report["model_linear_conv"] = gemms
        report["all_linear_conv_delegated"] = (report["gemm_not_delegated"] == 0
                                               and report["gemm_delegated"] >= gemms)
        program = edge.to_executorch()
        job.stage("lower", f"{report['delegated_ops']} ops in {report['partitions']} XNNPACK partition(s), "
                  f"{report['outside_ops']} outside", time.perf_counter() - t0, len(program.buffer))

        t0 = time.perf_counter()
        pte = job.stage_dir / f"{job.basename}.pte"
        bpte = job.stage_dir / f"{job.basename}.bpte"
        cases = _write_artifacts(program, pte, bpte, bundle_x, bundle_y, batch)
        job.stage("write", f"{pte.name} + {bpte.name} ({cases} test cases)", time.perf_counter() - t0,
                  pte.stat().st_size)
        return BuiltArtifact(
            files={"model": pte, "bundled": bpte}, runtime="executorch", batch_size=batch, dynamic_batch=False,
            quantization=quant,
            details={"delegation": report, "export_rewrite": rewrite, "float_ops": float_ops,
                     "bundle_test_cases": cases,
                     "runtime_threads": "process-wide ExecuTorch threadpool (_unsafe_reset_threadpool); "
                                        "loaded methods are reloaded after a change"})

    def load_predictor(self, artifact: BuiltArtifact, threads: int) -> ExecuTorchPredictor:
        path = artifact.files.get("model")
        if path is None or not Path(path).is_file():
            raise UsageError(f"ExecuTorch program {path} does not exist", hint="build it first")
        return ExecuTorchPredictor(Path(path), artifact.batch_size, artifact.dynamic_batch, threads)


def profile_ops(pte: str | Path, x: np.ndarray, threads: int, runs: int = 30, warmup: int = 3) -> dict:
    """Where a .pte's time goes: ExecuTorch's ETDump of ``runs`` executions on ``x``, the median of
    each XNNPACK operator summed by kind ("Fully Connected (NC, QS8, QC8W) GEMM", "Convert (NC)", ...).

    Returns {"total_ms": median delegate + portable-kernel time of one execution, "ops": {kind:
    {"ms": summed medians, "count": operators of that kind}}}, kinds by descending time.
    """
    import re
    import statistics
    import tempfile

    from executorch.devtools import Inspector
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    _use_threads(threads)
    module = _load_for_executorch(str(pte), enable_etdump=True)
    inputs = [torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))]
    with tempfile.TemporaryDirectory(prefix="edgemix-etdump-") as tmp:
        for _ in range(warmup + runs):
            module.forward(inputs)
        dump = Path(tmp) / "run.etdp"
        module.write_etdump_result_to_file(str(dump))
        events = [ev for block in Inspector(etdump_path=str(dump)).event_blocks for ev in block.events
                  if ev.perf_data is not None]
    total, ops = 0.0, {}
    for ev in events:
        timed = ev.perf_data.raw[-runs:]  # one sample per execution; the warm-up ones dropped
        if ev.name == "Method::execute":
            total = statistics.median(timed)
        elif ev.name not in ("Program::load_method", "Method::init", "DELEGATE_CALL"):
            kind = re.sub(r" #\d+$", "", ev.name)
            row = ops.setdefault(kind, {"ms": 0.0, "count": 0})
            row["ms"] += statistics.median(timed)
            row["count"] += 1
    return {"total_ms": total, "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1]["ms"]))}


def _example_input(job: BuildJob, batch: int) -> torch.Tensor:
    spec = job.spec
    if job.calib_inputs is not None and len(job.calib_inputs) >= batch:
        return job.calib_inputs[:batch].float().contiguous()
    return torch.zeros(batch, spec.in_chans, spec.img_size, spec.img_size)


def _bundle_data(job: BuildJob, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference inputs and FP32 outputs for the BundledProgram; the FP32 model fills in missing outputs."""
    spec = job.spec
    x = job.bundle_inputs if job.bundle_inputs is not None else _example_input(job, batch)
    shape = (spec.in_chans, spec.img_size, spec.img_size)
    if x.ndim != 4 or tuple(x.shape[1:]) != shape or len(x) == 0:
        raise UsageError(f"bundle inputs must be (N, {', '.join(map(str, shape))}) for {spec.name}, "
                         f"got {tuple(x.shape)}")
    y = job.bundle_outputs
    if y is None:
        with torch.no_grad():
            y = torch.cat([job.model(x[i:i + 64].float()) for i in range(0, len(x), 64)])
    if tuple(y.shape) != (len(x), spec.num_classes):
        raise UsageError(f"bundle outputs must be ({len(x)}, {spec.num_classes}) to match the inputs, "
                         f"got {tuple(y.shape)}")
    return x.float().contiguous(), y.float().contiguous()


def _write_artifacts(program, pte: Path, bpte: Path, x: torch.Tensor, y: torch.Tensor, batch: int) -> int:
    """Write the .pte and the .bpte under temporary names, then rename both; on any failure remove
    what was written, so the stage folder never holds a half-written or orphaned artifact."""
    from executorch.devtools import BundledProgram
    from executorch.devtools.bundled_program import serialize
    from executorch.devtools.bundled_program.config import MethodTestCase, MethodTestSuite

    from edgemix.batching import pad_to_batch

    cases = []
    for i in range(0, len(x), batch):  # the program takes whole batches
        xb, yb = pad_to_batch(x[i:i + batch], batch), pad_to_batch(y[i:i + batch], batch)
        cases.append(MethodTestCase(inputs=[xb.contiguous()], expected_outputs=[yb.contiguous()]))
    finals = (pte, bpte)
    tmps = [p.with_name(f".{p.name}.tmp") for p in finals]
    placed: list[Path] = []
    try:
        with open(tmps[0], "wb") as f:
            program.write_to_file(f)
        bundled = BundledProgram(program, [MethodTestSuite(method_name="forward", test_cases=cases)])
        tmps[1].write_bytes(serialize.serialize_from_bundled_program_to_flatbuffer(bundled))
        for tmp, final in zip(tmps, finals):
            tmp.replace(final)
            placed.append(final)
    except BaseException:
        for path in placed:  # a .pte without its .bpte would look like a finished build
            path.unlink(missing_ok=True)
        raise
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
    return len(cases)

"""Will TensorRT take this ONNX? Checked on the host, before anything is copied to a Jetson.

An engine build on an Orin Nano takes minutes and its parser errors are terse, so every rule the
ONNX parser and TensorRT's explicit-quantization (Q/DQ) mode enforce that can be seen in the graph
is checked here: opset range, supported operators, shapes bounded by the optimization profile, and
the Q/DQ rules (INT8, zero point 0, positive finite constant scales, per-tensor activations,
per-channel weights on the output-channel axis). Each failure names the nodes and what to do.

The operator lists are onnx-tensorrt's support matrices (docs/operators.md of the release branches
8.5-GA, 8.6-GA and 10.1-GA), kept here as data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from edgemix.backends.onnx_graph import (GEMM_OPS, attr, const, dq_source, graph_maps, node_name,
                                         opset, walk_to_dq)
from edgemix.errors import UsageError

# onnx-tensorrt 8.6-GA, operators marked "Y"
_TRT86_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu
Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div
Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor GRU Gather GatherElements GatherND Gemm
GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization
HardSigmoid HardSwish Identity If ImageScaler InstanceNormalization IsInf IsNaN LRN LSTM LayerNormalization
LeakyRelu Less LessOrEqual Log LogSoftmax Loop LpNormalization LpPool MatMul Max MaxPool Mean
MeanVarianceNormalization Min Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or PRelu Pad
ParametricSoftplus Pow QuantizeLinear RNN RandomNormal RandomNormalLike RandomUniform RandomUniformLike
Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd
ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RoiAlign Round ScaledTanh Scan Scatter
ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign
SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze
Upsample Where Xor
""".split())
_ADDED_IN_86 = frozenset({"GroupNormalization", "HardSwish", "IsInf", "LayerNormalization", "Mod", "OneHot"})
_ADDED_IN_10 = frozenset({"CastLike", "DeformConv", "Gelu", "Hardmax", "Mish"})  # 10.0/10.1-GA


def weight_channel_axis(node, port: int, rank: int) -> int:
    """The output-channel axis of a GEMM's weight input: where TensorRT wants per-channel scales."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":  # Y = A' B', B' = B^T when transB: B is then (N, K)
        return 0 if attr(node, "transB", 0) else 1
    return rank - 1  # MatMul B is (..., K, N)


@dataclass(frozen=True)
class TrtOnnxSupport:
    version: str  # the family the tables describe
    min_opset: int
    max_opset: int
    ops: frozenset


def support_for(version: str) -> TrtOnnxSupport:
    """The parser's limits for a TensorRT version string such as '10.3' or '8.6.2'."""
    try:
        major, minor = (int(p) for p in (version.split(".") + ["0"])[:2])
    except ValueError:
        raise UsageError(f"tensorrt.version '{version}' is not a version number like '10.3'") from None
    if major >= 10:
        return TrtOnnxSupport("10.x", 9, 20, _TRT86_OPS | _ADDED_IN_10)
    if major == 8 and minor >= 6:
        return TrtOnnxSupport("8.6", 7, 17, _TRT86_OPS)
    if major == 8:  # 8.0-8.5: no LayerNormalization op, the exporter must decompose it (opset <= 16)
        return TrtOnnxSupport("8.0-8.5", 7, 17 if minor >= 4 else 13, _TRT86_OPS - _ADDED_IN_86)
    raise UsageError(f"TensorRT {version} is not supported: explicit INT8 Q/DQ needs TensorRT 8 or newer")


@dataclass
class Issue:
    # opset | unsupported-op | shape | qdq-zero-point | qdq-scale | qdq-axis | qdq-type | qdq-pairing | precision
    rule: str
    message: str
    fix: str
    nodes: list[str] = field(default_factory=list)


@dataclass
class CompatReport:
    tensorrt: str
    checked_against: str
    opset: int
    precision: str
    batch_range: tuple[int, int, int] | None
    issues: list[Issue]
    ops: dict[str, int]
    qdq_pairs: int  # Q -> DQ pairs, counting a DQ of a stored INT8 weight as one (its Q folded at build)
    int8_weights: int = 0

    @property
    def ok(self) -> bool:
        return not self.issues

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def format(self) -> str:
        if self.ok:
            return (f"TensorRT {self.tensorrt} compatibility: ok (opset {self.opset}, {sum(self.ops.values())} nodes, "
                    f"{self.qdq_pairs} Q/DQ pairs, {self.int8_weights} weights stored INT8)")
        lines = [f"TensorRT {self.tensorrt} compatibility: {len(self.issues)} problem(s)"]
        for i in self.issues:
            named = f" [{', '.join(i.nodes[:5])}{', ...' if len(i.nodes) > 5 else ''}]" if i.nodes else ""
            lines.append(f"  - {i.rule}: {i.message}{named}; fix: {i.fix}")
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        if not self.ok:
            raise UsageError(self.format(), hint="nothing was sent to the device")


def check_tensorrt_compat(proto: onnx.ModelProto, tensorrt_version: str, *, precision: str = "int8",
                          batch_range: tuple[int, int, int] | None = None) -> CompatReport:
    """Every rule below that fails adds one Issue (with all offending nodes), none stops the others."""
    sup = support_for(tensorrt_version)
    graph, issues = proto.graph, []
    version = opset(proto)
    if not sup.min_opset <= version <= sup.max_opset:
        issues.append(Issue("opset", f"opset {version} is outside TensorRT {tensorrt_version}'s "
                                     f"{sup.min_opset}..{sup.max_opset}",
                            "set tensorrt.opset in the target profile to "
                            f"{min(max(version, sup.min_opset), sup.max_opset)}"))
    custom = [node_name(n) for n in graph.node if n.domain not in ("", "ai.onnx")]
    if custom:
        issues.append(Issue("unsupported-op", "nodes from a non-standard ONNX domain (no TensorRT plugin is shipped)",
                            "export without custom ops (nncf.strip before export; opset domain ai.onnx only)", custom))
    unsupported: dict[str, list[str]] = {}
    for n in graph.node:
        if n.domain in ("", "ai.onnx") and n.op_type not in sup.ops:
            unsupported.setdefault(n.op_type, []).append(node_name(n))
    for op, nodes in sorted(unsupported.items()):
        fix = ("export at opset <= 16 so LayerNorm is decomposed into supported ops, or target TensorRT >= 8.6"
               if op in _ADDED_IN_86 else "replace the op in the model or export at an opset that decomposes it")
        issues.append(Issue("unsupported-op", f"{op} is not supported by TensorRT {sup.version}'s ONNX parser",
                            fix, nodes))
    issues += _check_shapes(graph, batch_range)
    producers = {o: n for n in graph.node for o in n.output}
    inits = {i.name for i in graph.initializer}
    # from opset 18 the Reduce* axes are an input; TensorRT's parser needs it to be a constant
    dyn_axes = [node_name(n) for n in graph.node if n.op_type.startswith("Reduce") and len(n.input) > 1
                and n.input[1] and n.input[1] not in inits
                and getattr(producers.get(n.input[1]), "op_type", None) != "Constant"]
    if dyn_axes:
        issues.append(Issue("shape", "Reduce axes computed at run time", "make the axes an initializer "
                                                                         "(export with constant folding)", dyn_axes))
    pairs, int8_weights, qdq_issues = _check_qdq(proto)
    issues += qdq_issues
    if precision == "int8" and pairs == 0:
        issues.append(Issue("precision", "an int8 build without Q/DQ nodes would need TensorRT's implicit "
                                         "(deprecated) calibration", "build the QDQ ONNX with edgemix.backends.tensorrt.qdq"))
    if precision != "int8" and pairs:
        issues.append(Issue("precision", f"a {precision} build holds {pairs} Q/DQ pairs, which force INT8 layers",
                            "export the FP32 model for fp16/fp32 builds"))
    ops: dict[str, int] = {}
    for n in graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return CompatReport(tensorrt_version, sup.version, version, precision, batch_range, issues, ops, pairs,
                        int8_weights)


def _check_shapes(graph, batch_range) -> list[Issue]:
    """Graph inputs may only vary on axis 0, and only when an optimization profile bounds it."""
    issues = []
    init_names = {i.name for i in graph.initializer}
    for inp in (i for i in graph.input if i.name not in init_names):
        dims = inp.type.tensor_type.shape.dim
        free = [k for k, d in enumerate(dims) if not d.HasField("dim_value") or d.dim_value <= 0]
        unbounded = [k for k in free if k != 0 or batch_range is None]
        if unbounded:
            issues.append(Issue("shape", f"input '{inp.name}' has dynamic dimension(s) {unbounded} that no "
                                         "optimization profile bounds",
                                "export with a fixed image size; only the batch axis may be dynamic, "
                                "bounded by the target's batch_sizes", [inp.name]))
        if dims and 0 not in free and batch_range is not None and batch_range[0] != batch_range[2]:
            issues.append(Issue("shape", f"input '{inp.name}' has a fixed batch {dims[0].dim_value} but the "
                                         f"profile asks for batches {batch_range[0]}..{batch_range[2]}",
                                "export with a dynamic batch axis", [inp.name]))
    return issues


def _check_qdq(proto) -> tuple[int, int, list[Issue]]:
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    producers, consumers = graph_maps(graph)
    ranks = _ranks(proto)
    bad: dict[str, list[str]] = {k: [] for k in ("zp", "zp_type", "scale", "scale_const", "axis", "act_axis",
                                                   "pair", "weight_axis")}
    pairs = int8_weights = 0
    for n in (n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")):
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            int8_weights += 1  # a weight stored quantized: the pair's Q was folded at build
            pairs += 1
        name = node_name(n)
        scale = const(n.input[1], inits, producers)
        zp = const(n.input[2], inits, producers) if len(n.input) > 2 and n.input[2] else None
        zp_type = (inits[n.input[2]].data_type if n.input[2] in inits else None) if zp is not None else None
        if scale is None:
            bad["scale_const"].append(name)
        elif not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            bad["scale"].append(name)
        if zp is None or (zp_type is not None and zp_type != onnx.TensorProto.INT8) or zp.dtype != np.int8:
            bad["zp_type"].append(name)
        elif np.any(zp != 0):
            bad["zp"].append(name)
        data = n.input[0]
        rank = len(inits[data].dims) if data in inits else ranks.get(data)
        if scale is not None and scale.size > 1:
            axis = attr(n, "axis", 1)
            if rank is not None and not -rank <= axis < rank:
                bad["axis"].append(name)
            q_src = producers.get(data)
            is_weight = data in inits or (q_src is not None and q_src.op_type == "QuantizeLinear"
                                          and q_src.input[0] in inits)  # a DQ of a fake-quantized weight
            if not is_weight:
                bad["act_axis"].append(name)
        if n.op_type == "QuantizeLinear":
            outs = consumers.get(n.output[0], [])
            if not outs or any(c.op_type != "DequantizeLinear" for c in outs):
                bad["pair"].append(name)
            pairs += sum(c.op_type == "DequantizeLinear" for c in outs)
    for g in (g for g in graph.node if g.op_type in GEMM_OPS):
        if len(g.input) < 2:
            continue
        chain, dq = walk_to_dq(producers, g.input[1])  # the weight side
        if dq is None:
            continue
        scale = const(dq.input[1], inits, producers)
        w = dq_source(dq, producers)
        if scale is None or scale.size <= 1 or w not in inits:
            continue
        axis = attr(dq, "axis", 1) % len(inits[w].dims)
        if any(c.op_type != "Transpose" for c in chain):
            continue  # a reshape between DQ and GEMM: the channel axis cannot be followed, TensorRT decides
        for t in reversed(chain):  # from the DQ down to the GEMM: where does the scaled axis end up
            axis = list(attr(t, "perm") or reversed(range(len(inits[w].dims)))).index(axis)
        expect = weight_channel_axis(g, 1, len(inits[w].dims))
        if axis != expect:
            via = f" after {len(chain)} Transpose(s)" if chain else ""
            bad["weight_axis"].append(f"{node_name(dq)} (scales axis {axis}{via}, {g.op_type} {node_name(g)} "
                                      f"needs its output-channel axis {expect})")
    rules = [
        ("zp", "qdq-zero-point", "non-zero zero points (TensorRT quantization is symmetric)",
         "quantize symmetrically (NNCF preset PERFORMANCE)"),
        ("zp_type", "qdq-type", "zero point missing or not INT8 (a missing one means UINT8, which TensorRT rejects)",
         "give every Q/DQ an int8 zero point of 0 (edgemix.backends.tensorrt.qdq.to_tensorrt_layout rewrites uint8 pairs)"),
        ("scale", "qdq-scale", "scales that are zero, negative, NaN or infinite",
         "recalibrate; a zero scale comes from an all-zero weight row or activation (drop or keep that layer FP32)"),
        ("scale_const", "qdq-scale", "scales that are not constants (TensorRT needs build-time scales)",
         "store scales as initializers"),
        ("axis", "qdq-axis", "per-channel axis outside the input's rank", "fix the Q/DQ axis attribute"),
        ("act_axis", "qdq-axis", "per-channel quantization of an activation (TensorRT supports per-tensor only)",
         "use per-tensor activation scales"),
        ("weight_axis", "qdq-axis", "weight scales not on the output-channel axis",
         "quantize weights per output channel (edgemix.backends.tensorrt.qdq.to_tensorrt_layout folds torch's transposes)"),
        ("pair", "qdq-pairing", "QuantizeLinear outputs that do not feed DequantizeLinear",
         "every Q must be followed by a DQ in explicit-quantization graphs"),
    ]
    issues = [Issue(rule, msg, fix, bad[key]) for key, rule, msg, fix in rules if bad[key]]
    return pairs, int8_weights, issues


def _ranks(proto) -> dict[str, int]:
    """Ranks of intermediate tensors from ONNX shape inference (for the per-channel axis check)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # shape inference is a best-effort aid here; onnx.checker already ran on our models
        return {}
    out = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if v.type.tensor_type.HasField("shape"):
            out[v.name] = len(v.type.tensor_type.shape.dim)
    return out

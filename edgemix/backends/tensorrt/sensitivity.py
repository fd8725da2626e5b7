"""Accuracy-aware fallback: which layers does INT8 hurt, and which must stay FP32 to meet the budget.

Works on the QDQ ONNX itself, run by onnxruntime, so the numbers describe the artifact that ships.
A layer is one Conv/MatMul/Gemm together with the Q/DQ pairs on its inputs (the weight pair and
the activation pair in front of it). Its *sensitivity* is the logit drift from FP32 when only that
layer's Q/DQ is kept and every other layer runs in float: 1 - mean cosine, with the top-1
agreement beside it. :func:`fallback_to_budget` then takes layers out of INT8, most sensitive
first, until the target's drift budget is met; the build is then redone with those layers in
``BuildJob.options["keep_fp32"]`` (NNCF IgnoredScope), so the shipped graph has no stray Q/DQ.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from edgemix import console
from edgemix.backends.onnx_graph import GEMM_OPS, dq_source, graph_maps, walk_to_dq
from edgemix.backends.tensorrt.qdq import TRANSPOSED_SUFFIX, qdq_layout, quantizable_layers


@dataclass
class LayerSensitivity:
    layer: str  # module name, e.g. "blocks.3.mlp_channels.fc2"
    node: str  # its ONNX GEMM node
    drift: float  # 1 - mean logit cosine vs FP32 with only this layer in INT8
    agreement: float  # top-1 agreement with FP32 in the same setting
    rel_error: float  # ||logits - fp32|| / ||fp32|| over the evaluation inputs


@dataclass
class FallbackResult:
    keep_fp32: list[str]  # layers taken out of INT8, most sensitive first
    met: bool
    steps: list[dict] = field(default_factory=list)  # {"keep_fp32": [...], metrics...} per evaluation
    model: onnx.ModelProto | None = None  # the last evaluated graph (Q/DQ removed for keep_fp32)

    def to_dict(self) -> dict:
        return {"keep_fp32": self.keep_fp32, "met": self.met, "steps": self.steps}


def _layer_inputs(graph, producers, inits):
    """layer -> [(node that reads the DQ output, input index, DQ node)] for each quantized GEMM."""
    out: dict[str, list] = {}
    for g in (n for n in graph.node if n.op_type in GEMM_OPS):
        found, layer = [], None
        for port in range(min(2, len(g.input))):
            chain, dq = walk_to_dq(producers, g.input[port])
            if dq is not None:
                # the node that reads the DQ's output: the GEMM, or the last pass-through op walked
                found.append((chain[-1], 0, dq) if chain else (g, port, dq))
                w = _weight_name(dq, producers, inits)
                if w is not None:
                    layer = w.removesuffix(TRANSPOSED_SUFFIX).removesuffix(".weight")
        if found and layer is not None:
            out[layer] = found
    return out


def _weight_name(dq, producers, inits) -> str | None:
    """The initializer behind a DQ (through its Q), or None for an activation pair."""
    src = dq_source(dq, producers)
    return src if src in inits else None


def _float_weight(dq, weight_name: str, inits: dict, fp32_state: dict | None) -> np.ndarray:
    """The FP32 weight for a de-quantized layer: the model's own if it is what was quantized.

    Export rounds weights onto the INT8 grid, so the FP32 tensor comes from the model's state
    dict; it is only used when it sits within half a quantization step of the dequantized
    weight (it would not after SmoothQuant rescaled it), otherwise the dequantized values are.
    """
    q_weight = numpy_helper.to_array(inits[weight_name])
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    shape = [1] * q_weight.ndim
    if scale.size > 1:
        shape[axis % q_weight.ndim] = scale.size
    step = scale.reshape(shape)
    if q_weight.dtype == np.int8:  # a DQ-only weight: dequantize it
        q_weight = q_weight.astype(np.float32) * step
    key = weight_name.removesuffix(TRANSPOSED_SUFFIX)
    if fp32_state is not None and key in fp32_state:
        w = fp32_state[key].detach().cpu().numpy()
        w = w.T if weight_name.endswith(TRANSPOSED_SUFFIX) else w
        if w.shape == q_weight.shape and np.all(np.abs(w - q_weight) <= 0.5 * step + 1e-6):
            return w.astype(np.float32)
    return q_weight.astype(np.float32)


def strip_qdq(proto: onnx.ModelProto, layers: Iterable[str], fp32_state: dict | None = None) -> onnx.ModelProto:
    """A copy of ``proto`` with the Q/DQ pairs of ``layers`` removed (those GEMMs run in float)."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    producers, _ = graph_maps(graph)
    inits = {i.name: i for i in graph.initializer}
    by_layer = _layer_inputs(graph, producers, inits)
    unknown = sorted(set(layers) - set(by_layer))
    if unknown:
        from edgemix.errors import unknown_choice

        raise unknown_choice("quantized layer", unknown[0], by_layer)
    for layer in layers:
        for reader, idx, dq in by_layer[layer]:
            w = _weight_name(dq, producers, inits)
            if w is not None:
                name = f"{layer}.weight.float"
                graph.initializer.append(numpy_helper.from_array(_float_weight(dq, w, inits, fp32_state), name))
                reader.input[idx] = name
            else:
                q = producers.get(dq.input[0])
                reader.input[idx] = q.input[0] if q is not None and q.op_type == "QuantizeLinear" else dq.input[0]
        for conv in {id(r): r for r, _, _ in by_layer[layer] if r.op_type == "Conv"}.values():
            _bypass_output_pair(graph, conv)
    _prune(graph)
    return model


def _bypass_output_pair(graph, conv) -> None:
    """A Conv's output Q/DQ pair (``qdq.quantize_conv_outputs``), which a rebuild with the Conv kept in
    FP32 does not have: its readers read the Conv's output directly."""
    _, consumers = graph_maps(graph)
    readers = consumers.get(conv.output[0], [])
    if len(readers) != 1 or readers[0].op_type != "QuantizeLinear":
        return
    dqs = consumers.get(readers[0].output[0], [])
    if not dqs or any(d.op_type != "DequantizeLinear" for d in dqs):
        return
    for dq in dqs:
        for n in consumers.get(dq.output[0], []):
            n.input[:] = [conv.output[0] if i == dq.output[0] else i for i in n.input]
        for o in graph.output:
            if o.name == dq.output[0]:
                o.name = conv.output[0]


def _prune(graph) -> None:
    """Drop nodes and initializers nothing reads any more (the bypassed Q/DQ pairs)."""
    needed = {o.name for o in graph.output}
    keep = []
    for n in reversed(graph.node):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(n.input)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    vi = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(vi)


def quantized_layers(proto: onnx.ModelProto) -> list[str]:
    """The layers (weight owners) of a QDQ ONNX whose GEMM reads INT8 weights."""
    return [r["layer"] for r in qdq_layout(proto) if r["weight_quantized"]]


def _metrics(out: np.ndarray, ref: np.ndarray) -> dict:
    # float64: per-layer drifts sit near float32's 1e-7 resolution of a cosine
    out, ref = out.astype(np.float64), ref.astype(np.float64)
    cos = (out * ref).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1) + 1e-12)
    return {"drift": float(1.0 - cos.mean()), "agreement": float((out.argmax(1) == ref.argmax(1)).mean()),
            "rel_error": float(np.linalg.norm(out - ref) / (np.linalg.norm(ref) + 1e-12))}


def _predictor(proto: onnx.ModelProto, threads: int):
    from edgemix.backends.tensorrt import OnnxRuntimePredictor

    d = proto.graph.input[0].type.tensor_type.shape.dim
    dynamic = bool(d) and not d[0].HasField("dim_value")
    # a dynamic graph takes any batch: 32 is only the chunk size batched_predict uses
    return OnnxRuntimePredictor(proto, threads, 32 if dynamic else d[0].dim_value, dynamic)


def _run(proto: onnx.ModelProto, x: np.ndarray, threads: int) -> np.ndarray:
    from edgemix.backends.base import batched_predict

    pred = _predictor(proto, threads)
    return pred(x) if pred.dynamic_batch else batched_predict(pred, x)


def rank_layers(proto: onnx.ModelProto, fp32_model: torch.nn.Module, inputs,
                threads: int = 2) -> list[LayerSensitivity]:
    """Per-layer sensitivity, most sensitive first (see the module docstring for the measure)."""
    x = np.ascontiguousarray(inputs.numpy() if isinstance(inputs, torch.Tensor) else inputs, dtype=np.float32)
    with torch.no_grad():
        ref = fp32_model.eval()(torch.from_numpy(x)).numpy()
    state = fp32_model.state_dict()
    # the layers a rebuild can keep in FP32; a fixed kernel the exporter wrote as a constant (CycleMLP's
    # one-hot shifts, exact in INT8) is no module's weight and stays INT8 in every row
    keepable = set(quantizable_layers(fp32_model))
    layers = [layer for layer in quantized_layers(proto) if layer in keepable]
    node_of = {r["layer"]: r["node"] for r in qdq_layout(proto) if r["weight_quantized"]}
    rows = []
    with console.progress("layer sensitivity", len(layers)) as advance:
        for layer in layers:
            only = strip_qdq(proto, [other for other in layers if other != layer], state)
            m = _metrics(_run(only, x, threads), ref)
            rows.append(LayerSensitivity(layer, node_of[layer], m["drift"], m["agreement"], m["rel_error"]))
            advance(1, layer=layer)
    return sorted(rows, key=lambda r: (r.drift, r.rel_error), reverse=True)


def format_table(rows: list[LayerSensitivity]) -> str:
    """Markdown, for the report."""
    lines = ["| rank | layer | 1 - cosine | top-1 agreement | rel. error |", "|---:|---|---:|---:|---:|"]
    lines += [f"| {k} | {r.layer} | {r.drift:.2e} | {r.agreement:.4f} | {r.rel_error:.2e} |"
              for k, r in enumerate(rows, 1)]
    return "\n".join(lines)


def table_dicts(rows: list[LayerSensitivity]) -> list[dict]:
    return [asdict(r) for r in rows]


def meets_budget(metrics: dict, budget) -> bool:
    """Does a drift evaluation meet a DriftBudget? ``metrics`` may be edgemix.verify.drift's dict
    (top1_delta in signed points, agreement, cosine_mean) or use top1_drop / cosine directly."""
    drop = metrics.get("top1_drop", -metrics["top1_delta"] if metrics.get("top1_delta") is not None else None)
    cosine = metrics.get("cosine", metrics.get("cosine_mean"))
    checks = [(drop, lambda v: v <= budget.max_top1_drop),
              (metrics.get("agreement"), lambda v: v >= budget.min_agreement),
              (cosine, lambda v: v >= budget.min_cosine)]
    present = [ok(v) for v, ok in checks if v is not None]
    if not present:
        raise ValueError("the evaluation returned none of top1_drop/top1_delta, agreement, cosine/cosine_mean")
    return all(present)


_SHOWN = ("top1_drop", "top1_delta", "agreement", "cosine", "cosine_mean")


def fallback_to_budget(proto: onnx.ModelProto, ranking: list[LayerSensitivity], budget,
                       evaluate: Callable[[object], dict], *, fp32_model: torch.nn.Module | None = None,
                       threads: int = 2, max_layers: int | None = None) -> FallbackResult:
    """Keep the most sensitive layers in FP32, one more at a time, until ``evaluate`` meets ``budget``.

    ``evaluate(predictor)`` is the pipeline's drift measurement on its evaluation set (the predictor
    has ``batch_size``/``dynamic_batch``/``__call__`` like any backend's); ``budget`` is the target's
    DriftBudget. Stops at ``max_layers`` (default: all ranked layers) with ``met=False``.
    """
    state = fp32_model.state_dict() if fp32_model is not None else None
    order = [r.layer for r in ranking]
    limit = len(order) if max_layers is None else min(max_layers, len(order))
    steps, candidate = [], proto
    for k in range(limit + 1):
        keep = order[:k]
        candidate = strip_qdq(proto, keep, state) if keep else proto
        metrics = evaluate(_predictor(candidate, threads))
        met = meets_budget(metrics, budget)
        scalars = {k2: v for k2, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        steps.append({"keep_fp32": keep, **scalars, "met": met})
        console.info(f"[ fallback] {len(keep)} layer(s) in FP32: "
                     + ", ".join(f"{k2} {v:.4g}" for k2, v in scalars.items() if k2 in _SHOWN))
        if met:
            return FallbackResult(keep, True, steps, candidate)
    return FallbackResult(order[:limit], False, steps, candidate)


def plan_fallback(model, fp32_model: torch.nn.Module, inputs, budget, evaluate: Callable[[object], dict], *,
                  threads: int = 2, max_layers: int | None = None) -> dict:
    """The pipeline's one call: rank the layers of a built QDQ ONNX (path or ModelProto) on ``inputs``
    (a few dozen model-ready images), then find the FP32 layers that meet ``budget``. Returns
    ``{"keep_fp32", "met", "steps", "ranking", "table_md", "quantized_layers"}`` (the last: every
    layer of the model with INT8 weights, ranked or not); rebuild with
    ``BuildJob.options["keep_fp32"] = result["keep_fp32"]`` when it is not empty."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    ranking = rank_layers(proto, fp32_model, inputs, threads)
    result = fallback_to_budget(proto, ranking, budget, evaluate, fp32_model=fp32_model, threads=threads,
                                max_layers=max_layers)
    return {**result.to_dict(), "ranking": table_dicts(ranking), "table_md": format_table(ranking),
            "quantized_layers": quantized_layers(proto)}

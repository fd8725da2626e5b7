"""The one place that walks ONNX graphs: who produces and who reads a tensor, node attributes and
constants, and the walk from a GEMM's input up to the DequantizeLinear that feeds it. The QDQ
layout pass, the TensorRT rules check, the sensitivity fallback and the host session all use these."""

from __future__ import annotations

from collections import Counter

import onnx
from onnx import numpy_helper

GEMM_OPS = ("Conv", "MatMul", "Gemm")  # the layers TensorRT runs in INT8 when both inputs come through DQ
PASS_THROUGH = ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze")  # TensorRT moves DQ past these


def graph_maps(graph) -> tuple[dict, dict[str, list]]:
    """(tensor -> the node producing it, tensor -> the nodes reading it)."""
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return producers, consumers


def attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def set_attr(node, name, value) -> None:
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(onnx.helper.make_attribute(name, value))


def const(name, inits, producers):
    """The value of an initializer or a Constant node's output, else None."""
    if name in inits:
        return numpy_helper.to_array(inits[name])
    p = producers.get(name)
    if p is not None and p.op_type == "Constant":
        return numpy_helper.to_array(attr(p, "value"))
    return None


def node_name(n) -> str:
    """A node's name, or for an unnamed one its op and first output (unique in a valid graph)."""
    return n.name or f"{n.op_type}({n.output[0] if n.output else '?'})"


def opset(proto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def op_counts(proto: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in proto.graph.node)


def dequantized_inputs(proto: onnx.ModelProto) -> Counter:
    """Per op type (Q/DQ themselves aside, and Shape/Size, which read no values), how many node inputs
    a DequantizeLinear produces: what a graph rewrite must not lower, whatever it does to the Q/DQ
    nodes themselves (two identical Q/DQ pairs merged into one that feeds both consumers computes the
    same INT8 graph)."""
    producers, _ = graph_maps(proto.graph)
    fed = Counter()
    for n in proto.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear", "Shape", "Size"):
            continue
        for i in n.input:
            p = producers.get(i)
            if p is not None and p.op_type == "DequantizeLinear":
                fed[n.op_type] += 1
    return fed


def walk_to_dq(producers, tensor: str) -> tuple[list, object | None]:
    """From a GEMM input up through the ops TensorRT moves DQ past: (those ops, nearest to the GEMM
    first; the DequantizeLinear they lead to, or None when the input is not dequantized)."""
    chain, src = [], producers.get(tensor)
    while src is not None and src.op_type in PASS_THROUGH:
        chain.append(src)
        src = producers.get(src.input[0])
    return chain, (src if src is not None and src.op_type == "DequantizeLinear" else None)


def dq_source(dq, producers) -> str:
    """The tensor a DequantizeLinear stands for: its QuantizeLinear's input when one feeds it (fake
    quantization), else its own input (a weight stored as INT8)."""
    q = producers.get(dq.input[0])
    return q.input[0] if q is not None and q.op_type == "QuantizeLinear" else dq.input[0]

"""What the XNNPACK partitioner took and what it left to the portable kernels, with a reason for
every op left outside."""

from __future__ import annotations

import contextlib
import logging
import operator
from collections import Counter

import torch


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

"""Skip XNNPACK's two pattern-matching preprocess passes when the graph cannot hold their pattern.

XNNPACK's preprocessing runs 17 passes over every lowered partition. Two of them replace a whole
subgraph with one op: ``ConvertToUpsampleBilinear2d`` and ``ConvertToSDPAPass``. Each first builds its
pattern graphs (torch.export + to_edge of small modules, once per process) and then retraces the whole
graph even when nothing matched. Measured on S/16 INT8 (Intel Xeon, 2 cores, 2026-12-01): 1.6 s and
1.3 s of the 7.6 s the 17 passes took, for a Mixer that has no upsample and no softmax.

A subgraph match needs every op of the pattern in the graph. Every bilinear pattern holds
``upsample_bilinear2d.vec`` and every SDPA pattern ``_softmax`` (``ANCHORS``; tests check both against
the patterns of the installed ExecuTorch). A graph without its pass's anchor op cannot match, so the
pass returns the graph unchanged instead. Lowering with and without the guard gives byte-identical
programs (tested). A graph that holds an anchor, e.g. ViP's softmax, runs the pass as written.
"""

from __future__ import annotations

import contextlib

import torch

# pass class name -> the ATen op every one of its patterns contains
ANCHORS = {
    "ConvertToUpsampleBilinear2d": "aten.upsample_bilinear2d.vec",
    "ConvertToSDPAPass": "aten._softmax.default",
}


def has_op(graph_module: torch.fx.GraphModule, op: str) -> bool:
    """Whether a node calls ``op`` ("aten.x.overload"), as an ATen or an edge-dialect op."""
    # str() of an edge op is "<EdgeOpOverload: aten.x.overload>: schema = ...", of an ATen op "aten.x.overload"
    return any(node.op == "call_function" and (str(node.target) == op or f": {op}>" in str(node.target))
               for node in graph_module.graph.nodes)


def _pass_classes() -> dict[str, type]:
    from executorch.backends.xnnpack._passes.convert_to_sdpa import ConvertToSDPAPass
    from executorch.backends.xnnpack._passes.convert_to_upsample_bilinear2d import ConvertToUpsampleBilinear2d

    return {c.__name__: c for c in (ConvertToUpsampleBilinear2d, ConvertToSDPAPass)}


@contextlib.contextmanager
def skip_unmatchable_patterns():
    """While active, the two pattern passes return a graph without their anchor op untouched.
    Yields the names of the passes skipped (filled in as lowering runs)."""
    from torch.fx.passes.infra.pass_base import PassResult

    skipped: list[str] = []
    originals = {}
    for name, cls in _pass_classes().items():
        original = cls.__dict__["call"]
        originals[cls] = original

        def call(self, graph_module, _original=original, _name=name):
            if not has_op(graph_module, ANCHORS[_name]):
                skipped.append(_name)
                return PassResult(graph_module, False)
            return _original(self, graph_module)

        cls.call = call
    try:
        yield skipped
    finally:
        for cls, original in originals.items():
            cls.call = original

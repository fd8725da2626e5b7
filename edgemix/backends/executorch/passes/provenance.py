"""Drop torch.fx provenance chains before lowering (every ExecuTorch pass deep-copied them)."""

from __future__ import annotations

import torch


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

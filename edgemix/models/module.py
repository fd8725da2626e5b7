"""Any torch.nn.Module as an edgemix model: what the pipeline needs to know about it (input shape,
preprocessing, classes, cost) and a check, before any work, that both backends can take its ops.

A zoo model carries this in its MixerSpec; a user's module gets a :class:`ModuleSpec` and is wrapped
(never modified) in :class:`SpecModule`, which forwards to it and carries the spec.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch
from torch import nn

from edgemix.errors import UsageError


@dataclass(frozen=True)
class ModuleSpec:
    """The input contract of a user's image classifier: (in_chans, img_size, img_size) float inputs,
    normalised as (x / 255 - mean) / std from uint8 images (or x - mean) / std from [0, 1] floats."""

    name: str
    in_chans: int
    img_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    gmacs: float  # per image, of the Linear and Conv layers (what dominates)

    def macs(self) -> int:
        return int(self.gmacs * 1e9)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


class SpecModule(nn.Module):
    """A user's module with its spec attached; forwards unchanged."""

    def __init__(self, net: nn.Module, spec: ModuleSpec):
        super().__init__()
        self.net, self.spec = net, spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _check_shape(input_shape) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in input_shape)
    except (TypeError, ValueError):
        raise UsageError(f"input_shape {input_shape!r} is not (channels, height, width)",
                         hint="e.g. input_shape=(3, 224, 224)") from None
    if min(c, h, w) < 1:
        raise UsageError(f"input_shape {input_shape!r} has a dimension below 1")
    if h != w:
        raise UsageError(f"input_shape {input_shape!r} is not square; edgemix's data pipeline feeds "
                         "square images", hint="resize inside the module, or pass a square shape")
    return c, h, w


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass (Linear and Conv layers), by forward hooks."""
    total = 0

    def linear(m, inp, out):
        nonlocal total
        total += out.numel() * m.in_features

    def conv(m, inp, out):
        nonlocal total
        k = 1
        for s in m.kernel_size:
            k *= s
        total += out.numel() * (m.in_channels // m.groups) * k

    hooks = [m.register_forward_hook(linear) for m in model.modules() if isinstance(m, nn.Linear)]
    hooks += [m.register_forward_hook(conv) for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return total // len(example)


def wrap_module(net: nn.Module, input_shape, mean=None, std=None, name: str | None = None) -> SpecModule:
    """The user's module, in eval mode on the CPU, with a spec measured from one forward pass."""
    if not isinstance(net, nn.Module):
        raise UsageError(f"model must be a zoo alias or a torch.nn.Module, got {type(net).__name__}")
    if input_shape is None:
        raise UsageError("a torch.nn.Module needs input_shape=(channels, height, width)",
                         hint="e.g. edgemix.build(net, input_shape=(1, 28, 28), mean=(0.5,), std=(0.5,))")
    c, h, _ = _check_shape(input_shape)
    mean = tuple(float(v) for v in (mean if mean is not None else (0.0,) * c))
    std = tuple(float(v) for v in (std if std is not None else (1.0,) * c))
    if len(mean) != c or len(std) != c or min(std) <= 0:
        raise UsageError(f"mean {mean} and std {std} need {c} values each (one per channel), std > 0")
    net = net.eval().cpu()
    example = torch.zeros(1, c, h, h)
    try:
        with torch.no_grad():
            out = net(example)
    except Exception as e:
        raise UsageError(f"the module does not run on a (1, {c}, {h}, {h}) input: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:300]}", hint="check input_shape") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UsageError(f"the module must return logits of shape (batch, classes); on a (1, {c}, {h}, {h}) "
                         f"input it returned {shape}")
    label = name or re.sub(r"(?<!^)(?=[A-Z])", "-", type(net).__name__).lower()
    spec = ModuleSpec(name=label, in_chans=c, img_size=h, num_classes=int(out.shape[1]), mean=mean, std=std,
                      gmacs=count_macs(net, example) / 1e9)
    return SpecModule(net, spec).eval()


# ------------------------------------------------------------------------- can the backends take it?

def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def check_ops(model: nn.Module, spec, backend: str) -> None:
    """Refuse, before any work, a module whose ops the backend cannot run, naming the ops.

    executorch: the module must torch.export, and each op of its edge-dialect graph must either be
    one XNNPACK delegates or have a kernel in the ExecuTorch runtime. tensorrt: the module must
    export to ONNX (opset 17, the TorchScript exporter that the QDQ path uses)."""
    example = torch.zeros(1, spec.in_chans, spec.img_size, spec.img_size)
    if backend == "executorch":
        try:
            from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
            from executorch.exir import to_edge
            from executorch.extension.pybindings import portable_lib
        except ImportError as e:
            from edgemix.errors import ToolchainError

            raise ToolchainError(f"the ExecuTorch toolchain cannot be imported ({e})",
                                 hint="pip install executorch==1.5.1") from None
        try:
            edge = to_edge(torch.export.export(model, (example,)))
        except Exception as e:
            found = re.search(r"Operator torch\._ops\.(\w+)\.(\w+)(?:\.\w+)? is not in Core ATen", str(e))
            what = (f"the op {found.group(1)}::{found.group(2)} is not in the Core ATen opset ExecuTorch runs"
                    if found else _first_line(e))
            raise UsageError(f"{spec.name} cannot be exported for ExecuTorch: {what}",
                             hint="replace the op in the module (data-dependent Python control flow must go "
                                  "too), or build for another target") from None
        kernels = {n.split(".")[0] for n in portable_lib._get_operator_names()}
        delegable = {str(getattr(c, "target_name", "")).split(".")[0] for c in ALL_PARTITIONER_CONFIGS}
        missing = set()
        for node in edge.exported_program().graph.nodes:
            if node.op != "call_function":
                continue
            full = str(getattr(node.target, "_name", None) or node.target)  # e.g. aten::i0 / aten.i0.default
            base = full.replace("::", ".").split(".")
            base = f"{base[0]}::{base[1]}" if len(base) > 1 else full
            if base.startswith("aten::") and base not in kernels and base.split("::")[1] not in delegable:
                missing.add(base)
        if missing:
            raise UsageError(f"{spec.name} uses ops that ExecuTorch can neither delegate to XNNPACK nor run "
                             f"with its kernels: {', '.join(sorted(missing))}",
                             hint="replace them in the module, or build for another target")
    elif backend == "tensorrt":
        import io

        try:
            torch.onnx.export(model, (example,), io.BytesIO(), dynamo=False, opset_version=17,
                              input_names=["input"], output_names=["logits"])
        except Exception as e:
            found = re.search(r"operator '([^']+)'", str(e))
            what = f"the op {found.group(1)} has no ONNX export" if found else _first_line(e)
            raise UsageError(f"{spec.name} cannot be exported to ONNX for TensorRT: {what}",
                             hint="replace the op in the module, or build for another target") from None


def replace_modules(model: nn.Module, kind: type, make) -> tuple[nn.Module, int]:
    """A new module tree over the same parameter tensors (the caller's model untouched, no weight
    copied) with every submodule of type ``kind`` replaced by ``make(it)``; returns it and the count.
    How the export forms rewrite one op everywhere (LayerNorm, BatchNorm)."""
    import copy

    shared = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    view = copy.deepcopy(model, memo=shared)
    n = 0
    for parent in list(view.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, kind):
                setattr(parent, name, make(child))
                n += 1
    return view, n


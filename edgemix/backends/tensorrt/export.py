"""FP32 / fake-quant PyTorch model -> checked, simplified ONNX, written atomically.

The TorchScript exporter (``dynamo=False``) is used on purpose: it is the only exporter that turns
torch fake-quant modules into QuantizeLinear/DequantizeLinear pairs (the dynamo exporter trips on
their data-dependent branches), and its graphs are the ones onnxruntime fuses into integer GEMMs
(a dynamo-exported QDQ Mixer ran slower than FP32 on onnxruntime).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from edgemix.backends.onnx_graph import dequantized_inputs
from edgemix.errors import ToolchainError

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"
# protobuf cannot serialise a message over 2 GiB; bigger models keep their weights in a side file
_EXTERNAL_DATA_BYTES = 1_800_000_000


def example_input(spec, batch: int) -> torch.Tensor:
    return torch.zeros(batch, spec.in_chans, spec.img_size, spec.img_size)


def export_onnx(model: torch.nn.Module, spec, *, batch: int, dynamic_batch: bool, opset: int,
                simplify: bool = True, check: bool = True) -> onnx.ModelProto:
    """Trace ``model`` (FP32 or holding torch FakeQuantize modules) to a checked ONNX model.

    The input is named ``input`` (N, C, H, W) and the output ``logits``; with ``dynamic_batch`` the
    first axis of both is the symbolic ``batch`` (bounded later by the TensorRT profile).
    ``check=False`` is for callers that rewrite the graph and check the result themselves.
    """
    model = model.eval()
    dynamic_axes = {INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}} if dynamic_batch else None
    with tempfile.TemporaryDirectory(prefix="edgemix-onnx-") as tmp:
        path = Path(tmp) / "model.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            # the legacy exporter's deprecation notice and tracer warnings about the fake-quant
            # modules' Python branches are expected here and say nothing about this model
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example_input(spec, batch),), str(path), dynamo=False,
                              opset_version=opset, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes=dynamic_axes, do_constant_folding=True)
        proto = onnx.load(str(path))  # pulls any external weight file into memory before tmp goes
    proto.producer_name = "edgemix"
    if simplify:
        proto = simplify_onnx(proto)
    if check:
        check_onnx(proto)
    return proto


def simplify_onnx(proto: onnx.ModelProto) -> onnx.ModelProto:
    """onnxsim, refusing any result in which an op lost a dequantized input (a Q/DQ pair folded into a
    float constant would silently widen that layer to float). Merging identical Q/DQ pairs (CycleFC's
    fixed shift kernels, shared by the blocks of a stage) keeps every input dequantized and passes."""
    try:
        import onnxsim
    except ImportError as e:
        raise ToolchainError("onnxsim is not installed", hint="pip install onnxsim==0.8.1") from e
    # certify=False: the Z3 proof is best-effort research tooling and costs minutes on big graphs
    simplified, ok = onnxsim.simplify(proto, check_n=0, certify=False)
    if not ok:
        raise RuntimeError("onnxsim could not validate the simplified model")
    check_dq_kept(proto, simplified)
    return simplified


def check_dq_kept(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    b, a = dequantized_inputs(before), dequantized_inputs(after)
    lost = {op: (b[op], a[op]) for op in b if a[op] < b[op]}
    if lost:
        raise RuntimeError(f"onnxsim left fewer dequantized inputs {lost} (before, after): a Q/DQ pair "
                           "was folded to float; refusing its output")


def check_onnx(proto: onnx.ModelProto) -> None:
    """onnx.checker with shape inference; big models are checked from a file (the 2 GiB limit)."""
    if proto.ByteSize() < _EXTERNAL_DATA_BYTES:
        onnx.checker.check_model(proto, full_check=True)
        return
    with tempfile.TemporaryDirectory(prefix="edgemix-check-") as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save(proto, str(path), save_as_external_data=True, location="model.onnx.data")
        onnx.checker.check_model(str(path), full_check=True)


def save_onnx(proto: onnx.ModelProto, path: Path) -> int:
    """Write to a temporary name in the same folder, then rename; returns the size in bytes.

    Models past protobuf's 2 GiB limit (H/14 FP32) keep weights in ``<name>.data`` beside them;
    both files are written in a temporary folder first, so a failure leaves the old pair intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        tmp_model = Path(tmp) / path.name
        if proto.ByteSize() >= _EXTERNAL_DATA_BYTES:
            data_name = path.name + ".data"
            onnx.save(proto, str(tmp_model), save_as_external_data=True, location=data_name)
            (Path(tmp) / data_name).replace(path.parent / data_name)
        else:
            onnx.save(proto, str(tmp_model))
        tmp_model.replace(path)
    return path.stat().st_size


def input_shape(proto: onnx.ModelProto) -> list[int | str]:
    """The first graph input's shape: ints for fixed dims, names for symbolic ones."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]

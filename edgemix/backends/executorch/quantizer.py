"""PT2E quantization for ExecuTorch: torch.export capture, post-training calibration and
quantization-aware training with ExecuTorch's XNNPACK quantizer.

The scheme is the one XNNPACK runs in integer kernels: symmetric INT8 weights with one scale per
output channel, INT8 activations with one scale (and zero point) per tensor. Ops the quantizer has
no pattern for (LayerNorm, GELU, mean) stay in float between a dequantize and a quantize.
"""

from __future__ import annotations

import copy
import dataclasses
import linecache
import math
import traceback
from pathlib import Path

import torch

from edgemix import console
from edgemix.batching import pad_to_batch
from edgemix.devices import to_device
from edgemix.backends.observers import (OBSERVERS, BatchAverageMinMaxObserver,  # noqa: F401 (their home)
                                       PercentileObserver, activation_observer)
from edgemix.errors import UsageError

SCHEME = "pt2e-xnnpack symmetric int8, per-channel weights, per-tensor activations"
DYNAMIC_SCHEME = "pt2e-xnnpack int8 GEMMs, per-channel weights, activations quantized per row at run time"
_TORCH_DIR = str(Path(torch.__file__).resolve().parent)


# ---------------------------------------------------------------------------------------- export

def export_model(model: torch.nn.Module, example_input: torch.Tensor, dynamic_batch: bool = False,
                 max_batch: int = 1024) -> torch.export.ExportedProgram:
    """Capture ``model`` with torch.export: the batch of ``example_input`` is fixed, or symbolic
    (1..max_batch) with ``dynamic_batch``. A model torch.export cannot capture is a UsageError
    naming the op and the line of the model's code that used it."""
    dynamic_shapes = None
    if dynamic_batch:
        if example_input.shape[0] < 2:
            # torch.export specialises a dimension whose example size is 1, so trace with two
            example_input = example_input[:1].expand(2, *example_input.shape[1:]).contiguous()
        dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=max_batch)},)
    try:
        with torch.no_grad():
            return torch.export.export(model, (example_input,), dynamic_shapes=dynamic_shapes)
    except Exception as e:  # torch.export raises many unrelated types; all mean "not capturable"
        raise _export_failure(model, e) from None


def _export_failure(model: torch.nn.Module, err: Exception) -> UsageError:
    """Turn a torch.export failure into a message naming the op and the model line that used it."""
    op, where = None, None
    for frame, line in traceback.walk_tb(err.__traceback__):
        path = str(Path(frame.f_code.co_filename).resolve())
        func = frame.f_locals.get("func")
        if op is None and where is not None and func is not None:
            op = getattr(func, "__qualname__", None) or str(func)  # e.g. TensorBase.__bool__, aten.item
        if not path.startswith(_TORCH_DIR) and frame.f_code.co_name == "forward":
            code = linecache.getline(frame.f_code.co_filename, line).strip()
            where, op = f"{frame.f_code.co_filename}:{line} `{code}`", None  # innermost forward wins
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    text = f"{type(model).__name__} cannot be exported with torch.export"
    text += f": op {op}" if op else ""
    text += f" at {where}" if where else ""
    text += f" ({first})"
    data_dependent = "data-dependent" in str(err) or "__bool__" in (op or "") or "item" in (op or "")
    hint = ("the graph cannot branch on tensor values: replace the Python `if` on a tensor with "
            "torch.where or torch.cond, or move the check out of forward()" if data_dependent else
            "keep forward() to tensor ops torch.export can trace (no .numpy(), .tolist() or Python "
            "side effects); the model must be a pure function of its input")
    return UsageError(text, hint=hint)


_WEIGHT_EPS = 2 ** -12  # the XNNPACK quantizer's own floor on a weight scale


def make_quantizer(observer: str = "minmax", percentile: float = 99.99, qat: bool = False,
                   float_modules: tuple[type, ...] = ()):
    """XNNPACKQuantizer: per-channel symmetric weights, the chosen per-tensor activation observer.

    For QAT the activation observer sits inside a FakeQuantize, so that QAT calibrates its ranges
    exactly as PTQ does before fine-tuning (see :func:`qat`). Weights get a plain FakeQuantize
    around a per-channel min-max observer, not the quantizer's QAT default
    (FusedMovingAvgObsFakeQuantize): that fused kernel computes its symmetric scale as
    max|w| / 127.5 while convert_pt2e reads the observer's max|w| / 127, so QAT trained the weights
    on a grid 0.4% off the one the converted graph uses and their learned rounding was lost
    (pytorch/ao#4824, fixed after torchao 0.18). With this one, the fake-quant graph and the
    converted graph compute the same logits.
    ``float_modules``: module types whose ops must stay in float (the quantizer would otherwise
    quantize the adds and muls of a decomposed LayerNorm, whose statistics INT8 cannot carry).
    """
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config
    from torchao.quantization.pt2e import FakeQuantize, PerChannelMinMaxObserver
    from torchao.quantization.pt2e.quantizer.utils import QuantizationConfig

    base = get_symmetric_quantization_config(is_per_channel=True, is_qat=qat)
    ctr = activation_observer(observer, percentile)
    weight = base.weight
    if qat:
        ctr = FakeQuantize.with_args(observer=ctr)
        weight = dataclasses.replace(weight, observer_or_fake_quant_ctr=FakeQuantize.with_args(
            observer=PerChannelMinMaxObserver, eps=_WEIGHT_EPS))
    act = dataclasses.replace(base.input_activation, observer_or_fake_quant_ctr=ctr)
    return _xnnpack_quantizer(QuantizationConfig(act, act, weight, base.bias, qat), float_modules)


def _xnnpack_quantizer(config, float_modules: tuple[type, ...]):
    """An XNNPACKQuantizer applying ``config`` everywhere except in ``float_modules``."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer

    quantizer = XNNPACKQuantizer().set_global(config)
    for module_type in float_modules:
        quantizer.set_module_type(module_type, None)
    return quantizer


# ------------------------------------------------------------------------------- PTQ and QAT

def calibrate(prepared, inputs: torch.Tensor, batch_size: int, desc: str = "calibrate", device: str = "cpu") -> int:
    """Run ``inputs`` through an observed graph in batches of the graph's fixed batch size.

    A last partial batch is filled with copies of its last image: the exported graph only takes
    full batches, and a repeated image cannot move a min-max range (it adds a few duplicate counts
    to a histogram). ``device``: where the observed graph already is (edgemix.devices). Returns the
    number of batches run.
    """
    n = len(inputs)
    steps = math.ceil(n / batch_size)
    with torch.no_grad(), console.progress(desc, steps) as advance:
        for i in range(0, n, batch_size):
            prepared(to_device(pad_to_batch(inputs[i:i + batch_size], batch_size), device))
            advance(1)
    return steps


def ptq(exported: torch.export.ExportedProgram, calib_inputs: torch.Tensor, batch_size: int,
        observer: str = "minmax", percentile: float = 99.99, float_modules: tuple[type, ...] = (),
        device: str = "cpu"):
    """Post-training quantization of an exported graph; returns the converted (Q/DQ) GraphModule, on
    the CPU. ``device``: where the calibration forward passes run (the observers' statistics come back
    with the graph)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if len(calib_inputs) == 0:
        raise UsageError("post-training quantization needs calibration images, got none",
                         hint="set images >= 1 in the calibration recipe")
    prepared = prepare_pt2e(exported.module(), make_quantizer(observer, percentile, False, float_modules))
    calibrate(prepared.to(device), calib_inputs, batch_size, device=device)
    return convert_pt2e(prepared.to("cpu"))


def dynamic(exported: torch.export.ExportedProgram, example: torch.Tensor, float_modules: tuple[type, ...] = ()):
    """Dynamic INT8: per-channel symmetric weights; each GEMM (Linear, Conv) quantizes its input at
    run time from the input's own range and returns float (XNNPACK's qd8 kernels), every other op
    stays float. Nothing to calibrate, so no rounding of GEMM outputs or residual sums: one forward
    pass of ``example`` only lets the weight observers see the weights. Returns the converted
    GraphModule on the CPU."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True)
    prepared = prepare_pt2e(exported.module(), _xnnpack_quantizer(config, float_modules))
    with torch.no_grad():
        prepared(example)
    return convert_pt2e(prepared)


def _qat_train_config(train_set, epochs: float, train_config):
    """The fine-tuning settings of a QAT run (``train_config`` or the QAT defaults, for ``epochs``), its
    batch no larger than the training set; no training images is a UsageError."""
    from edgemix.train import qat_config

    if train_set is None or len(train_set) == 0:
        raise UsageError("quantization-aware training needs training images, got none",
                         hint="give a training data source for --qat-epochs, or use post-training quantization")
    cfg = qat_config(epochs) if train_config is None else dataclasses.replace(train_config, epochs=epochs)
    if cfg.batch_size > len(train_set):
        cfg = dataclasses.replace(cfg, batch_size=len(train_set))
    return cfg


def qat(model: torch.nn.Module, spec, train_set, epochs: float, train_config=None,
        calib_inputs: torch.Tensor | None = None, observer: str = "minmax", percentile: float = 99.99,
        float_modules: tuple[type, ...] = (), device: str = "cpu", calib_batch: int | None = None):
    """Quantization-aware fine-tuning; returns the converted GraphModule (batch dimension symbolic).
    With ``train_config.distill`` the loss distills the FP32 ``model``'s own logits (which stays
    untouched: the graph is exported from a copy).

    QAT starts where PTQ ends: the activation ranges are calibrated on ``calib_inputs`` with the
    recipe's observer (fake-quant off, so they see float activations as in PTQ), in PTQ's batches
    (``calib_batch``: a histogram observer's ranges depend on them), and then frozen;
    fine-tuning adapts the weights to that grid and to their own rounding. Ranges left to the
    quantizer's default moving average over augmented training batches came out narrower than
    the calibrated ones and lost agreement with FP32 even at lr 1e-5 (fmnist: 97.6% vs 99.0%).

    The graph is exported with a symbolic batch: the training loop feeds batches of
    ``train_config.batch_size`` while the artifact is exported at the target's batch. The caller
    re-exports the converted graph at its own batch size.
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    from edgemix.train import fit

    cfg = _qat_train_config(train_set, epochs, train_config)
    prepared, set_train = prepare_qat(model, calib_inputs, cfg.batch_size, observer, percentile, float_modules, device,
                                      calib_batch)
    fit(prepared, list(prepared.parameters()), spec, train_set, cfg, set_train=set_train, desc="qat",
        device=device, teacher=model)  # distills the FP32 model's own outputs when cfg.distill > 0
    set_train(False)
    with torch.no_grad():  # the weight observers last saw the weights before the final step: show them these
        prepared(to_device(calib_inputs[:cfg.batch_size], device))
    return convert_pt2e(prepared.to("cpu"))


# ------------------------------------------------------------------ QAT for dynamic activations

class _RoundSTE(torch.autograd.Function):
    """Quantize-dequantize with a straight-through gradient (the rounding passes gradients as is):
    ``q = clamp(round(v * inv_scale) + zero_point)``, back as ``(q - zero_point) / inv_scale``."""

    @staticmethod
    def forward(ctx, v, inv_scale, zero_point, lo: int, hi: int):
        return (torch.clamp(torch.round(v * inv_scale) + zero_point, lo, hi) - zero_point) / inv_scale

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """Per output channel symmetric INT8 in [-127, 127], scale max|w| / 127 with the quantizer's floor:
    the grid the dynamic quantizer's per-channel min-max observer gives the converted graph."""
    amax = w.detach().abs().flatten(1).amax(1)
    scale = torch.clamp(amax / 127, min=_WEIGHT_EPS).view(-1, *([1] * (w.dim() - 1)))
    return _RoundSTE.apply(w, 1 / scale, torch.zeros_like(scale), -127, 127)


def fake_quant_dynamic(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Asymmetric INT8 from the tensor's own range over ``dims`` (widened to hold 0), as XNNPACK's
    dynamically quantized (qd8) kernels do at run time: a Linear's input per row (the last dim), a
    convolution's per pixel (its channels). Measured against the .pte of convmixer-fmnist's 1x1
    convs (2026-12-01): per pixel the simulated logits differ from the program's by a mean squared
    2.0e-6; per image, 9.5e-5, more than FP32's own 7.5e-5."""
    lo = torch.clamp(x.detach().amin(dim=dims, keepdim=True), max=0)
    hi = torch.clamp(x.detach().amax(dim=dims, keepdim=True), min=0)
    # XNNPACK's own arithmetic (xnn_f32_qd8_asymmetric_quantization_params): an inverse scale that
    # inputs are multiplied by, and the zero point rounded half to even from the range's low end
    inv_scale = torch.where(hi > lo, 255 / (hi - lo), torch.ones_like(hi))
    zero_point = torch.round(torch.clamp(-128 - lo * inv_scale, -128, 127))
    return _RoundSTE.apply(x, inv_scale, zero_point, -128, 127)


class _DynamicQAT(torch.nn.Module):
    """A Linear or Conv2d computing with fake-quantized weights and dynamically fake-quantized input;
    trains the wrapped module's own parameters."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        m = self.inner
        if isinstance(m, torch.nn.Linear):
            return torch.nn.functional.linear(fake_quant_dynamic(x, (-1,)), fake_quant_weight(m.weight), m.bias)
        return m._conv_forward(fake_quant_dynamic(x, (1,)), fake_quant_weight(m.weight), m.bias)


def dynamic_gemm_paths(converted: torch.fx.GraphModule) -> set[str]:
    """Module paths of the Linears and Convs a converted dynamic graph runs in INT8: those whose input
    and weight both come out of a dequantize. (A family may keep some in float, e.g. ConvMixer's stem.)"""
    def dequantized(node) -> bool:
        return isinstance(node, torch.fx.Node) and node.op == "call_function" and "dequantize" in str(node.target)

    paths = set()
    for node in converted.graph.nodes:
        if (node.op == "call_function" and str(node.target) in ("aten.linear.default", "aten.conv2d.default")
                and dequantized(node.args[0]) and dequantized(node.args[1])):
            stack = list((node.meta.get("nn_module_stack") or {}).values())
            if stack:
                paths.add(stack[-1][0])
    return paths


def _wrap_gemms(module: torch.nn.Module, paths: set[str]) -> int:
    """Wrap the Linears and Conv2ds at ``paths`` (module paths, as :func:`dynamic_gemm_paths` gives them)
    for QAT. A subclass with a forward of its own is left as it is (its function is not the plain GEMM
    the wrapper would compute). Returns how many were wrapped."""
    count = 0
    for path in sorted(paths):
        parent_path, _, name = path.rpartition(".")
        parent = module.get_submodule(parent_path)
        child = getattr(parent, name)
        if any(isinstance(child, kind) and type(child).forward is kind.forward
               for kind in (torch.nn.Linear, torch.nn.Conv2d)):
            setattr(parent, name, _DynamicQAT(child))
            count += 1
    return count


def _unwrap_gemms(module: torch.nn.Module) -> None:
    """Put back every module :func:`_wrap_gemms` wrapped (the trained one itself)."""
    for path in [n for n, m in module.named_modules() if isinstance(m, _DynamicQAT)]:
        parent_path, _, name = path.rpartition(".")
        parent = module.get_submodule(parent_path)
        setattr(parent, name, getattr(parent, name).inner)


def qat_dynamic(model: torch.nn.Module, exported: torch.export.ExportedProgram, spec, train_set, epochs: float,
                train_config, example: torch.Tensor, float_modules: tuple[type, ...] = (), device: str = "cpu"):
    """Quantization-aware fine-tuning for dynamic activations; returns the converted GraphModule, as
    :func:`dynamic` gives it, of the fine-tuned weights.

    Nothing is calibrated: each GEMM's input is rounded at run time from its own range, so what
    training can adapt to is the weights' rounding and that per-row input rounding. A copy of
    ``model`` trains with both simulated exactly (:func:`fake_quant_weight`, :func:`fake_quant_dynamic`),
    distilling ``model``'s own logits when ``train_config.distill`` > 0; its weights then go through
    the same dynamic conversion as PTQ's. ``exported``: ``model`` as captured at ``example``'s batch
    (the build's own export), read for which GEMMs the conversion quantizes. ``model`` is left untouched.
    """
    from edgemix.train import fit

    cfg = _qat_train_config(train_set, epochs, train_config)
    # which GEMMs the conversion quantizes, read off the dynamic PTQ graph of the untrained model
    paths = dynamic_gemm_paths(dynamic(exported, example, float_modules))
    student = copy.deepcopy(model).to(device)
    if _wrap_gemms(student, paths) == 0:
        raise UsageError(f"{type(model).__name__} has no Linear or Conv2d that dynamic quantization runs in "
                         "INT8: nothing for dynamic-activation QAT to train", hint="drop --qat-epochs")
    fit(student, list(student.parameters()), spec, train_set, cfg, desc="qat", device=device, teacher=model)
    _unwrap_gemms(student)
    student.to("cpu").eval()
    return dynamic(export_model(student, example), example, float_modules)


def prepare_qat(model: torch.nn.Module, calib_inputs: torch.Tensor | None, batch_size: int,
                observer: str = "minmax", percentile: float = 99.99, float_modules: tuple[type, ...] = (),
                device: str = "cpu", calib_batch: int | None = None):
    """The fake-quant graph QAT trains, calibrated and in eval mode; returns ``(prepared, set_train)``
    (``set_train(flag)``: torchao's train/eval switch, never ``.train()`` on an exported graph).
    Exported from a copy of ``model``: an exported graph shares its parameters with the module it came
    from, and QAT would otherwise train the caller's FP32 model (the build's reference, teacher and
    FP32 twin) in place. ``convert_pt2e`` of it computes the same logits as it does."""
    from torchao.quantization.pt2e import (
        FakeQuantizeBase,
        disable_fake_quant,
        enable_fake_quant,
        move_exported_model_to_eval,
        move_exported_model_to_train,
    )
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    if calib_inputs is None or len(calib_inputs) == 0:
        raise UsageError("quantization-aware training calibrates its activation ranges first and got "
                         "no calibration images", hint="set images >= 1 in the calibration recipe")
    calib_batch = max(1, min(calib_batch or batch_size, len(calib_inputs)))
    exported = export_model(copy.deepcopy(model), calib_inputs[:batch_size], dynamic_batch=True,
                            max_batch=max(batch_size, calib_batch, 2))
    prepared = prepare_qat_pt2e(exported.module(), make_quantizer(observer, percentile, True, float_modules))

    def set_train(flag: bool) -> None:
        (move_exported_model_to_train if flag else move_exported_model_to_eval)(prepared)

    set_train(False)
    prepared.to(device)  # calibration and fine-tuning on ``device``; converted on the CPU
    prepared.apply(disable_fake_quant)
    calibrate(prepared, calib_inputs, calib_batch, desc="qat ranges", device=device)
    prepared.apply(enable_fake_quant)
    for module in prepared.modules():
        if isinstance(module, FakeQuantizeBase) and module.qscheme in (torch.per_tensor_affine,
                                                                       torch.per_tensor_symmetric):
            module.disable_observer()  # activations: frozen; per-channel weight observers keep tracking
    return prepared, set_train


# ------------------------------------------------------------------------------ what stays float

_LAYOUT_OPS = ("view", "reshape", "permute", "transpose", "flatten", "unsqueeze", "squeeze", "expand",
               "clone", "contiguous", "getitem", "_assert", "sym_size")


_EDGE_NAMES = {"conv2d.default": "convolution.default"}  # pre-edge ATen name -> XNNPACK config name


def float_ops(converted: torch.fx.GraphModule, dynamic: bool = False) -> dict[str, int]:
    """The compute left in float in a converted INT8 graph, in model terms: {module type or op: count}.

    A node runs in INT8 on XNNPACK when it reads only dequantized tensors, feeds only quantize nodes
    and XNNPACK has a static-quant kernel for its op; anything else that computes (not a view or
    permute) runs in float. With ``dynamic`` (see :func:`dynamic`) a node runs in INT8 when it reads
    only dequantized tensors and XNNPACK has a dynamic-quant kernel for it; its output is float.
    Nodes are grouped by the innermost module that made them, so a LayerNorm decomposed into nine
    ops counts once as "LayerNorm".
    """
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType
    from executorch.exir.backend.canonical_partitioners.config_partitioner import format_target_name

    precision = ConfigPrecisionType.DYNAMIC_QUANT if dynamic else ConfigPrecisionType.STATIC_QUANT
    int8_kernels = {c.target_name for c in ALL_PARTITIONER_CONFIGS if hasattr(c, "target_name")
                    and precision in c().supported_precision_types()}

    def is_qdq(n, kind):
        return n.op == "call_function" and f"{kind}_per_" in str(n.target)

    groups: dict[str, set[str]] = {}
    for node in converted.graph.nodes:
        if node.op != "call_function" or is_qdq(node, "quantize") or is_qdq(node, "dequantize"):
            continue
        name = str(node.target)  # e.g. aten.linear.default
        if any(word in name for word in _LAYOUT_OPS) or "choose_qparams" in name:
            continue
        inputs = [a for a in node.all_input_nodes if a.op == "call_function"]
        int8 = (inputs and all(is_qdq(a, "dequantize") for a in inputs) and node.users
                and (dynamic or all(is_qdq(u, "quantize") for u in node.users))
                and _EDGE_NAMES.get(format_target_name(name), format_target_name(name)) in int8_kernels)
        if int8:
            continue
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        path, kind = stack[-1] if len(stack) > 1 else ("", None)  # [0] is the exported model itself
        kind = str(kind).rsplit(".", 1)[-1].strip("'>") if kind is not None else None
        label = {"XnnpackLayerNorm": "LayerNorm"}.get(kind, kind) if kind else name
        groups.setdefault(label, set()).add(path or node.name)
    return {label: len(paths) for label, paths in sorted(groups.items())}

"""INT8 the way TensorRT wants it: NNCF PTQ (and QAT) on the torch model -> explicit Q/DQ ONNX.

Scheme (TensorRT's explicit-quantization rules): signed INT8, symmetric, zero point 0; weights
per output channel, activations per tensor; Q/DQ on the inputs of Conv/MatMul/Gemm, so
LayerNorm, GELU, the residual adds and the mean pool stay in float (NNCF's transformer patterns
place activation quantizers on the LayerNorm outputs, which TensorRT propagates past the
token-mixing Transposes into the GEMMs). For families that ask for it (ConvMixer, CycleMLP), also
on the Conv outputs NNCF leaves in float (:func:`quantize_conv_outputs`). After export,
:func:`to_tensorrt_layout` rewrites what the TorchScript exporter leaves in a form TensorRT reads
less well (see there), and :func:`qdq_layout` reports the result so tests and the compatibility
check can prove it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import logging
import re
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from edgemix import console
from edgemix.devices import to_device
from edgemix.backends.tensorrt.export import check_onnx, example_input, export_onnx
from edgemix.backends.onnx_graph import GEMM_OPS, attr, const, dq_source, graph_maps, set_attr, walk_to_dq
from edgemix.backends.tensorrt.rules import weight_channel_axis

TRANSPOSED_SUFFIX = "_transposed"  # marks a weight stored (in, out) for MatMul instead of torch's (out, in)
_OBSERVERS = {"minmax": "MINMAX", "moving_average_minmax": "MEAN_MINMAX", "histogram": "HISTOGRAM",
              "percentile": "MEAN_QUANTILE"}


@dataclass
class QDQSettings:
    keep_fp32: tuple[str, ...] = ()  # module names (e.g. "blocks.7.mlp_channels.fc2") left unquantized
    smooth_quant: float | None = None  # SmoothQuant alpha for MatMuls; None = off (see _advanced)
    # NNCF's fast bias correction: off by default. On Mixer it changed nothing measurable (fmnist
    # agreement 0.996 with and without) but cost ~35 s of S/16's build (a per-channel Python loop)
    bias_correction: bool = False
    # a Q/DQ pair on the output of every quantized Conv (see quantize_conv_outputs); the family's
    # choice unless the backend option says otherwise
    conv_outputs: bool = False


def quantizable_layers(model: torch.nn.Module) -> list[str]:
    """Module names of the layers that get Q/DQ and can be kept in FP32: every Linear and Conv2d, and
    every other module holding its own weight matrix or kernel (CycleMLP's CycleFC)."""
    def own_weight(m):
        w = m._parameters.get("weight")
        return w is not None and w.ndim >= 2

    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) or own_weight(m)]


def _use_eager_quant_kernels() -> None:
    """Give NNCF its pure-torch fake-quant kernels instead of the C++ extension it compiles.

    The extension costs ~27 s of g++ on first use (more on a busy host, where NNCF's 60 s load
    timeout then fails the build) and NNCF's reference fallback wraps the same math in
    torch.compile, another ~20 s. These are NNCF's own reference functions (what its tests hold
    the C++ kernels to), run eagerly: identical numbers, no compiler, no warm-up.
    """
    from nncf.torch.quantization import extensions
    from nncf.torch.quantization.reference import torch_executor

    class EagerQuantizedFunctions:
        Quantize_forward = staticmethod(torch_executor.forward)
        Quantize_backward = staticmethod(torch_executor.backward)

    if extensions.QuantizedFunctionsCPU._loaded_namespace is None:
        extensions.QuantizedFunctionsCPU._loaded_namespace = EagerQuantizedFunctions


@contextlib.contextmanager
def _nncf_quietly():
    """NNCF prints its own rich bars on stdout and INFO logs; edgemix shows one progress bar instead.

    nncf.strip also imports torchao, which warns that its CUDA-only kernels (mxfp8, cutlass) do not
    load on this CPU build and trips a torch pytree deprecation notice: noise for an INT8 export.
    """
    loggers = [logging.getLogger(n) for n in ("nncf", "torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _advanced(recipe, settings: QDQSettings):
    from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters,
                                                       AdvancedSmoothQuantParameters, QuantizationParameters)
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    observer = getattr(recipe, "observer", "minmax")
    estimator = dataclasses.replace(getattr(RangeEstimatorParametersSet, _OBSERVERS[observer]))
    if observer == "percentile":
        prob = (100.0 - recipe.percentile) / 100.0
        estimator = dataclasses.replace(
            estimator, min=dataclasses.replace(estimator.min, quantile_outlier_prob=prob),
            max=dataclasses.replace(estimator.max, quantile_outlier_prob=prob))
    # SmoothQuant is off by default: it adds a float Mul in front of every token-mixing MatMul
    # (nothing to fold it into behind the Transpose), which TensorRT and onnxruntime must run as an
    # extra pass over the activations; on Mixer it bought no measurable agreement (0.996 vs 0.992
    # on fmnist) for 3x the calibration time. The sensitivity fallback covers outlier layers.
    alpha = -1 if settings.smooth_quant is None else settings.smooth_quant
    # per-tensor activations always: NNCF otherwise quantizes a depthwise conv's input per channel
    # (ConvMixer), which TensorRT's explicit quantization rejects
    return AdvancedQuantizationParameters(activations_range_estimator_params=estimator,
                                          activations_quantization_params=QuantizationParameters(per_channel=False),
                                          smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=alpha),
                                          disable_bias_correction=not settings.bias_correction)


def _ignored_scope(model: torch.nn.Module, keep_fp32, example: torch.Tensor):
    import nncf
    from nncf.torch.function_hook.nncf_graph.nncf_graph_builder import build_nncf_graph

    if not keep_fp32:
        return None
    unknown = sorted(set(keep_fp32) - set(quantizable_layers(model)))
    if unknown:
        from edgemix.errors import unknown_choice

        raise unknown_choice("layer to keep in FP32", unknown[0], quantizable_layers(model),
                             plural="layers to keep in FP32")
    # NNCF names an op by the call scope, not the module path (CycleMLP's network.2.0.attn.proj is
    # "0/attn/proj/linear/1"), so take the ops that read each layer's weight from NNCF's own graph
    graph = build_nncf_graph(model, example)
    ops = sorted({edge.to_node.node_name for name in keep_fp32
                  for edge in graph.get_output_edges(graph.get_node_by_name(f"{name}.weight"))})
    return nncf.IgnoredScope(names=ops)


class _CountingBatches:
    """The calibration batches, advancing a progress bar as NNCF consumes them (it makes several passes)."""

    def __init__(self, batches, advance):
        self.batches, self.advance = batches, advance

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for b in self.batches:
            yield b
            self.advance(1)


def quantize_ptq(model: torch.nn.Module, calib_inputs: torch.Tensor, recipe,
                 settings: QDQSettings = QDQSettings(), device: str = "cpu") -> torch.nn.Module:
    """NNCF post-training quantization; returns a fake-quant copy of ``model`` (trainable for QAT), on
    the CPU. ``device``: where the calibration forward passes run (``model`` itself is not moved)."""
    import nncf

    _use_eager_quant_kernels()
    bs = max(1, int(getattr(recipe, "batch_size", 32)))
    batches = [to_device(calib_inputs[i:i + bs].contiguous(), device) for i in range(0, len(calib_inputs), bs)]
    if device != "cpu":
        model = copy.deepcopy(model).to(device)
    with console.progress(f"calibrating INT8 ({len(calib_inputs)} images)", None) as advance, _nncf_quietly():
        data = nncf.Dataset(_CountingBatches(batches, advance))
        qmodel = nncf.quantize(
            model.eval(), data, preset=nncf.QuantizationPreset.PERFORMANCE,  # symmetric weights and activations
            model_type=nncf.ModelType.TRANSFORMER, subset_size=len(batches),
            ignored_scope=_ignored_scope(model, settings.keep_fp32, batches[0][:1]),
            advanced_parameters=_advanced(recipe, settings))
        if settings.conv_outputs:
            quantize_conv_outputs(qmodel, batches, recipe)
    return qmodel.to("cpu")


class _Observe(torch.nn.Module):
    """A pass-through hook that feeds what flows past it to a torchao observer."""

    def __init__(self, observer):
        super().__init__()
        self.observer = observer

    def forward(self, x):
        self.observer(x.detach().float().cpu())
        return x


def quantize_conv_outputs(qmodel: torch.nn.Module, batches, recipe) -> list[str]:
    """Add a per-tensor INT8 quantizer on the output of every Conv NNCF quantized in ``qmodel`` whose
    output it left in float; returns NNCF's names of those Conv calls.

    NNCF, like TensorRT's placement guide, quantizes only the inputs of Convs. In ConvMixer and
    CycleMLP a GELU, BatchNorm or branch sum follows most Convs, so the exported graph has no Q after
    them, and onnxruntime (the jetson host proxy) then runs each such Conv in float on dequantized
    weights, without the blocked layout of its FP32 session: ConvMixer ran at 2.6-3.1x its FP32
    artifact. With a Q/DQ pair after the Conv, onnxruntime fuses DQ -> Conv -> Q into QLinearConv
    and TensorRT into an INT8-in, INT8-out convolution. The ranges come from the Conv outputs of the
    float model (NNCF's quantizers off, as NNCF calibrates), over the same batches, with the
    recipe's observer, symmetric as TensorRT requires. The quantizers are NNCF's own, so QAT trains
    their scales like the others.
    """
    from nncf.torch.function_hook.wrapper import get_hook_storage, register_post_function_hook
    from nncf.torch.quantization.layers import BaseQuantizer

    from edgemix.backends.observers import activation_observer

    hooks = get_hook_storage(qmodel)
    quantizers = [m for m in hooks.modules() if isinstance(m, BaseQuantizer)]
    output_quantized = set(hooks.post_hooks.keys())
    # NNCF keys a hook "<op name>__<port>": port 1 of a conv2d call is its weight
    convs = [k.removesuffix("__1") for k in hooks.pre_hooks.keys()
             if k.endswith("__1") and "/conv2d/" in k and f"{k.removesuffix('__1')}__0" not in output_quantized]
    if not convs:
        return []
    # NNCF's own per-tensor activation quantizer, as a template (made signed: a Conv output has both signs)
    template = next(q for d in [*hooks.pre_hooks.values(), *hooks.post_hooks.values()] for q in d.values()
                    if tuple(getattr(q, "scale_shape", ())) == (1,))
    ctr = activation_observer(getattr(recipe, "observer", "minmax"), getattr(recipe, "percentile", 99.99))
    observers = {op: ctr(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric) for op in convs}
    handles = [register_post_function_hook(qmodel, op, 0, _Observe(observers[op])) for op in convs]
    enabled = [q.is_enabled_quantization() for q in quantizers]
    try:
        for q in quantizers:
            q.disable_quantization()
        with torch.no_grad():
            for b in batches:
                qmodel(b)
    finally:
        for h in handles:
            h.remove()
        for q, on in zip(quantizers, enabled):
            if on:
                q.enable_quantization()
    for op in convs:
        scale, _ = observers[op].calculate_qparams()
        quantizer = copy.deepcopy(template)
        quantizer.signed = True  # NNCF's setter also resets the integer levels
        # NNCF's symmetric scale is the range's upper bound; torch's symmetric qint8 step is that / 127.5
        quantizer.scale = torch.nn.Parameter(scale.reshape(template.scale_shape).to(torch.float32) * 127.5)
        register_post_function_hook(qmodel, op, 0, quantizer.to(template.scale.device))
    return convs


def finetune_qat(qmodel: torch.nn.Module, spec, train_set, train_config, epochs: float,
                 device: str = "cpu", teacher: torch.nn.Module | None = None) -> dict:
    """Quantization-aware fine-tuning of NNCF's fake-quant model (weights and quantizer scales learn),
    on ``device``, towards ``teacher``'s logits when the config distills; the model is back on the CPU
    when this returns."""
    from edgemix.train import fit, loss_name, qat_config, seed_everything

    cfg = train_config or qat_config(float(epochs))
    if teacher is None and train_config is None:
        cfg = dataclasses.replace(cfg, distill=0.0)  # nothing to distill: the labels
    cfg = dataclasses.replace(cfg, epochs=float(epochs))
    seed_everything(cfg.seed)
    qmodel.to(device)
    _, steps = fit(qmodel, [p for p in qmodel.parameters() if p.requires_grad], spec, train_set, cfg,
                   desc="QAT fine-tuning", device=device, teacher=teacher)
    qmodel.eval().to("cpu")
    return {"epochs": float(epochs), "steps": steps, "lr": cfg.lr, "batch_size": cfg.batch_size,
            "loss": loss_name(cfg)}


def export_qdq(qmodel: torch.nn.Module, spec, *, batch: int, dynamic_batch: bool, opset: int):
    """Strip NNCF's quantizers to torch FakeQuantize, export, and bring the graph into TensorRT form.

    Returns (ModelProto, list of the layout fixes applied).
    """
    import nncf

    with _nncf_quietly():
        # strip turns NNCF quantizers into torch FakeQuantize modules (ONNX Q/DQ); without it the
        # graph holds OpenVINO FakeQuantize ops that neither onnxruntime nor TensorRT reads
        stripped = nncf.strip(qmodel, do_copy=True, example_input=example_input(spec, 1))
    proto = export_onnx(stripped, spec, batch=batch, dynamic_batch=dynamic_batch, opset=opset, check=False)
    proto, fixes = to_tensorrt_layout(proto)
    check_onnx(proto)  # after the rewrite: onnx.checker and shape inference must accept what ships
    return proto, fixes


def conv_outputs_quantized(proto: onnx.ModelProto) -> int:
    """How many Conv nodes feed a QuantizeLinear and nothing else (their output is INT8)."""
    _, consumers = graph_maps(proto.graph)
    return sum(1 for n in proto.graph.node if n.op_type == "Conv"
               and [c.op_type for c in consumers.get(n.output[0], [])] == ["QuantizeLinear"])


# ---------------------------------------------------------------- ONNX graph post-processing

def to_tensorrt_layout(proto: onnx.ModelProto):
    """Rewrite, in place, two things the TorchScript exporter leaves behind; returns (proto, fixes):

    * weight DQ -> Transpose -> MatMul (torch keeps Linear weights (out, in) and transposes them in
      the graph): the weight is stored transposed and the DQ axis moved (0 -> 1) so the per-channel
      axis sits on the MatMul's output-channel dimension with nothing between DQ and the GEMM,
      the form TensorRT's Q/DQ fusion and onnxruntime's QDQ selectors match directly;
    * unsigned (uint8) Q/DQ pairs, which TensorRT rejects: re-expressed as int8 with zero point 0
      covering the same range (scale * 255/127). NNCF emits them for never-negative activations;
    * weights stored in FP32 behind a QuantizeLinear: quantized once here and stored as INT8
      initializers read by the DequantizeLinear alone (see :func:`_int8_weights`). A weight the
      exporter wrote as a Constant node (a buffer such as CycleFC's fixed shift kernel) is made an
      initializer first, so that it is recognised, checked and stored as the weight it is.
    """
    graph = proto.graph
    stale: set[str] = set()  # tensors whose recorded shape or type the rewrite changes
    fixes = _constant_weights_as_initializers(graph, stale)
    inits = {i.name: i for i in graph.initializer}
    producers, consumers = graph_maps(graph)
    dead = []
    for t in [n for n in graph.node if n.op_type == "Transpose"]:
        dq = producers.get(t.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or len(consumers.get(dq.output[0], [])) != 1:
            continue
        q = producers.get(dq.input[0])
        src = q.input[0] if q is not None and q.op_type == "QuantizeLinear" else dq.input[0]
        if src not in inits or (q is not None and len(consumers.get(q.output[0], [])) != 1):
            continue
        if len(consumers.get(src, [])) != 1:
            continue  # a shared weight keeps its layout for the other reader
        perm = list(attr(t, "perm") or reversed(range(len(inits[src].dims))))
        weight = numpy_helper.to_array(inits[src]).transpose(perm)
        new = numpy_helper.from_array(np.ascontiguousarray(weight), src + TRANSPOSED_SUFFIX)
        graph.initializer.remove(inits[src])
        graph.initializer.append(new)
        for node in (n for n in (q, dq) if n is not None):
            node.input[0] = new.name if node.input[0] == src else node.input[0]
            stale.update(node.output)  # onnxsim recorded their old (out, in) shapes
            if node.input[1] in inits and inits[node.input[1]].dims:  # per-channel: axis (default 1) follows
                set_attr(node, "axis", perm.index(attr(node, "axis", 1) % len(perm)))
        for c in consumers.get(t.output[0], []):
            c.input[:] = [dq.output[0] if i == t.output[0] else i for i in c.input]
        for o in graph.output:
            if o.name == t.output[0]:
                o.name = dq.output[0]
        dead.append(t)
        fixes.append(f"folded weight transpose {t.name} into {new.name} (DQ axis now on output channels)")
    for t in dead:
        graph.node.remove(t)
    fixes += _signed_int8(graph, stale)
    fixes += _int8_weights(graph, stale)
    kept = [v for v in graph.value_info if v.name not in stale]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    fixes += _batchnorm_as_affine(proto)  # reads the shapes recorded so far: after the stale ones are gone
    return proto, fixes


def _batchnorm_as_affine(proto: onnx.ModelProto) -> list[str]:
    """An inference BatchNormalization that no Conv feeds (ConvMixer's follow a GELU) becomes the
    per-channel Mul and Add it computes, with a scalar Mul in front of it (the GELU's 0.5) folded into
    the scale.

    TensorRT fuses either form into its pointwise kernels. onnxruntime cannot move a layout Transpose
    through a BatchNormalization, so every QLinearConv of a ConvMixer sat between two NCHW <-> NHWC
    Transposes; through a Mul and an Add with constants it can, and they cancel. Measured
    (convmixer-1024-20 random weights, 2026-12-01, Intel Xeon, 2 threads): 82 -> 2 Transposes,
    0.97x -> 0.90x the FP32 artifact's time.
    """
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    producers, consumers = graph_maps(graph)
    ranks = {v.name: len(v.type.tensor_type.shape.dim)
             for v in onnx.shape_inference.infer_shapes(proto).graph.value_info}
    rewritten, folded, dropped = 0, 0, set()  # dropped: the BatchNorms' statistics, the folded scalars
    for bn in [n for n in graph.node if n.op_type == "BatchNormalization"]:
        src = producers.get(bn.input[0])
        rank = ranks.get(bn.input[0])
        if (len(bn.output) != 1 or any(i not in inits for i in bn.input[1:5]) or rank is None or rank < 2
                or (src is not None and src.op_type == "Conv")):
            continue  # training-mode, or a Conv's (every runtime folds that one into the Conv)
        gamma, beta, mean, var = (numpy_helper.to_array(inits[i]).astype(np.float64) for i in bn.input[1:5])
        scale = gamma / np.sqrt(var + attr(bn, "epsilon", 1e-5))
        shift = beta - mean * scale
        x = bn.input[0]
        if src is not None and src.op_type == "Mul" and len(consumers.get(src.output[0], [])) == 1:
            values = [const(i, inits, producers) for i in src.input]
            k = next((k for k in (0, 1) if values[k] is not None and values[k].size == 1), None)
            if k is not None:
                scale, x = scale * float(values[k].reshape(())), src.input[1 - k]
                graph.node.remove(src)
                dropped.add(src.input[k])
                folded += 1
        shape = (-1,) + (1,) * (rank - 2)
        base = bn.name or bn.output[0]
        s_init = numpy_helper.from_array(scale.astype(np.float32).reshape(shape), f"{base}/affine_scale")
        b_init = numpy_helper.from_array(shift.astype(np.float32).reshape(shape), f"{base}/affine_shift")
        graph.initializer.extend([s_init, b_init])
        at = list(graph.node).index(bn)
        graph.node.insert(at, onnx.helper.make_node("Mul", [x, s_init.name], [f"{bn.output[0]}/scaled"],
                                                    name=f"{base}/scale"))
        graph.node.insert(at + 1, onnx.helper.make_node("Add", [f"{bn.output[0]}/scaled", b_init.name],
                                                        list(bn.output), name=f"{base}/shift"))
        graph.node.remove(bn)
        dropped.update(bn.input[1:5])
        rewritten += 1
    if not rewritten:
        return []
    _, consumers = graph_maps(graph)
    unread = {name for name in dropped if name not in consumers and name not in {o.name for o in graph.output}}
    for n in [n for n in graph.node if n.op_type == "Constant" and n.output[0] in unread]:
        graph.node.remove(n)
    for i in [i for i in graph.initializer if i.name in unread]:
        graph.initializer.remove(i)
    live = {o for n in graph.node for o in n.output}
    kept = [v for v in graph.value_info if v.name in live]  # the folded Muls' outputs are gone
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return [f"{rewritten} BatchNormalizations (after an activation) written as per-channel Mul + Add"
            + (f", {folded} scalar Muls folded into them" if folded else "")]


def _constant_weights_as_initializers(graph, stale: set) -> list[str]:
    """Constant nodes whose tensor only QuantizeLinear nodes read (weights) become initializers."""
    _, consumers = graph_maps(graph)
    moved = []
    for n in [n for n in graph.node if n.op_type == "Constant"]:
        value = attr(n, "value")
        readers = consumers.get(n.output[0], [])
        if (value is None or not readers or any(r.op_type != "QuantizeLinear" or r.input[0] != n.output[0]
                                                for r in readers)):
            continue
        graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(value), n.output[0]))
        graph.node.remove(n)
        moved.append(n.output[0])
        stale.add(n.output[0])  # it is stored as INT8 below
    return [f"stored {len(moved)} constant weights as initializers"] if moved else []


def _signed_int8(graph, stale: set) -> list[str]:
    inits = {i.name: i for i in graph.initializer}
    _, consumers = graph_maps(graph)
    fixes = []
    for q in [n for n in graph.node if n.op_type == "QuantizeLinear"]:
        if len(q.input) < 3 or q.input[2] not in inits or q.input[1] not in inits:
            continue
        zp = inits[q.input[2]]
        if zp.data_type != onnx.TensorProto.UINT8 or np.any(numpy_helper.to_array(zp) != 0):
            continue  # int8 already, or asymmetric: the rules check reports the latter, a rewrite would hide it
        dqs = [c for c in consumers.get(q.output[0], []) if c.op_type == "DequantizeLinear"]
        # new initializers, not an in-place edit: onnxsim merges equal constants, so this scale
        # tensor may also serve an unrelated int8 pair
        scale = numpy_helper.to_array(inits[q.input[1]])
        new_scale = numpy_helper.from_array((scale * (255.0 / 127.0)).astype(scale.dtype), f"{q.name}/scale_int8")
        new_zp = numpy_helper.from_array(np.zeros(numpy_helper.to_array(zp).shape, np.int8),
                                         f"{q.name}/zero_point_int8")
        graph.initializer.extend([new_scale, new_zp])
        for node in [q, *dqs]:
            node.input[1], node.input[2] = new_scale.name, new_zp.name
        stale.add(q.output[0])  # its recorded element type was uint8
        fixes.append(f"uint8 Q/DQ {q.name} re-expressed as int8 with zero point 0 (same range, scale x255/127)")
    return fixes


def _quantize_like_onnx(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int) -> np.ndarray:
    """ONNX QuantizeLinear on a constant: saturate(round_half_even(x / scale) + zero_point), int8."""
    shape = [1] * x.ndim
    if scale.size > 1:
        shape[axis % x.ndim] = scale.size
    q = np.rint(x.astype(np.float32) / scale.astype(np.float32).reshape(shape))
    return np.clip(q + zero_point.astype(np.float32).reshape(shape), -128, 127).astype(np.int8)


def _int8_weights(graph, stale: set) -> list[str]:
    """Q(FP32 weight) -> DQ becomes INT8 weight -> DQ: the same numbers, a quarter of the bytes.

    The exporter writes each weight as an FP32 initializer behind a QuantizeLinear that every
    runtime constant-folds at load; storing the folded INT8 tensor makes the .onnx ~4x smaller (what
    is copied to the device and parsed by TensorRT) and is the weight form TensorRT's explicit
    quantization documents. The initializer keeps its name, so layer names in reports do not move.
    """
    inits = {i.name: i for i in graph.initializer}
    _, consumers = graph_maps(graph)
    fixes, dead = [], []
    for q in [n for n in graph.node if n.op_type == "QuantizeLinear"]:
        w, ins = q.input[0], list(q.input)
        if w not in inits or len(ins) < 3 or any(i not in inits for i in ins[1:3]):
            continue
        readers = consumers.get(w, [])
        dqs = consumers.get(q.output[0], [])
        if len(readers) != 1 or not dqs or any(d.op_type != "DequantizeLinear" for d in dqs):
            continue  # the FP32 tensor is read elsewhere too, or Q feeds more than DQs: leave it
        zp = numpy_helper.to_array(inits[ins[2]])
        if zp.dtype != np.int8:
            continue
        q_weight = _quantize_like_onnx(numpy_helper.to_array(inits[w]), numpy_helper.to_array(inits[ins[1]]),
                                       zp, attr(q, "axis", 1))
        inits[w].CopyFrom(numpy_helper.from_array(q_weight, w))  # in place: same name, same position
        for d in dqs:
            d.input[0] = w
        stale.add(q.output[0])
        dead.append(q)
    for q in dead:
        graph.node.remove(q)
    if dead:
        fixes.append(f"stored {len(dead)} weights as INT8 initializers read by DequantizeLinear (Q folded at build)")
    return fixes


def qdq_layout(proto: onnx.ModelProto) -> list[dict]:
    """For every Conv/MatMul/Gemm: which inputs arrive through a DequantizeLinear, and how.

    One row per GEMM: node, layer (weight name), weight axis / expected axis (the output-channel axis
    as the GEMM sees its input; equal to the DQ axis when nothing sits between them), activation
    scale kind, zero points all zero, integer type. Pass-through ops between DQ and GEMM are followed.
    """
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    producers, _ = graph_maps(graph)
    rows = []
    for node in (n for n in graph.node if n.op_type in GEMM_OPS):
        row = {"node": node.name, "op": node.op_type, "layer": None, "weight_quantized": False,
               "activation_quantized": False}
        for port, name in enumerate(node.input[:2]):
            chain, dq = walk_to_dq(producers, name)
            if dq is None:
                continue
            between = [n.op_type for n in chain]
            data_in = dq_source(dq, producers)
            scale = numpy_helper.to_array(inits[dq.input[1]]) if dq.input[1] in inits else None
            zp = numpy_helper.to_array(inits[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] in inits else None
            is_weight = data_in in inits
            info = {"per_channel": scale is not None and scale.ndim == 1 and scale.size > 1,
                    "axis": attr(dq, "axis", 1), "zero_point_zero": zp is None or not np.any(zp),
                    # no zero point input means uint8 in ONNX, which TensorRT cannot take
                    "dtype": onnx.TensorProto.DataType.Name(inits[dq.input[2]].data_type) if zp is not None
                    else "UINT8",
                    "scale_min": float(scale.min()) if scale is not None else None,
                    "between": between}  # pass-through ops from DQ to GEMM (none once the layout is fixed)
            if is_weight:
                rank = len(inits[data_in].dims)
                expect = weight_channel_axis(node, port, rank)
                row.update(weight_quantized=True, layer=data_in.removesuffix(TRANSPOSED_SUFFIX).removesuffix(".weight"),
                           weight=info, weight_expected_axis=expect)
            else:
                row.update(activation_quantized=True, activation=info)
        rows.append(row)
    return rows

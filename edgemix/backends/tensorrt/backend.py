"""The TensorRT backend's stages: NNCF QDQ (PTQ or QAT) -> ONNX in TensorRT's explicit-quantization
layout -> the rules check -> the engine (or its device script); registered as "tensorrt"."""

from __future__ import annotations

import json
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgemix.backends.base import Backend, BuildJob, BuiltArtifact, register
from edgemix.backends.onnx_graph import op_counts
from edgemix.backends.tensorrt.engine import (_write_atomic, build_engine, engine_script, tensorrt_status,
                                              trtexec_command)
from edgemix.backends.tensorrt.ort import OnnxRuntimePredictor, host_proxy


class TensorRTOptions(BaseModel):
    """``--backend-option`` switches of this backend; values typed, or strings from a command line
    (pydantic's booleans: true/false, 1/0, yes/no, on/off, as for every backend)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    keep_fp32: tuple[str, ...] = Field((), description="layer names kept in FP32 (comma-separated), e.g. "
                                       "what --fallback chose")
    smooth_quant: float | None = Field(None, ge=0, le=1, description="SmoothQuant alpha in [0, 1] (off when unset)")
    bias_correction: bool = Field(False, description="NNCF's fast bias correction")
    conv_outputs: bool | None = Field(None, description="also quantize every Conv's output, so that onnxruntime "
                                      "and TensorRT run it INT8 in and out (default: the model family's choice, "
                                      "on for ConvMixer and CycleMLP)")

    @field_validator("keep_fp32", mode="before")
    @classmethod
    def _split(cls, v):
        return tuple(k.strip() for k in v.split(",") if k.strip()) if isinstance(v, str) else v

    @field_validator("smooth_quant", "conv_outputs", mode="before")
    @classmethod
    def _unset(cls, v):
        return None if v == "" else v


def qdq_settings(options: TensorRTOptions, model=None):
    """The QDQ settings for ``options``; ``model``'s family decides what the options leave unset."""
    from edgemix.backends.tensorrt.qdq import QDQSettings
    from edgemix.models.registry import family_setting

    conv_outputs = options.conv_outputs
    if conv_outputs is None:
        conv_outputs = bool(family_setting(model, "qdq_conv_outputs", False))
    return QDQSettings(keep_fp32=options.keep_fp32, smooth_quant=options.smooth_quant,
                       bias_correction=options.bias_correction, conv_outputs=conv_outputs)


@register
class TensorRTBackend(Backend):
    name = "tensorrt"
    precisions = ("int8", "fp16", "fp32")
    supports_qat = True
    supports_dynamic_batch = True
    supports_fallback = True
    artifact_suffix = ".onnx"
    options_model = TensorRTOptions

    def build(self, job: BuildJob) -> BuiltArtifact:
        from edgemix.backends.tensorrt import export as onnx_export
        from edgemix.backends.tensorrt.rules import check_tensorrt_compat
        from edgemix.backends.tensorrt import qdq

        opts = self.parse_options(job.options)

        target, spec, trt_cfg = job.target, job.spec, job.target.tensorrt
        stage_dir = Path(job.stage_dir)
        stage_dir.mkdir(parents=True, exist_ok=True)
        dynamic = len(set(target.batch_sizes)) > 1
        batch = target.export_batch
        onnx_path = stage_dir / f"{job.basename}{self.artifact_suffix}"
        quant: dict = {"scheme": "fp32 weights and activations (TensorRT builder decides fp16 when asked)"}
        if job.precision == "int8":
            settings = qdq_settings(opts, job.model)
            t0 = time.perf_counter()
            qmodel = qdq.quantize_ptq(job.model, job.calib_inputs, job.recipe, settings, device=job.device)
            job.stage("calibrate", f"INT8 ranges from {len(job.calib_inputs)} images ({quant_observer(job)})",
                      time.perf_counter() - t0, None)
            qat = None
            if job.qat_epochs:
                t0 = time.perf_counter()
                qat = qdq.finetune_qat(qmodel, spec, job.train_set, job.train_config, job.qat_epochs,
                                       device=job.device, teacher=job.model)
                job.stage("qat", f"{job.qat_epochs:g} epoch(s), {qat['steps']} steps of fake-quant fine-tuning",
                          time.perf_counter() - t0, None)
            t0 = time.perf_counter()
            proto, fixes = qdq.export_qdq(qmodel, spec, batch=batch, dynamic_batch=dynamic, opset=trt_cfg.opset)
            layout = qdq.qdq_layout(proto)
            quant = {"scheme": "int8 symmetric (zero point 0), per-channel weights on the output-channel axis, "
                               "per-tensor activations, explicit Q/DQ on Conv/MatMul/Gemm inputs"
                               + (" and on Conv outputs" if settings.conv_outputs else ""),
                     "tool": f"nncf {_version('nncf')}", "observer": quant_observer(job),
                     "calibration_images": int(len(job.calib_inputs)), "qat_epochs": float(job.qat_epochs),
                     "qat": qat, "keep_fp32": list(settings.keep_fp32), "smooth_quant": settings.smooth_quant,
                     "bias_correction": settings.bias_correction, "layout_fixes": fixes,
                     "conv_outputs": settings.conv_outputs, "conv_outputs_quantized": qdq.conv_outputs_quantized(proto),
                     "quantized_layers": sum(r["weight_quantized"] and r["activation_quantized"] for r in layout)}
        else:
            t0 = time.perf_counter()
            proto = onnx_export.export_onnx(job.model, spec, batch=batch, dynamic_batch=dynamic, opset=trt_cfg.opset)
        size = onnx_export.save_onnx(proto, onnx_path)
        job.stage("export", f"{onnx_path.name} (opset {trt_cfg.opset}, input {onnx_export.input_shape(proto)})",
                  time.perf_counter() - t0, size)

        t0 = time.perf_counter()
        report = check_tensorrt_compat(proto, trt_cfg.version, precision=job.precision,
                                       batch_range=target.batch_range if dynamic else None)
        compat_path = stage_dir / f"{job.basename}.trtcheck.json"
        _write_atomic(compat_path, json.dumps(report.to_dict(), indent=2) + "\n")
        job.stage("trt-check", report.format().splitlines()[0], time.perf_counter() - t0, None)
        report.raise_if_failed()  # nothing leaves the host that TensorRT would reject

        files = {"model": onnx_path, "compat": compat_path}
        engine = self._engine(job, onnx_path, dynamic, files)
        return BuiltArtifact(files=files, runtime="onnxruntime", batch_size=batch, dynamic_batch=dynamic,
                             quantization=quant,
                             details={"compat": report.to_dict(), "engine": engine, "float_ops": _float_ops(proto),
                                      "onnx": {"opset": trt_cfg.opset, "input": onnx_export.input_shape(proto),
                                               "ops": dict(op_counts(proto))},
                                      "host_proxy": host_proxy(job.precision)})

    def _engine(self, job: BuildJob, onnx_path: Path, dynamic: bool, files: dict) -> dict:
        trt_cfg, spec = job.target.tensorrt, job.spec
        kw = dict(precision=job.precision, fp16_fallback=trt_cfg.fp16_fallback, dynamic_batch=dynamic,
                  batch_range=job.target.batch_range, input_name="input",
                  chw=(spec.in_chans, spec.img_size, spec.img_size), workspace_mb=trt_cfg.workspace_mb)
        engine_name, cache_name = f"{job.basename}.engine", f"{job.basename}.timing.cache"
        t0 = time.perf_counter()
        can_build, why = tensorrt_status()
        if can_build:
            info = build_engine(onnx_path, onnx_path.parent / engine_name, onnx_path.parent / cache_name, **kw)
            files.update(engine=onnx_path.parent / engine_name, timing_cache=onnx_path.parent / cache_name)
            job.stage("engine", f"{engine_name} (TensorRT {info['tensorrt']}, {info['gpu']})",
                      time.perf_counter() - t0, info["bytes"])
            return info
        command = trtexec_command(onnx_path.name, engine_name, cache_name, **kw)
        script = onnx_path.parent / "build_engine.sh"
        lo, opt, hi = job.target.batch_range if dynamic else (job.target.batch_range[1],) * 3
        size = _write_atomic(script, engine_script(
            job.target, command, engine_name, onnx_name=onnx_path.name, precision=job.precision,
            fp16=job.precision == "fp16" or (job.precision == "int8" and trt_cfg.fp16_fallback),
            batch_range=(lo, opt, hi)), mode=0o755)
        files["engine_script"] = script
        job.stage("engine", f"build_engine.sh for the device ({why} here)", time.perf_counter() - t0, size)
        return {"status": "to_build_on_device", "reason": why, "script": script.name,
                "command": ["trtexec", *command], "engine": engine_name, "timing_cache": cache_name,
                "tensorrt": trt_cfg.version, "jetpack": trt_cfg.jetpack}

    def fallback(self, job: BuildJob, artifact: BuiltArtifact, x, evaluate, threads: int):
        """Rank the quantized layers by the drift each causes alone (on up to 64 images), keep the most
        sensitive ones in FP32 until ``evaluate`` (drift on the whole evaluation set) meets the
        target's budget, and rebuild with them excluded."""
        from edgemix.backends.tensorrt.sensitivity import plan_fallback

        plan = plan_fallback(artifact.files["model"], job.model, x[:64], job.target.budget, evaluate,
                             threads=threads)
        if plan["keep_fp32"] and not set(plan["quantized_layers"]) - set(plan["keep_fp32"]):
            from edgemix.errors import UsageError

            raise UsageError(
                f"the drift budget of target '{job.target.name}' is {'met only' if plan['met'] else 'not met even'} "
                f"with every quantized layer of '{job.spec.name}' in FP32 ({len(plan['keep_fp32'])} layers): "
                "no INT8 layer would be left to build, so nothing was written",
                hint="build with --precision fp16 (or fp32), or loosen the [budget] of the target profile")
        if plan["keep_fp32"]:
            job.options["keep_fp32"] = list(plan["keep_fp32"])
            artifact = self.build(job)
        return artifact, plan

    def load_predictor(self, artifact: BuiltArtifact, threads: int) -> OnnxRuntimePredictor:
        return OnnxRuntimePredictor(artifact.files["model"], threads, artifact.batch_size, artifact.dynamic_batch)


def _float_ops(proto) -> dict[str, int]:
    """Compute ops that stay in float (FP16 on the device with fp16_fallback): every op but Q/DQ, the
    GEMMs fed through DQ, and shape plumbing. The FP32-comparison table in the report shows these."""
    from edgemix.backends.tensorrt.qdq import qdq_layout

    int8 = {r["node"] for r in qdq_layout(proto) if r["weight_quantized"] and r["activation_quantized"]}
    plumbing = {"QuantizeLinear", "DequantizeLinear", "Shape", "Slice", "Concat", "Reshape", "Transpose",
                "Constant", "Identity", "Squeeze", "Unsqueeze", "Gather"}
    out: dict[str, int] = {}
    for n in proto.graph.node:
        if n.op_type not in plumbing and n.name not in int8:
            out[n.op_type] = out.get(n.op_type, 0) + 1
    return dict(sorted(out.items()))


def quant_observer(job: BuildJob) -> str:
    return getattr(job.recipe, "observer", "minmax")


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"

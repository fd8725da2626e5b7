"""The Jetson / TensorRT backend: explicitly quantized (Q/DQ) ONNX, checked here, engine built on the GPU.

TensorRT engines are specific to a GPU and a TensorRT version, so the host produces and checks what
TensorRT consumes (the ONNX, the build settings) and builds the engine only where ``tensorrt``
imports next to a CUDA GPU; elsewhere it writes ``build_engine.sh``, the same build as a ``trtexec``
command that refuses a device whose TensorRT/JetPack differ from the target profile. Drift is
measured on this host by onnxruntime running the very ONNX file TensorRT will parse.
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

import numpy as np

from edgemix.backends.base import Backend, BuildJob, BuiltArtifact, register
from edgemix.errors import ToolchainError

TRTEXEC_JETPACK = "/usr/src/tensorrt/bin/trtexec"
# L4T release (/etc/nv_tegra_release) -> JetPack, for devices without the nvidia-jetpack package
L4T_TO_JETPACK = {"36.4.3": "6.2", "36.4": "6.1", "36.3": "6.0", "35.6": "5.1.4", "35.5": "5.1.3",
                  "35.4.1": "5.1.2", "35.3.1": "5.1.1", "35.2.1": "5.1", "35.1": "5.0.2"}


def _write_atomic(path: Path, data: bytes | str, mode: int | None = None) -> int:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o644 if mode is None else mode)  # mkstemp's 0600 would hide it from the device user
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path.stat().st_size


def tensorrt_status() -> tuple[bool, str]:
    """(can build an engine here, why not / which GPU)."""
    try:
        import tensorrt  # noqa: F401
    except Exception:  # ImportError, or the bindings installed without libnvinfer (OSError)
        return False, "tensorrt not installed"
    gpu = _cuda_gpu()
    return (True, gpu) if gpu else (False, "no CUDA GPU visible")


def _cuda_gpu() -> str | None:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    model = Path("/proc/device-tree/model")  # Jetsons whose torch wheel is a CPU build
    if Path("/dev/nvhost-ctrl-gpu").exists() and model.exists():
        return model.read_text(errors="replace").strip("\x00\n ")
    return None


def _shape_arg(name: str, batch: int, chw: tuple[int, int, int]) -> str:
    return f"{name}:{batch}x{'x'.join(str(d) for d in chw)}"


def trtexec_command(onnx_name: str, engine_name: str, cache_name: str, *, precision: str, fp16_fallback: bool,
                    dynamic_batch: bool, batch_range: tuple[int, int, int], input_name: str,
                    chw: tuple[int, int, int], workspace_mb: int) -> list[str]:
    """trtexec flags equivalent to :func:`build_engine` (without the executable)."""
    args = [f"--onnx={onnx_name}", f"--saveEngine={engine_name}"]
    if precision == "int8":
        args.append("--int8")  # explicit Q/DQ decides which layers run INT8; no calibrator is used
    if precision == "fp16" or (precision == "int8" and fp16_fallback):
        args.append("--fp16")  # LayerNorm, GELU, adds: FP16 instead of FP32 between the INT8 GEMMs
    if dynamic_batch:
        lo, opt, hi = batch_range
        args += [f"--minShapes={_shape_arg(input_name, lo, chw)}", f"--optShapes={_shape_arg(input_name, opt, chw)}",
                 f"--maxShapes={_shape_arg(input_name, hi, chw)}"]
    args += [f"--memPoolSize=workspace:{workspace_mb}", f"--timingCacheFile={cache_name}"]
    return args


def engine_script(target, command: list[str], engine_name: str) -> str:
    """A bash script for the device: check TensorRT/JetPack against the profile, then run trtexec.

    trtexec writes ``<engine>.partial`` and the script renames it: an interrupted build never
    leaves a truncated engine under the final name.
    """
    trt = target.tensorrt
    partial = f"{engine_name}.partial"
    command = [f"--saveEngine={partial}" if a.startswith("--saveEngine=") else a for a in command]
    jetpack_check = ""
    if trt.jetpack:
        l4t_cases = "\n".join(f'    {k}|{k}.*) found_jp="{v}" ;;' for k, v in L4T_TO_JETPACK.items())
        jetpack_check = f"""
expected_jp={shlex.quote(trt.jetpack)}
found_jp=$(dpkg-query -W -f='${{Version}}' nvidia-jetpack 2>/dev/null | cut -d+ -f1 || true)
if [ -z "$found_jp" ] && [ -r /etc/nv_tegra_release ]; then
  l4t=$(sed -n 's/^# R\\([0-9]*\\) (release), REVISION: \\([0-9.]*\\).*/\\1.\\2/p' /etc/nv_tegra_release)
  case "$l4t" in
{l4t_cases}
  esac
fi
case "$found_jp" in
  "$expected_jp"|"$expected_jp".*) ;;
  *) fail "the target profile is JetPack $expected_jp, this device has '${{found_jp:-none found}}' (nvidia-jetpack / /etc/nv_tegra_release); an engine built here would not match the profile" ;;
esac
"""
    return f"""#!/usr/bin/env bash
# Written by edgemix for target '{target.name}'. Run on the device: TensorRT engines are specific to
# one GPU and one TensorRT version, so the engine is built where it will run.
set -euo pipefail
cd "$(dirname "$0")"
fail() {{ echo "build_engine.sh: error: $*" >&2; exit 3; }}

TRTEXEC="${{TRTEXEC:-$(command -v trtexec || echo {TRTEXEC_JETPACK})}}"
[ -x "$TRTEXEC" ] || fail "trtexec not found on PATH or at {TRTEXEC_JETPACK}, where JetPack installs it (package tensorrt / libnvinfer-bin: sudo apt install tensorrt); or set TRTEXEC=/path/to/trtexec"

expected_trt={shlex.quote(trt.version)}
found_trt=$(dpkg-query -W -f='${{Version}}' libnvinfer-bin 2>/dev/null || dpkg-query -W -f='${{Version}}' tensorrt 2>/dev/null || python3 -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null || true)
case "$found_trt" in
  "$expected_trt"|"$expected_trt".*) ;;
  *) fail "the target profile is TensorRT $expected_trt, this device has '${{found_trt:-none found}}'" ;;
esac
{jetpack_check}
trap 'rm -f {shlex.quote(partial)}' EXIT
"$TRTEXEC" {" ".join(shlex.quote(a) for a in command)}
mv -f {shlex.quote(partial)} {shlex.quote(engine_name)}
# the provenance the runner compares before loading the engine
gpu=$(tr -d '\\0' < /proc/device-tree/model 2>/dev/null || nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || echo unknown)
printf '{{"tensorrt": "%s", "gpu": "%s", "built_by": "trtexec"}}\\n' "$found_trt" "$gpu" > {shlex.quote(engine_name)}.json.tmp
mv {shlex.quote(engine_name)}.json.tmp {shlex.quote(engine_name)}.json
echo "built {engine_name} with TensorRT $found_trt on $gpu"
"""


def build_engine(onnx_path: Path, engine_path: Path, cache_path: Path, *, precision: str, fp16_fallback: bool,
                 dynamic_batch: bool, batch_range: tuple[int, int, int], input_name: str,
                 chw: tuple[int, int, int], workspace_mb: int) -> dict:
    """Build and serialize an engine with the TensorRT Python API (the trtexec command's twin)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 8 needs the explicit-batch flag for ONNX; in 10 it is the only mode and the flag is gone
    explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    network = builder.create_network(0 if explicit is None or int(trt.__version__.split(".")[0]) >= 10
                                     else 1 << int(explicit))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ToolchainError(f"TensorRT {trt.__version__} could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    flags = []
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        flags.append("int8")
    if precision == "fp16" or (precision == "int8" and fp16_fallback):
        config.set_flag(trt.BuilderFlag.FP16)
        flags.append("fp16")
    profile = builder.create_optimization_profile()
    lo, opt, hi = batch_range if dynamic_batch else (batch_range[1],) * 3
    profile.set_shape(input_name, (lo, *chw), (opt, *chw), (hi, *chw))
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ToolchainError(f"TensorRT {trt.__version__} failed to build an engine from {onnx_path.name}",
                             hint="the TensorRT log above names the layer")
    size = _write_atomic(engine_path, bytes(serialized))
    _write_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
    return {"status": "built", "engine": engine_path.name, "timing_cache": cache_path.name, "bytes": size,
            "tensorrt": trt.__version__, "gpu": _cuda_gpu(), "flags": flags,
            "profile": {"min": lo, "opt": opt, "max": hi}, "build_s": round(time.perf_counter() - t0, 1)}


def _has_qdq(model) -> bool:
    import onnx

    from edgemix.backends.onnx_export import op_counts

    proto = onnx.load(str(model), load_external_data=False) if isinstance(model, (str, Path)) else model
    return op_counts(proto)["DequantizeLinear"] > 0


def ort_session(model, threads: int, optimized_model_path: Path | None = None):
    """The onnxruntime CPU session edgemix times and verifies with: the device script's own
    ``ort_session`` (one table of options for the build, ``edgemix bench`` and the device), told
    whether the model is QDQ."""
    import onnxruntime as ort

    from edgemix.resources import device_script

    source = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    return device_script().ort_session(ort, source, threads, qdq=_has_qdq(model),
                                       optimized_model_path=optimized_model_path)


class OnnxRuntimePredictor:
    """The host proxy: onnxruntime on the CPU, the session of :func:`ort_session`."""

    def __init__(self, model, threads: int, batch_size: int, dynamic_batch: bool):
        self.session = ort_session(model, threads)
        self.input_name = self.session.get_inputs()[0].name
        self.batch_size, self.dynamic_batch = batch_size, dynamic_batch

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not self.dynamic_batch and x.shape[0] != self.batch_size:
            raise ValueError(f"this artifact takes batches of {self.batch_size}, got {x.shape[0]} "
                             "(use edgemix.backends.base.batched_predict)")
        return self.session.run(None, {self.input_name: x})[0]


class TensorRTOptions(BaseModel):
    """``--backend-option`` switches of this backend; values typed, or strings from a command line
    (pydantic's booleans: true/false, 1/0, yes/no, on/off, as for every backend)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    keep_fp32: tuple[str, ...] = Field((), description="layer names kept in FP32 (comma-separated), e.g. "
                                       "what --fallback chose")
    smooth_quant: float | None = Field(None, ge=0, le=1, description="SmoothQuant alpha in [0, 1] (off when unset)")
    bias_correction: bool = Field(False, description="NNCF's fast bias correction")

    @field_validator("keep_fp32", mode="before")
    @classmethod
    def _split(cls, v):
        return tuple(k.strip() for k in v.split(",") if k.strip()) if isinstance(v, str) else v

    @field_validator("smooth_quant", mode="before")
    @classmethod
    def _unset(cls, v):
        return None if v == "" else v


def qdq_settings(options: TensorRTOptions):
    from edgemix.quant.qdq import QDQSettings

    return QDQSettings(keep_fp32=options.keep_fp32, smooth_quant=options.smooth_quant,
                       bias_correction=options.bias_correction)


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
        from edgemix.backends import onnx_export
        from edgemix.backends.trt_check import check_tensorrt_compat
        from edgemix.quant import qdq

        opts = self.parse_options(job.options)

        target, spec, trt_cfg = job.target, job.spec, job.target.tensorrt
        stage_dir = Path(job.stage_dir)
        stage_dir.mkdir(parents=True, exist_ok=True)
        dynamic = len(set(target.batch_sizes)) > 1
        batch = target.export_batch
        onnx_path = stage_dir / f"{job.basename}{self.artifact_suffix}"
        quant: dict = {"scheme": "fp32 weights and activations (TensorRT builder decides fp16 when asked)"}
        if job.precision == "int8":
            settings = qdq_settings(opts)
            t0 = time.perf_counter()
            qmodel = qdq.quantize_ptq(job.model, job.calib_inputs, job.recipe, settings)
            job.stage("calibrate", f"INT8 ranges from {len(job.calib_inputs)} images ({quant_observer(job)})",
                      time.perf_counter() - t0, None)
            qat = None
            if job.qat_epochs:
                t0 = time.perf_counter()
                qat = qdq.finetune_qat(qmodel, spec, job.train_set, job.train_config, job.qat_epochs)
                job.stage("qat", f"{job.qat_epochs:g} epoch(s), {qat['steps']} steps of fake-quant fine-tuning",
                          time.perf_counter() - t0, None)
            t0 = time.perf_counter()
            proto, fixes = qdq.export_qdq(qmodel, spec, batch=batch, dynamic_batch=dynamic, opset=trt_cfg.opset)
            layout = qdq.qdq_layout(proto)
            quant = {"scheme": "int8 symmetric (zero point 0), per-channel weights on the output-channel axis, "
                               "per-tensor activations, explicit Q/DQ on Conv/MatMul/Gemm inputs",
                     "tool": f"nncf {_version('nncf')}", "observer": quant_observer(job),
                     "calibration_images": int(len(job.calib_inputs)), "qat_epochs": float(job.qat_epochs),
                     "qat": qat, "keep_fp32": list(settings.keep_fp32), "smooth_quant": settings.smooth_quant,
                     "bias_correction": settings.bias_correction, "layout_fixes": fixes,
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
                                               "ops": dict(onnx_export.op_counts(proto))},
                                      "host_proxy": "onnxruntime CPU, ORT_ENABLE_ALL, on the same ONNX"
                                      + ("" if job.precision != "fp16" else "; FP16 rounding is not simulated")})

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
        size = _write_atomic(script, engine_script(job.target, command, engine_name), mode=0o755)
        files["engine_script"] = script
        job.stage("engine", f"build_engine.sh for the device ({why} here)", time.perf_counter() - t0, size)
        return {"status": "to_build_on_device", "reason": why, "script": script.name,
                "command": ["trtexec", *command], "engine": engine_name, "timing_cache": cache_name,
                "tensorrt": trt_cfg.version, "jetpack": trt_cfg.jetpack}

    def load_predictor(self, artifact: BuiltArtifact, threads: int) -> OnnxRuntimePredictor:
        return OnnxRuntimePredictor(artifact.files["model"], threads, artifact.batch_size, artifact.dynamic_batch)


def _float_ops(proto) -> dict[str, int]:
    """Compute ops that stay in float (FP16 on the device with fp16_fallback): every op but Q/DQ, the
    GEMMs fed through DQ, and shape plumbing. The FP32-comparison table in the report shows these."""
    from edgemix.quant.qdq import qdq_layout

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

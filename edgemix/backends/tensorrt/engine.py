"""The TensorRT engine: built with the tensorrt Python API where it imports next to a GPU, else the
equivalent trtexec command as build_engine.sh for the device."""

from __future__ import annotations

import os
import shlex
import tempfile
import time
from pathlib import Path

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


def engine_script(target, command: list[str], engine_name: str, *, onnx_name: str, precision: str, fp16: bool,
                  batch_range: tuple[int, int, int]) -> str:
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
# the provenance record every loader compares before using the engine (edgemix-engine-provenance/1,
# read by the device runner's engine_mismatches; each fact found the way the runner finds it)
prov_trt=$(python3 -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null || dpkg-query -W -f='${{Version}}' tensorrt 2>/dev/null || echo unknown)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)
if [ -z "$gpu" ] && [ -r /proc/device-tree/model ] && [ -e /etc/nv_tegra_release ]; then gpu="$(tr -d '\\0' < /proc/device-tree/model) iGPU"; fi
cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 || true)
l4t=$(sed -n 's/^# R\\([0-9]*\\) (release), REVISION: \\([0-9.]*\\).*/\\1.\\2/p' /etc/nv_tegra_release 2>/dev/null || true)
jstr() {{ if [ -n "$1" ]; then printf '"%s"' "$1"; else printf null; fi; }}
printf '{{"format": "edgemix-engine-provenance/1", "tensorrt": %s, "gpu": %s, "compute_capability": %s, "l4t": %s, "precision": "{precision}", "fp16": {"true" if fp16 else "false"}, "onnx_sha256": "%s", "batch_range": [{", ".join(str(int(b)) for b in batch_range)}], "engine_sha256": "%s", "built_by": "trtexec (build_engine.sh)"}}\\n' \\
  "$(jstr "$prov_trt")" "$(jstr "${{gpu:-unknown-gpu}}")" "$(jstr "$cc")" "$(jstr "$l4t")" \\
  "$(sha256sum {shlex.quote(onnx_name)} | cut -d' ' -f1)" "$(sha256sum {shlex.quote(engine_name)} | cut -d' ' -f1)" \\
  > {shlex.quote(engine_name)}.json.tmp
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
    # the provenance record every loader of this engine checks (the device script's one format)
    from edgemix.resources import device_script

    dev = device_script()
    record = dev.write_provenance(str(engine_path), dev.this_device_provenance(
        precision, "fp16" in flags, dev.file_sha256(str(onnx_path)), (lo, opt, hi)), "tensorrt-python (edgemix build)")
    return {"status": "built", "engine": engine_path.name, "provenance": engine_path.name + ".json",
            "timing_cache": cache_path.name, "bytes": size, "tensorrt": trt.__version__, "gpu": record["gpu"],
            "compute_capability": record["compute_capability"], "flags": flags,
            "profile": {"min": lo, "opt": opt, "max": hi}, "build_s": round(time.perf_counter() - t0, 1)}

#!/usr/bin/env python3
"""edgemix device runner: copied to a device by `edgemix bench` and run there by the device's Python.

Runs one artifact with the best runtime the device has: TensorRT for an .onnx when TensorRT is
present (the engine is built on the device and cached, keyed by the ONNX checksum, the TensorRT
version and the GPU name, because engines are not portable across either), else onnxruntime for
an .onnx, else the ExecuTorch Python runtime for a .pte. Times W warm-up and N timed runs per
batch size, runs the reference inputs, collects device facts and prints one line:

    EDGEMIX_BENCH_RESULT {"runtime": ..., "device": ..., "batches": [{"batch", "samples_ms"}], ...}

or, when it cannot run, ``EDGEMIX_BENCH_ERROR {"kind", "message", "hint"}`` and exit status 3.
Standalone on purpose (Python 3.8+, numpy and the runtime; no edgemix on the device): the host
turns the raw samples and outputs into percentiles and drift with the same code `edgemix build`
uses, so no statistic is implemented twice.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

RESULT_MARK = "EDGEMIX_BENCH_RESULT "
ERROR_MARK = "EDGEMIX_BENCH_ERROR "
TRTEXEC_PATHS = ("/usr/src/tensorrt/bin/trtexec", "/usr/local/tensorrt/bin/trtexec")


class Failure(Exception):
    def __init__(self, kind, message, hint=None):
        super().__init__(message)
        self.kind, self.message, self.hint = kind, message, hint


def sh(cmd, timeout=10):
    """stdout of a fact-gathering command, or None when it is absent, fails or hangs."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read().replace("\x00", "").strip()
    except OSError:
        return None


# ---------------------------------------------------------------- device facts

def parse_nv_tegra_release(text):
    """'# R36 (release), REVISION: 4.0, ...' -> '36.4.0' (the L4T version JetPack is built on)."""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text or "")
    return f"{m.group(1)}.{m.group(2)}" if m else None


def parse_nvpmodel(text):
    m = re.search(r"NV Power Mode:\s*(.+)", text or "")
    return m.group(1).strip() if m else None


def cpu_model():
    info = read("/proc/cpuinfo") or ""
    for key in ("model name", "Hardware", "Processor"):
        m = re.search(rf"^{key}\s*:\s*(.+)$", info, re.M)
        if m:
            return m.group(1).strip()
    return platform.processor() or platform.machine()


# the CPU features that decide how fast INT8 and BF16 kernels can be (x86: VNNI dot products and AMX
# tiles; Arm: the SDOT/UDOT dot product, I8MM matrix multiply, BF16), as /proc/cpuinfo spells them
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16",
             "asimddp", "i8mm", "bf16", "sve", "sve2")


def isa_features(cpuinfo=None):
    """The INT8/BF16-relevant instruction sets this CPU reports (``flags`` on x86, ``Features`` on Arm)."""
    info = read("/proc/cpuinfo") if cpuinfo is None else cpuinfo
    m = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", info or "", re.M)
    have = set(m.group(1).split()) if m else set()
    return [f for f in ISA_FLAGS if f in have]


def compute_capability():
    cc = sh(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"])
    return cc.splitlines()[0].strip() if cc else None


# ---------------------------------------------------------------- engine provenance
# A TensorRT engine runs only on the TensorRT version and GPU it was built with, and holds the
# precision flags it was built with. Every engine edgemix builds (here, on the host, or by the
# build_engine.sh it writes) has <engine>.json beside it with these facts and the engine's own
# sha256; nothing loads an engine whose record is missing or differs from what is asked for now.

PROVENANCE_FORMAT = "edgemix-engine-provenance/1"
PROVENANCE_KEYS = ("tensorrt", "gpu", "compute_capability", "l4t", "precision", "fp16", "onnx_sha256",
                   "batch_range")


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def engine_provenance(tensorrt, gpu, compute_cap, l4t, precision, fp16, onnx_sha256, batch_range):
    """What an engine is, for the machine and request that build (or want to load) it."""
    return {"format": PROVENANCE_FORMAT, "tensorrt": tensorrt, "gpu": gpu, "compute_capability": compute_cap,
            "l4t": l4t, "precision": precision, "fp16": bool(fp16), "onnx_sha256": onnx_sha256,
            "batch_range": [int(b) for b in batch_range]}


def this_device_provenance(precision, fp16, onnx_sha256, batch_range):
    return engine_provenance(tensorrt_version() or "unknown", gpu_name() or "unknown-gpu", compute_capability(),
                             parse_nv_tegra_release(read("/etc/nv_tegra_release")), precision, fp16,
                             onnx_sha256, batch_range)


def write_provenance(engine_path, provenance, built_by):
    record = dict(provenance, engine_sha256=file_sha256(engine_path), built_by=built_by,
                  built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    tmp = f"{engine_path}.json.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, engine_path + ".json")
    return record


def engine_mismatches(engine_path, expected):
    """Why the engine at ``engine_path`` may not be loaded for ``expected`` (a provenance dict): one
    line per difference naming both sides; [] when its record matches and the file is intact."""
    record_path = engine_path + ".json"
    if not os.path.isfile(record_path):
        return [f"{os.path.basename(engine_path)} has no provenance record ({os.path.basename(record_path)}): "
                "it was not built by edgemix, or its record was lost"]
    try:
        with open(record_path) as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        return [f"its provenance record {os.path.basename(record_path)} cannot be read: {e}"]
    if not isinstance(record, dict) or record.get("format") != PROVENANCE_FORMAT:
        return [f"its provenance record is not {PROVENANCE_FORMAT} (format {record.get('format') if isinstance(record, dict) else None!r})"]
    problems = [f"{key}: the engine was built for {record.get(key)!r}, this run has {expected.get(key)!r}"
                for key in PROVENANCE_KEYS if record.get(key) != expected.get(key)]
    sha = file_sha256(engine_path)
    if record.get("engine_sha256") != sha:
        problems.append(f"the engine file changed after it was built (sha256 {sha[:12]}..., record says "
                        f"{str(record.get('engine_sha256'))[:12]}...): corrupt or replaced")
    return problems


def tensorrt_version():
    try:
        import tensorrt
        return tensorrt.__version__
    except Exception:  # the bindings can be installed without a loadable libnvinfer
        pass
    return sh(["dpkg-query", "-W", "-f=${Version}", "tensorrt"]) or None


def gpu_name():
    name = sh(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"])
    if name:
        return name.splitlines()[0].strip()
    model = read("/proc/device-tree/model")  # Jetson: the iGPU is named by the module
    return f"{model} iGPU" if model and os.path.exists("/etc/nv_tegra_release") else None


def device_facts(threads):
    facts = {"hostname": platform.node(), "system": platform.system(), "kernel": platform.release(),
             "arch": platform.machine(), "cpu": cpu_model(), "cpus": os.cpu_count(), "isa": isa_features(),
             "threads": threads, "python": platform.python_version()}
    if hasattr(os, "sched_getaffinity"):
        facts["cpus_usable"] = len(os.sched_getaffinity(0))
    if os.path.exists("/etc/nv_tegra_release"):
        nvp = sh(["nvpmodel", "-q"])
        clocks = sh(["jetson_clocks", "--show"], timeout=15)  # needs root; absent from the facts otherwise
        facts["jetson"] = {
            "model": read("/proc/device-tree/model"),
            "l4t": parse_nv_tegra_release(read("/etc/nv_tegra_release")),
            "jetpack": sh(["dpkg-query", "-W", "-f=${Version}", "nvidia-jetpack"]),
            "power_mode": parse_nvpmodel(nvp), "clocks": clocks.splitlines()[:40] if clocks else None,
        }
    trt = tensorrt_version()
    if trt:
        facts["tensorrt"] = trt
        facts["gpu"] = gpu_name()
    return facts


# ---------------------------------------------------------------- runtimes

X86_MACHINES = ("x86_64", "amd64", "i386", "i686", "x86")


def uint8_activations(onnx, proto):
    """Present the activation Q/DQ pairs of a QDQ model to onnxruntime as uint8, in place; returns how
    many Q and DQ nodes it re-pointed.

    TensorRT's explicit quantization wants int8 with zero point 0, so that is what the artifact holds.
    onnxruntime's x86 CPU kernels fuse DQ -> Conv/Add/Mul/... -> Q into integer ops only for uint8
    activations (its QDQ selectors refuse int8 there; ARM takes both). Its own int8 -> uint8 pass
    takes only a Q with a single consumer; the rest keep their Conv or MatMul in float on dequantized
    tensors and run each Q/DQ on its own (vip-fmnist: 4 of 35 pairs, 4 of 24 MatMuls; cyclemlp-fmnist:
    8 Convs and 4 MatMuls). This converts every pair up front. A uint8 tensor with zero point
    z + 128 holds the same integers shifted by 128: Q and DQ compute the same values (the clamp
    ranges shift with it), so the function is unchanged and only the kernels onnxruntime may pick
    change. A QuantizeLinear is re-pointed only when every consumer is a DequantizeLinear (never a
    graph output); weights (initializer inputs) stay int8."""
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    int8 = onnx.TensorProto.INT8

    def int8_zero_point(node):
        zp = inits.get(node.input[2]) if len(node.input) > 2 else None
        return zp is not None and zp.data_type == int8

    shifted, changed, q_outputs = {}, 0, set()
    for q in graph.node:
        if q.op_type != "QuantizeLinear" or q.input[0] in inits or not int8_zero_point(q):
            continue
        users = consumers.get(q.output[0], [])
        if (q.output[0] in outputs or not users
                or not all(u.op_type == "DequantizeLinear" and u.input[0] == q.output[0] and int8_zero_point(u)
                           for u in users)):
            continue
        for node in [q, *users]:
            name = node.input[2]
            if name not in shifted:
                values = onnx.numpy_helper.to_array(inits[name]).astype("int16") + 128
                shifted[name] = f"{name}__uint8"
                graph.initializer.append(onnx.numpy_helper.from_array(values.astype("uint8"), shifted[name]))
            node.input[2] = shifted[name]
            changed += 1
        q_outputs.add(q.output[0])
    # the re-pointed Q outputs' declared types (if any) said int8
    kept = [v for v in graph.value_info if v.name not in q_outputs]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return changed


def uint8_proxy(qdq, providers=None):
    """Whether :func:`ort_session` gives this model to onnxruntime in the uint8 form: a QDQ model on
    an x86 CPU (onnxruntime's CPU provider first)."""
    return (qdq and (providers or ["CPUExecutionProvider"])[0] == "CPUExecutionProvider"
            and platform.machine().lower() in X86_MACHINES)


def ort_session(ort, model, threads, qdq, providers=None, optimized_model_path=None, profile_prefix=None):
    """The one onnxruntime session edgemix verifies, times and benchmarks with: the host build (which
    imports this function from this file) and this script on a device alike.

    ORT_ENABLE_ALL, without which Q/DQ run as float ops. For a QDQ model, also without
    MatMulAddFusion: on a static-shape graph that level-1 fusion rewrites DQ -> MatMul -> Add into
    Reshape -> Gemm before the level-2 QDQ selectors run, so every GEMM then runs in float on
    dequantized weights. Measured (S/16, batch 1 static, 2 threads): 86.7 ms with the fusion, 19.7
    ms without (32 MatMulIntegerToFloat), FP32 50.0 ms. No spin-waiting: sessions timed interleaved
    in one process (INT8 vs FP32) lose their cores to each other's spinning pool threads (S/16, 2
    threads: INT8 33.2 / FP32 73.5 ms spinning, 17.7 / 43.0 ms without).

    A QDQ model on an x86 CPU is given to onnxruntime in the uint8 form of :func:`uint8_activations`
    (when the onnx package is present), so its Convs, adds and muls can run as integer kernels.
    Measured (2026-12-01, Intel Xeon, 2 threads, batch 1): vip-fmnist 1.49 -> 1.09 ms (FP32 1.45),
    cyclemlp-fmnist 1.19 -> 0.86 ms (FP32 0.82), the Mixers unchanged.
    """
    providers = providers or ["CPUExecutionProvider"]
    if uint8_proxy(qdq, providers):
        model = _uint8_form(model)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    if profile_prefix is not None:  # bench/ort_profile.py: onnxruntime's per-node profiler
        so.enable_profiling, so.profile_file_prefix = True, str(profile_prefix)
    return ort.InferenceSession(model, so, providers=providers,
                                disabled_optimizers=["MatMulAddFusion"] if qdq else None)


def _uint8_form(model):
    """`model` (a path or serialized bytes) with uint8 activations, serialized; `model` itself when
    the onnx package is absent (a device may lack it) or nothing was re-pointed."""
    try:
        import onnx
        import onnx.numpy_helper  # noqa: F401
    except ImportError:
        return model
    proto = onnx.load_model_from_string(model) if isinstance(model, bytes) else onnx.load(str(model))
    return proto.SerializeToString() if uint8_activations(onnx, proto) else model


class OrtRuntime:
    name = "onnxruntime"

    def __init__(self, path, threads, qdq):
        import onnxruntime as ort
        avail = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in avail]
        self.sess = ort_session(ort, path, threads, qdq=qdq, providers=providers)
        inp = self.sess.get_inputs()[0]
        self.input_name = inp.name
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        self.sample_shape = [d if isinstance(d, int) else 1 for d in inp.shape[1:]]
        self.info = {"name": self.name, "version": ort.__version__, "providers": self.sess.get_providers()}
        self.threads = threads

    def __call__(self, x):
        return self.sess.run(None, {self.input_name: x})[0]


class ExecuTorchRuntime:
    name = "executorch"

    def __init__(self, path, threads):
        import torch
        from executorch.runtime import Runtime
        try:  # the XNNPACK delegate's pool; without this it sizes itself to every core
            from executorch.extension.pybindings.portable_lib import (
                _threadpool_get_thread_count, _unsafe_reset_threadpool)
            _unsafe_reset_threadpool(threads)
            self.threads = _threadpool_get_thread_count()
        except ImportError:
            self.threads = threads
        self.torch = torch
        program = Runtime.get().load_program(path)
        self.method = program.load_method("forward")
        sizes = list(self.method.metadata.input_tensor_meta(0).sizes())
        self.fixed_batch, self.sample_shape = sizes[0], sizes[1:]  # an exported graph fixes its batch size
        from importlib import metadata
        self.info = {"name": self.name, "version": metadata.version("executorch")}

    def __call__(self, x):
        return self.method.execute([self.torch.from_numpy(x)])[0].numpy()


def find_trtexec():
    return shutil.which("trtexec") or next((p for p in TRTEXEC_PATHS if os.access(p, os.X_OK)), None)


class TensorRTRuntime:
    """Engine built here (TensorRT Python API, else trtexec), timed and run by trtexec, which is on
    every JetPack and reports per-inference GPU-synchronised latencies (--exportTimes)."""

    name = "tensorrt"

    def __init__(self, path, args):
        self.trtexec = find_trtexec()
        if not self.trtexec:
            raise Failure("missing_binary", "trtexec was not found (PATH, " + ", ".join(TRTEXEC_PATHS) + ")",
                          "install the TensorRT samples package (JetPack ships it)")
        if not args.input_name or not args.sample_shape:
            raise Failure("bad_request", "TensorRT needs --input-name and --sample-shape")
        self.args, self.path = args, path
        self.input, self.chw = args.input_name, "x".join(args.sample_shape.split(","))
        self.batches = [int(b) for b in args.batch_sizes.split(",")]
        self.fixed_batch = None if args.dynamic else self.batches[0]
        self.version, self.gpu = tensorrt_version() or "unknown", gpu_name() or "unknown-gpu"
        fp16 = args.precision == "fp16" or (args.precision == "int8" and args.fp16)
        batch_range = (min(self.batches), self.batches[0], max(self.batches))
        expected = this_device_provenance(args.precision, fp16, file_sha256(path), batch_range)
        slug = re.sub(r"[^A-Za-z0-9]+", "-", f"trt{self.version}-{self.gpu}").strip("-")
        key = (f"{expected['onnx_sha256'][:16]}-{slug}-{args.precision}{'-fp16' if fp16 else ''}"
               f"-b{min(self.batches)}-{max(self.batches)}")
        os.makedirs(args.cache_dir, exist_ok=True)
        self.engine = args.engine or os.path.join(args.cache_dir, key + ".engine")
        self.prepare = {"engine": os.path.basename(self.engine), "cached": os.path.isfile(self.engine),
                        "tensorrt": self.version, "gpu": self.gpu, "fp16": fp16}
        if self.prepare["cached"]:
            problems = engine_mismatches(self.engine, expected)
            if problems and not args.rebuild_engine:
                raise Failure("engine_mismatch", f"the engine {self.engine} does not match this run: "
                              + "; ".join(problems),
                              "rebuild it here with --rebuild-engine (edgemix bench --rebuild-engine), or remove it")
            if problems:
                self.prepare.update(cached=False, rebuilt_because=problems)
        if not self.prepare["cached"]:
            t = time.perf_counter()
            tmp = self.engine + f".tmp-{os.getpid()}"  # a half-written engine never carries the final name
            try:
                self.prepare["built_with"] = self._build(tmp)
                os.replace(tmp, self.engine)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            write_provenance(self.engine, expected, self.prepare["built_with"])
            self.prepare["build_s"] = round(time.perf_counter() - t, 1)
        self.info = {"name": self.name, "version": self.version, "gpu": self.gpu}
        self.threads = args.threads

    def _build(self, out):
        a = self.args
        lo, opt, hi = min(self.batches), self.batches[0], max(self.batches)
        try:
            import tensorrt as trt
        except Exception:
            trt = None
        if trt is not None:
            logger = trt.Logger(trt.Logger.WARNING)
            builder = trt.Builder(logger)
            explicit = 0 if int(trt.__version__.split(".")[0]) >= 10 else \
                1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
            network = builder.create_network(explicit)
            parser = trt.OnnxParser(network, logger)
            with open(self.path, "rb") as f:
                if not parser.parse(f.read()):
                    errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
                    raise Failure("engine_build", f"TensorRT could not parse the ONNX: {errs}")
            config = builder.create_builder_config()
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, a.workspace_mb << 20)
            if a.precision == "int8":  # explicit Q/DQ: the scales come from the graph, no calibrator
                config.set_flag(trt.BuilderFlag.INT8)
            if a.precision == "fp16" or (a.precision == "int8" and a.fp16):
                config.set_flag(trt.BuilderFlag.FP16)
            inp = network.get_input(0)
            if inp.shape[0] == -1:
                prof = builder.create_optimization_profile()
                chw = tuple(int(d) for d in a.sample_shape.split(","))
                prof.set_shape(inp.name, (lo,) + chw, (opt,) + chw, (hi,) + chw)
                config.add_optimization_profile(prof)
            blob = builder.build_serialized_network(network, config)
            if blob is None:
                raise Failure("engine_build", "TensorRT could not build an engine (see its log above)")
            with open(out, "wb") as f:
                f.write(blob)
            return "tensorrt-python"
        cmd = [self.trtexec, f"--onnx={self.path}", f"--saveEngine={out}",
               f"--memPoolSize=workspace:{a.workspace_mb}M"]
        cmd += ["--int8"] if a.precision == "int8" else []
        cmd += ["--fp16"] if a.precision == "fp16" or (a.precision == "int8" and a.fp16) else []
        if a.dynamic:
            cmd += [f"--minShapes={self.input}:{lo}x{self.chw}", f"--optShapes={self.input}:{opt}x{self.chw}",
                    f"--maxShapes={self.input}:{hi}x{self.chw}"]
        self._trtexec(cmd, "engine build")
        return "trtexec"

    def _trtexec(self, cmd, what):
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=self.args.timeout)
        if p.returncode != 0:
            tail = " | ".join((p.stdout + p.stderr).strip().splitlines()[-5:])
            raise Failure("engine_build" if "build" in what else "run_failed", f"trtexec {what} failed: {tail}")

    def _run(self, batch, iterations, extra):
        shapes = [f"--shapes={self.input}:{batch}x{self.chw}"] if self.fixed_batch is None else []
        cmd = [self.trtexec, f"--loadEngine={self.engine}", f"--iterations={iterations}", "--warmUp=0",
               "--duration=0", "--avgRuns=1"] + shapes + extra
        self._trtexec(cmd, "run")

    def bench(self, batch, warmup, iterations):
        with tempfile.TemporaryDirectory() as d:
            times = os.path.join(d, "times.json")
            self._run(batch, warmup + iterations, [f"--exportTimes={times}"])
            with open(times) as f:
                return parse_trtexec_times(f.read())[warmup:warmup + iterations]  # it may run a few extra

    def __call__(self, x):
        with tempfile.TemporaryDirectory() as d:
            inp, out = os.path.join(d, "input.bin"), os.path.join(d, "output.json")
            x.astype("float32").tofile(inp)
            self._run(x.shape[0], 1, [f"--loadInputs={self.input}:{inp}", f"--exportOutput={out}"])
            with open(out) as f:
                import numpy as np
                return np.asarray(parse_trtexec_output(f.read()), dtype=np.float32).reshape(x.shape[0], -1)


def parse_trtexec_times(text):
    """trtexec --exportTimes: [{"startEnqMs": ..., "latencyMs": ...}, ...] (TensorRT sampleReporting.cpp)."""
    return [float(t["latencyMs"]) for t in json.loads(text)]


def parse_trtexec_output(text):
    """trtexec --exportOutput: [{"name": ..., "dimensions": "1x10", "values": [...]}, ...]; output 0."""
    return json.loads(text)[0]["values"]


def choose_runtime(args):
    model = args.model
    if model.endswith(".onnx"):
        if args.runtime in ("auto", "tensorrt") and tensorrt_version() and find_trtexec():
            return TensorRTRuntime(model, args)
        if args.runtime == "tensorrt":
            raise Failure("missing_runtime", "TensorRT was requested but is not installed here")
        try:
            return OrtRuntime(model, args.threads, qdq=args.precision == "int8")
        except ImportError:
            raise Failure("missing_runtime", "neither TensorRT nor onnxruntime can run the .onnx here",
                          "install onnxruntime (pip install onnxruntime) or TensorRT") from None
    if model.endswith(".pte"):
        try:
            return ExecuTorchRuntime(model, args.threads)
        except ImportError:
            raise Failure("missing_runtime", "the ExecuTorch Python runtime is not installed here",
                          "pip install executorch (it brings torch)") from None
    raise Failure("bad_artifact", f"cannot run {os.path.basename(model)}: expected a .onnx or a .pte")


def time_python(fn, x, warmup, iterations):
    for _ in range(warmup):
        fn(x)
    out = []
    for _ in range(iterations):
        t = time.perf_counter()
        fn(x)
        out.append((time.perf_counter() - t) * 1000)
    return out


def run_reference(rt, inputs, batch):
    """Outputs for every reference input, fed in batches of ``batch`` (the last one padded)."""
    import numpy as np
    outs = []
    for i in range(0, len(inputs), batch):
        chunk = inputs[i:i + batch]
        n = len(chunk)
        if n < batch:  # a fixed-batch program needs a full batch; padded rows are dropped
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
        outs.append(np.asarray(rt(np.ascontiguousarray(chunk, dtype=np.float32)))[:n])
    return np.concatenate(outs).astype(np.float32)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--reference", help="reference_io.npz: inputs, outputs (FP32), labels")
    ap.add_argument("--batch-sizes", default="1")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iterations", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "edgemix", "engines"))
    ap.add_argument("--runtime", choices=("auto", "tensorrt", "onnxruntime", "executorch"), default="auto")
    ap.add_argument("--input-name")
    ap.add_argument("--sample-shape", help="per-sample input shape, e.g. 3,224,224")
    ap.add_argument("--precision", default="int8")
    ap.add_argument("--workspace-mb", type=int, default=1024)
    ap.add_argument("--dynamic-batch", dest="dynamic", action="store_true", help="the ONNX batch dim is symbolic")
    ap.add_argument("--no-fp16", dest="fp16", action="store_false")
    ap.add_argument("--engine", help="load (or build) this engine file instead of one in --cache-dir")
    ap.add_argument("--rebuild-engine", action="store_true",
                    help="rebuild an engine whose provenance does not match this run instead of refusing it")
    ap.add_argument("--timeout", type=float, default=600, help="seconds for one trtexec call")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        import numpy as np
        rt = choose_runtime(args)
        wanted = [int(b) for b in args.batch_sizes.split(",")]
        warnings = []
        if rt.fixed_batch is not None and any(b != rt.fixed_batch for b in wanted):
            warnings.append(f"the model's batch is fixed at {rt.fixed_batch}; other batch sizes were skipped")
            wanted = [rt.fixed_batch]
        ref = None
        if args.reference:
            with np.load(args.reference) as z:
                ref = z["inputs"].astype(np.float32)
        batches = []
        for b in wanted:
            if hasattr(rt, "bench"):
                samples = rt.bench(b, args.warmup, args.iterations)
            else:
                x = ref[:1] if ref is not None else np.zeros([1] + list(rt.sample_shape), np.float32)
                x = np.ascontiguousarray(np.repeat(x, b, axis=0), dtype=np.float32)
                samples = time_python(rt, x, args.warmup, args.iterations)
            batches.append({"batch": b, "samples_ms": [round(s, 5) for s in samples]})
        # the largest batch the model takes: one trtexec launch (engine load) covers the reference set
        ref_out = run_reference(rt, ref, rt.fixed_batch or max(wanted)).tolist() if ref is not None else None
        result = {"runtime": rt.info, "threads": rt.threads, "device": device_facts(rt.threads),
                  "batches": batches, "reference_outputs": ref_out,
                  "prepare": getattr(rt, "prepare", {}), "warnings": warnings}
    except Failure as e:
        print(ERROR_MARK + json.dumps({"kind": e.kind, "message": e.message, "hint": e.hint}), flush=True)
        return 3
    except ImportError as e:
        print(ERROR_MARK + json.dumps({"kind": "missing_runtime", "message": str(e), "hint": None}), flush=True)
        return 3
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

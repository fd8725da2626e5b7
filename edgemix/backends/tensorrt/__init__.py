"""The Jetson / TensorRT backend: explicitly quantized (Q/DQ) ONNX, checked here, engine built on the GPU.

TensorRT engines are specific to a GPU and a TensorRT version, so the host produces and checks what
TensorRT consumes (the ONNX, the build settings) and builds the engine only where ``tensorrt``
imports next to a CUDA GPU; elsewhere it writes ``build_engine.sh``, the same build as a ``trtexec``
command that refuses a device whose TensorRT/JetPack differ from the target profile. Drift is
measured on this host by onnxruntime running the very ONNX file TensorRT will parse.

One concern a module: ``qdq`` (NNCF quantization and the TensorRT Q/DQ layout), ``export`` (ONNX
export, simplification, saving), ``rules`` (the TensorRT compatibility check), ``sensitivity``
(per-layer drift and the FP32 fallback), ``engine`` (the engine build and its device script),
``ort`` (the onnxruntime host proxy) and ``backend`` (the stages, registered as "tensorrt").
"""

from edgemix.backends.tensorrt.backend import TensorRTBackend, TensorRTOptions, qdq_settings
from edgemix.backends.tensorrt.engine import build_engine, engine_script, tensorrt_status, trtexec_command
from edgemix.backends.tensorrt.ort import OnnxRuntimePredictor, ort_session

__all__ = ["OnnxRuntimePredictor", "TensorRTBackend", "TensorRTOptions", "build_engine", "engine_script",
           "ort_session", "qdq_settings", "tensorrt_status", "trtexec_command"]

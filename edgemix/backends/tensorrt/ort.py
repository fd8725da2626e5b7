"""The host proxy for a TensorRT engine: the QDQ ONNX run by onnxruntime on the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _has_qdq(model) -> bool:
    import onnx

    from edgemix.backends.onnx_graph import op_counts

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


def host_proxy(precision: str) -> str:
    """How the host proxy runs an artifact of this precision, for the report."""
    from edgemix.resources import device_script

    text = "onnxruntime CPU, ORT_ENABLE_ALL, on the same ONNX"
    if device_script().uint8_proxy(qdq=precision == "int8"):
        text += ("; its int8 activation Q/DQ pairs given to onnxruntime as uint8 with zero point 128 (the same "
                 "integers and function; onnxruntime's x86 integer Conv/Add/Mul kernels take uint8 only)")
    if precision == "fp16":
        text += "; FP16 rounding is not simulated"
    return text


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

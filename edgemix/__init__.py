"""edgemix: an edge deployment compiler for MLP-Mixer vision models (and any image classifier).

The Python API (edgemix.api; imported on first use, so ``import edgemix`` stays light):

    edgemix.build(model, target="phone", ...)  -> BuildResult (paths, drift, latency, report)
    edgemix.evaluate(model, data)              -> EvalResult  (FP32 top-1, per class, logits)
    edgemix.gate(artifact, baseline)           -> GateResult  (passed, checks)
    edgemix.bench(artifact, target, ...)       -> BenchResult (on-device latency and drift)
"""

__version__ = "0.1.0"

_API = ("build", "evaluate", "gate", "bench", "BuildResult", "EvalResult", "GateResult", "Drift", "Latency")
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        from edgemix import api

        return getattr(api, name)
    raise AttributeError(f"module 'edgemix' has no attribute {name!r}")

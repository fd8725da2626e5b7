"""Running a written .pte on this host: the ExecuTorch runtime (XNNPACK delegate included), its
process-wide threadpool, and the per-operator ETDump profile."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgemix.errors import UsageError


# The ExecuTorch threadpool is one per process; XNNPACK delegates keep a pointer to it from the
# moment their method is loaded. Resetting it (the only thread control the Python runtime has)
# therefore invalidates every loaded method: each predictor remembers the generation it was
# loaded in and reloads itself when the pool has been replaced since.
_POOL = {"threads": None, "generation": 0}


def _use_threads(threads: int) -> None:
    from executorch.extension.pybindings import portable_lib

    if threads < 1:
        raise UsageError(f"threads must be >= 1, got {threads}")
    if portable_lib._threadpool_get_thread_count() != threads:
        portable_lib._unsafe_reset_threadpool(threads)
        _POOL["generation"] += 1
    _POOL["threads"] = threads


class ExecuTorchPredictor:
    """Runs a written .pte with the ExecuTorch runtime (the XNNPACK delegate included)."""

    def __init__(self, path: Path, batch_size: int, dynamic_batch: bool, threads: int):
        self.path, self.batch_size, self.dynamic_batch = Path(path), batch_size, dynamic_batch
        self.threads = threads
        self._load()

    def _load(self) -> None:
        from executorch.runtime import Runtime

        _use_threads(self.threads)
        program = Runtime.get().load_program(self.path)
        self._method = program.load_method("forward")
        self._generation = _POOL["generation"]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if x.ndim != 4 or (x.shape[0] != self.batch_size and not self.dynamic_batch):
            raise UsageError(f"{self.path.name} takes float32 (B, C, H, W) batches of {self.batch_size}, "
                             f"got shape {tuple(x.shape)}", hint="use edgemix.backends.base.batched_predict")
        if self._generation != _POOL["generation"] or _POOL["threads"] != self.threads:
            self._load()
        out = self._method.execute([torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))])
        return out[0].numpy().copy()


def profile_ops(pte: str | Path, x: np.ndarray, threads: int, runs: int = 30, warmup: int = 3) -> dict:
    """Where a .pte's time goes: ExecuTorch's ETDump of ``runs`` executions on ``x``, the median of
    each XNNPACK operator summed by kind ("Fully Connected (NC, QS8, QC8W) GEMM", "Convert (NC)", ...).

    Returns {"total_ms": median delegate + portable-kernel time of one execution, "ops": {kind:
    {"ms": summed medians, "count": operators of that kind}}}, kinds by descending time.
    """
    import re
    import statistics
    import tempfile

    from executorch.devtools import Inspector
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    _use_threads(threads)
    module = _load_for_executorch(str(pte), enable_etdump=True)
    inputs = [torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))]
    with tempfile.TemporaryDirectory(prefix="edgemix-etdump-") as tmp:
        for _ in range(warmup + runs):
            module.forward(inputs)
        dump = Path(tmp) / "run.etdp"
        module.write_etdump_result_to_file(str(dump))
        events = [ev for block in Inspector(etdump_path=str(dump)).event_blocks for ev in block.events
                  if ev.perf_data is not None]
    total, ops = 0.0, {}
    for ev in events:
        timed = ev.perf_data.raw[-runs:]  # one sample per execution; the warm-up ones dropped
        if ev.name == "Method::execute":
            total = statistics.median(timed)
        elif ev.name not in ("Program::load_method", "Method::init", "DELEGATE_CALL"):
            kind = re.sub(r" #\d+$", "", ev.name)
            row = ops.setdefault(kind, {"ms": 0.0, "count": 0})
            row["ms"] += statistics.median(timed)
            row["count"] += 1
    return {"total_ms": total, "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1]["ms"]))}

"""Which device does which part of a build.

The FP32 work of a build (the reference logits, calibration's forward passes, QAT) runs on CUDA when
torch sees a GPU and ``--device`` is ``auto`` or ``cuda``; everything that must run on the artifact
itself (verification, latency, the INT8-vs-FP32 comparison, the arm64 check) runs on the host CPU,
which is what the artifact's runtime (ExecuTorch, onnxruntime) uses here. The plan is recorded in
the report under ``devices``.
"""

from __future__ import annotations

ROLES = ("reference", "calibration", "qat")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def plan(requested: str = "auto", *, cuda: bool | None = None, cuda_name: str | None = None) -> dict:
    """The device of each role for ``requested`` (auto | cpu | cuda).

    ``cuda``/``cuda_name`` stand for what torch reports (given by tests; looked up when None).
    ``cuda`` asked for without a GPU is a usage error, not a silent fall back to the CPU.
    """
    from edgemix.errors import UsageError, unknown_choice

    if requested not in ("auto", "cpu", "cuda"):
        raise unknown_choice("device", requested, ["auto", "cpu", "cuda"])
    has_cuda = cuda_available() if cuda is None else cuda
    if requested == "cuda" and not has_cuda:
        raise UsageError("--device cuda was asked for but no CUDA device is visible to torch",
                         hint="use --device auto (CUDA when present, else the CPU) or --device cpu")
    dev = "cuda" if (requested == "cuda" or (requested == "auto" and has_cuda)) else "cpu"
    if dev == "cuda" and cuda_name is None:
        import torch

        cuda_name = torch.cuda.get_device_name()
    from edgemix.verify.report import cpu_model

    return {**{role: dev for role in ROLES}, "artifact": "cpu",
            "cuda_name": cuda_name if dev == "cuda" else None, "cpu_name": cpu_model()}


def to_device(t, device: str):
    """A tensor on ``device``; a no-op on the CPU."""
    return t if device == "cpu" else t.to(device, non_blocking=True)

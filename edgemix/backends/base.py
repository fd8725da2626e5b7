"""The Backend protocol: what every lowering backend declares and does.

A backend registers itself under a name (the ``backend`` field of a target profile) and declares
what it supports, so that a request it cannot honour fails before any work starts. The pipeline
hands it a :class:`BuildJob` (the FP32 model, calibration images, training data for QAT, a staging
folder) and gets back a :class:`BuiltArtifact`; verification then runs the *written* artifact
through :meth:`Backend.load_predictor`, never the eager model.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Protocol

import numpy as np
import torch

from pydantic import BaseModel, ValidationError

from edgemix.errors import UsageError, unknown_choice


@dataclass
class BuildJob:
    model: torch.nn.Module  # FP32 reference, eval mode, on CPU
    spec: object  # MixerSpec
    target: object  # TargetProfile
    precision: str  # "int8" | "fp32" | "fp16"
    recipe: object  # CalibRecipe
    calib_inputs: torch.Tensor  # model-ready float inputs (N, C, H, W) for calibration
    stage_dir: Path  # write every file here; the pipeline moves the folder into place
    basename: str  # file stem, e.g. "fmnist_phone_int8"
    qat_epochs: float = 0.0
    train_set: object | None = None  # ImageSet for QAT fine-tuning
    train_config: object | None = None  # edgemix.train.TrainConfig for QAT
    bundle_inputs: torch.Tensor | None = None  # reference inputs carried in the bundled program
    bundle_outputs: torch.Tensor | None = None  # the FP32 reference's outputs for them
    options: dict = field(default_factory=dict)  # backend-specific switches (e.g. keep-fp32 layers)
    device: str = "cpu"  # where calibration's FP32 forward and QAT run ("cpu" or "cuda"); the artifact is CPU
    stage: Callable[[str, str, float, int | None], None] = lambda *a: None  # one line per stage


@dataclass
class BuiltArtifact:
    files: dict[str, Path]  # role -> file, e.g. {"model": x.pte, "bundled": x.bpte}
    runtime: str  # the runtime that executes the artifact on this host, e.g. "executorch", "onnxruntime"
    batch_size: int  # the batch the artifact was exported with (inputs are padded to it)
    dynamic_batch: bool = False
    quantization: dict = field(default_factory=dict)  # scheme, observer, calibration images, QAT epochs ...
    details: dict = field(default_factory=dict)  # delegation report, compatibility check, engine status ...

    def to_entry(self) -> tuple[dict[str, Path], dict]:
        """(files to store by name, JSON-able metadata): what a cache entry needs to give this artifact
        back with :meth:`from_entry`. The model file keeps its name (an ONNX past 2 GiB refers to its
        ``<name>.data`` weight file by name), and that weight file comes along."""
        model = self.files["model"]
        stored = {model.name: model}
        if (model.parent / f"{model.name}.data").is_file():
            stored[f"{model.name}.data"] = model.parent / f"{model.name}.data"
        meta = {"files": {"model": model.name}, "runtime": self.runtime, "batch_size": self.batch_size,
                "dynamic_batch": self.dynamic_batch, "quantization": self.quantization, "details": self.details}
        return stored, meta

    @classmethod
    def from_entry(cls, folder: Path, meta: dict) -> "BuiltArtifact":
        """The artifact a cache entry (``folder`` holding :meth:`to_entry`'s files) stores; KeyError,
        TypeError or FileNotFoundError when the entry is not whole."""
        files = {role: Path(folder) / name for role, name in meta["files"].items()}
        missing = [p for p in files.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(str(missing[0]))
        return cls(files=files, runtime=meta["runtime"], batch_size=meta["batch_size"],
                   dynamic_batch=meta["dynamic_batch"], quantization=meta["quantization"], details=meta["details"])


class Predictor(Protocol):
    batch_size: int
    dynamic_batch: bool

    def __call__(self, x: np.ndarray) -> np.ndarray: ...


class Backend:
    name: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]]
    supports_qat: ClassVar[bool]
    supports_dynamic_batch: ClassVar[bool]
    supports_fallback: ClassVar[bool] = False  # per-layer FP32 fallback to meet a drift budget
    artifact_suffix: ClassVar[str]
    options_model: ClassVar[type[BaseModel]]  # the typed --backend-option KEY=VALUE switches

    def parse_options(self, options: dict) -> BaseModel:
        """``--backend-option`` strings or typed values -> this backend's options model; an unknown
        key names the closest one, a bad value says what the option takes."""
        fields = self.options_model.model_fields
        for key in options:
            if key not in fields:
                raise unknown_choice(f"{self.name} backend option", key, fields)
        try:
            return self.options_model.model_validate(options)
        except ValidationError as e:
            err = e.errors()[0]
            key = ".".join(map(str, err["loc"])) or "?"
            raise UsageError(f"{self.name} backend option {key}={options.get(key)!r}: {err['msg']}",
                             hint=f"{key}: {fields[key].description}" if key in fields else None) from None

    def check_request(self, target, precision: str, qat_epochs: float) -> None:
        """Reject what this backend cannot do, before any work starts."""
        if precision not in self.precisions:
            raise unknown_choice(f"precision for backend {self.name}", precision, self.precisions,
                                 plural=f"precisions for backend {self.name}")
        if precision not in target.precisions:
            raise UsageError(f"target {target.name} does not support precision '{precision}'; "
                             f"it supports: {', '.join(target.precisions)}")
        if qat_epochs and precision != "int8":
            raise UsageError(f"--qat-epochs {qat_epochs} needs --precision int8 (quantization-aware training "
                             f"only makes sense for a quantized build), got --precision {precision}")
        if qat_epochs and not self.supports_qat:
            raise UsageError(f"backend {self.name} does not support quantization-aware training")
        if len(set(target.batch_sizes)) > 1 and not self.supports_dynamic_batch:
            raise UsageError(f"backend {self.name} cannot build for several batch sizes {target.batch_sizes}")

    def build(self, job: BuildJob) -> BuiltArtifact:
        raise NotImplementedError

    def isa_profiles(self, target) -> list[str]:
        """CPU profiles of another instruction set the artifact is also verified on (none by default)."""
        return []

    def check_isa_toolchain(self) -> None:
        """Fail (exit 3) before any work when what :meth:`isa_drift` needs is missing."""

    def prepare_isa(self, target) -> None:
        """Build or fetch what :meth:`isa_drift` runs with (nothing by default). The build calls it
        in the background while the artifact is quantized and lowered, so it must be safe to call
        from another thread and again from :meth:`isa_drift`."""

    def isa_drift(self, artifact: BuiltArtifact, target, x: np.ndarray, ref: np.ndarray,
                  labels: np.ndarray) -> list[dict]:
        """One row per instruction set / CPU profile: drift of the written artifact there."""
        raise NotImplementedError

    def fallback(self, job: BuildJob, artifact: BuiltArtifact, x: np.ndarray,
                 evaluate: Callable[[Predictor], dict], threads: int) -> tuple[BuiltArtifact, dict]:
        """Keep the most drift-sensitive layers in FP32 until the target's budget is met; returns the
        rebuilt artifact and the plan. Only for backends with ``supports_fallback``."""
        raise UsageError(f"backend {self.name} has no per-layer FP32 fallback")

    def load_predictor(self, artifact: BuiltArtifact, threads: int) -> Predictor:
        raise NotImplementedError


_BACKENDS: dict[str, type[Backend]] = {}
_MODULES = {"executorch": "edgemix.backends.executorch", "tensorrt": "edgemix.backends.tensorrt"}


def register(cls: type[Backend]) -> type[Backend]:
    _BACKENDS[cls.name] = cls
    return cls


def get_backend(name: str) -> Backend:
    if name not in _BACKENDS and name in _MODULES:
        importlib.import_module(_MODULES[name])  # the module registers itself on import
    if name not in _BACKENDS:
        raise unknown_choice("backend", name, _MODULES)
    return _BACKENDS[name]()


def batched_predict(predictor: Predictor, x: np.ndarray) -> np.ndarray:
    """Run any number of inputs through a fixed-batch artifact, padding the last batch."""
    b = predictor.batch_size
    if predictor.dynamic_batch:
        return np.concatenate([predictor(x[i:i + b]) for i in range(0, len(x), b)])
    from edgemix.batching import pad_to_batch

    outs = []
    for i in range(0, len(x), b):
        chunk = x[i:i + b]
        outs.append(predictor(np.ascontiguousarray(pad_to_batch(chunk, b)))[:len(chunk)])
    return np.concatenate(outs)

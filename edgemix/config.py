"""Validated configuration: device profiles (resources/targets/*.toml, and folders of the user's own
named by $EDGEMIX_TARGETS_PATH), calibration recipes (resources/calib/*.toml)
and the resolved build config. Validation lives here; a bad file is a clear error, not a traceback."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgemix import resources
from edgemix.errors import UsageError, unknown_choice

TARGETS_DIR = resources.path("targets")
CALIB_DIR = resources.path("calib")
ALIASES = {"jetson": "jetson-orin-nano", "phone": "android-arm64", "host": "host-cpu"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DriftBudget(_Strict):
    max_top1_drop: float = Field(1.0, ge=0, description="largest allowed top-1 drop, in points")
    min_agreement: float = Field(0.97, ge=0, le=1, description="smallest allowed top-1 agreement with FP32")
    min_cosine: float = Field(0.98, ge=-1, le=1, description="smallest allowed mean logit cosine")
    max_latency_ratio: float = Field(1.15, gt=0, description="largest allowed p50 latency / baseline p50")
    int8_must_be_faster: bool = True


class RunnerDefaults(_Strict):
    kind: Literal["ssh", "adb", "local"]
    warmup: int = Field(10, ge=0)
    iterations: int = Field(50, ge=1)
    timeout_s: float = Field(300, gt=0)
    remote_dir: str = "/tmp/edgemix"


class TensorRTSettings(_Strict):
    version: str = Field(description="TensorRT version on the device, e.g. '10.3'")
    jetpack: str | None = None
    opset: int = Field(17, ge=13)
    workspace_mb: int = Field(1024, ge=64)
    fp16_fallback: bool = True
    gpu: str | None = None

    @model_validator(mode="after")
    def _consistent(self):
        major = int(self.version.split(".")[0]) if self.version.split(".")[0].isdigit() else -1
        if major < 8:
            raise ValueError(f"tensorrt.version '{self.version}' is not a TensorRT version edgemix supports "
                             "(explicit INT8 Q/DQ needs TensorRT 8 or newer)")
        # per-channel Q/DQ on Gemm/MatMul weights and opset 13+ arrived in TensorRT 8.x; opset 19+ needs 10
        if self.opset > 18 and major < 10:
            raise ValueError(f"opset {self.opset} needs TensorRT 10; this profile says {self.version}")
        return self


class ExecuTorchSettings(_Strict):
    # arm64 CPU profiles to verify drift on under emulation (qemu -cpu names)
    isa_profiles: list[str] = Field(default_factory=list)
    isa_eval_images: int = Field(64, ge=1)
    # emulated work per CPU profile, in GMACs: caps the images for big models (qemu runs S/16 INT8 at
    # ~2.4 s per image on the 2-core host; 8 GMACs = 2 S/16 images, all 64 of fmnist's)
    isa_eval_gmacs: float = Field(8.0, gt=0)


class TargetProfile(_Strict):
    name: str
    description: str = ""
    backend: Literal["executorch", "tensorrt"]
    precisions: list[Literal["int8", "fp32", "fp16"]]
    default_precision: Literal["int8", "fp32", "fp16"] = "int8"
    batch_sizes: list[int] = Field(default_factory=lambda: [1])
    threads: int = Field(2, ge=1)
    budget: DriftBudget = DriftBudget()
    runner: RunnerDefaults
    tensorrt: TensorRTSettings | None = None
    executorch: ExecuTorchSettings = ExecuTorchSettings()

    @model_validator(mode="after")
    def _consistent(self):
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch_sizes must be positive integers, got {self.batch_sizes}")
        if self.default_precision not in self.precisions:
            raise ValueError(f"default_precision '{self.default_precision}' is not in precisions {self.precisions}")
        if self.backend == "tensorrt" and self.tensorrt is None:
            raise ValueError("a tensorrt target needs a [tensorrt] table (version, opset, workspace_mb)")
        return self

    @property
    def export_batch(self) -> int:
        return self.batch_sizes[0]

    @property
    def batch_range(self) -> tuple[int, int, int]:
        """(min, opt, max) for TensorRT profiles / dynamic shapes."""
        return min(self.batch_sizes), self.batch_sizes[0], max(self.batch_sizes)


class CalibRecipe(_Strict):
    name: str
    description: str = ""
    data: str = "sample"
    split: Literal["train", "test"] = "train"
    images: int = Field(128, ge=1)
    seed: int = 0
    batch_size: int = Field(32, ge=1)
    observer: Literal["minmax", "moving_average_minmax", "histogram", "percentile"] = "minmax"
    percentile: float = Field(99.99, gt=50, le=100)


def _format_validation(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(file)"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def build_config(**fields) -> "BuildConfig":
    """BuildConfig from command-line values; an out-of-range value is a usage error naming the option."""
    try:
        return BuildConfig(**fields)
    except ValidationError as e:
        from edgemix.errors import closest

        bad, near = [], []
        for err in e.errors():
            bad.append(f"--{'-'.join(str(x) for x in err['loc']).replace('_', '-')} {err.get('input')!r}: {err['msg']}")
            expected = (err.get("ctx") or {}).get("expected")  # a literal's choices: "'auto', 'cpu' or 'cuda'"
            if err["type"] == "literal_error" and expected and isinstance(err.get("input"), str):
                match = closest(err["input"], [c.strip(" '") for c in expected.replace(" or ", ",").split(",")])
                if match:
                    near.append(f"did you mean '{match}'?")
        raise UsageError(f"invalid build option(s): {'; '.join(bad)}",
                         hint=" ".join(near) or "see edgemix build --help for each option's meaning") from None


def _read_toml(path: Path, what: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{what} {path} is not valid TOML: {e}") from None
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror}") from None


def _load_model(cls, path: Path, what: str):
    data = _read_toml(path, what)
    data.setdefault("name", path.stem)
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise UsageError(f"{what} {path} is invalid: {_format_validation(e)}",
                         hint=f"see the other files in {path.parent} for the expected fields") from None


# Folders of the user's own profiles and recipes, searched before the shipped ones (a file there with
# a shipped name replaces it): os.pathsep-separated, like PATH.
TARGETS_ENV = "EDGEMIX_TARGETS_PATH"
CALIB_ENV = "EDGEMIX_CALIB_PATH"


def _search_path(env: str, shipped: Path) -> list[Path]:
    own = [Path(p).expanduser() for p in os.environ.get(env, "").split(os.pathsep) if p.strip()]
    for folder in own:
        if not folder.is_dir():
            raise UsageError(f"${env} names {folder}, which is not a folder",
                             hint=f"set {env} to folders of .toml files, separated by '{os.pathsep}'")
    return [*own, shipped]


def _files(folders: list[Path]) -> dict[str, Path]:
    """name -> file, the first folder that has a name winning."""
    found: dict[str, Path] = {}
    for folder in folders:
        for p in sorted(folder.glob("*.toml")):
            found.setdefault(p.stem, p)
    return found


def load_targets(folders: list[Path] | None = None) -> dict[str, TargetProfile]:
    files = _files(folders or _search_path(TARGETS_ENV, TARGETS_DIR))
    return {name: _load_model(TargetProfile, p, "target profile") for name, p in sorted(files.items())}


def _resolve(cls, name: str, folders: list[Path], what: str, kind: str, aliases: dict[str, str]):
    """A file by name (or alias) in ``folders``, or a path to a .toml of the user's own."""
    if name.endswith(".toml") or "/" in name:
        path = Path(name)
        if not path.is_file():
            raise UsageError(f"{what} file '{name}' does not exist")
        return _load_model(cls, path, what)
    files = _files(folders)
    path = files.get(name) or files.get(aliases.get(name, name))
    if path is None:
        raise unknown_choice(kind, name, list(files) + list(aliases))
    return _load_model(cls, path, what)


def resolve_target(name: str, folders: list[Path] | None = None) -> TargetProfile:
    return _resolve(TargetProfile, name, folders or _search_path(TARGETS_ENV, TARGETS_DIR), "target profile",
                    "target", ALIASES)


def resolve_recipe(name: str, folders: list[Path] | None = None) -> CalibRecipe:
    return _resolve(CalibRecipe, name, folders or _search_path(CALIB_ENV, CALIB_DIR), "calibration recipe",
                    "calibration recipe", {})


class BuildConfig(_Strict):
    """Every input of one build, defaults made explicit; written as config.resolved.toml."""

    model: str
    target: str
    precision: str
    weights: str | None = None
    random_weights: bool = False
    image_size: int | None = None
    num_classes: int | None = None
    reset_head: bool = False
    calib: str = "default"
    qat_epochs: float = Field(0.0, ge=0)
    train_data: str = "sample"
    qat_lr: float = Field(3e-5, gt=0)  # docs/qat.md: 3e-5 beat 1e-4 on both paths, and 1e-5 on jetson
    qat_distill: float = Field(1.0, ge=0, le=1)  # QAT loss: 1 = distill the FP32 logits, 0 = labels only
    qat_loss: Literal["kl", "mse"] = "mse"  # the distillation term: MSE on the logits, or KL on soft targets
    qat_keep: Literal["better", "qat"] = "better"  # keep PTQ when it agrees better with FP32
    qat_batch_size: int = Field(64, ge=1)
    eval_data: str = "sample"
    eval_split: Literal["train", "test"] = "test"
    eval_limit: int | None = Field(None, ge=1)
    bundle_images: int = Field(8, ge=1)
    latency_warmup: int = Field(5, ge=0)
    latency_runs: int = Field(30, ge=3)
    latency_seconds: float = Field(2.0, ge=0)  # keep timing rounds past latency_runs until this much time
    threads: int | None = Field(None, ge=1)
    compare_fp32: bool = True
    isa_check: bool | None = None  # None: on for targets with arm64 CPU profiles (phones), off elsewhere
    fallback: bool = False
    cache: bool = True  # reuse the FP32 reference logits and FP32 comparison artifact (edgemix.cache)
    out: str
    force: bool = False
    # where the FP32 work runs (the reference, calibration's forward, QAT); the artifact is always
    # verified and timed on the host CPU. auto: CUDA when torch sees it (edgemix.devices)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    backend_options: dict = Field(default_factory=dict)


def write_resolved_toml(path: Path, cfg: BuildConfig, target: TargetProfile, recipe: CalibRecipe) -> None:
    import tomli_w

    def clean(d):  # TOML has no null: leave unset values out, say so in a comment
        return {k: clean(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}

    doc = {"build": clean(cfg.model_dump(mode="json")), "target": clean(target.model_dump(mode="json")),
           "calibration": clean(recipe.model_dump(mode="json"))}
    text = ("# Every input of this build with its defaults made explicit (unset options are omitted).\n"
            + tomli_w.dumps(doc))
    from edgemix.fileutil import write_text_atomic

    write_text_atomic(path, text)

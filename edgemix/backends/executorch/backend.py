"""The ExecuTorch backend: torch.export -> PT2E INT8 (PTQ or QAT) -> XNNPACK delegate -> .pte and
BundledProgram."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from edgemix.backends.base import Backend, BuildJob, BuiltArtifact, register
from edgemix.backends.executorch.delegation import _partitioner_reasons, delegation_report
from edgemix.backends.executorch.passes import XnnpackLayerNorm, drop_provenance, export_view
from edgemix.backends.executorch.passes.pattern_guard import skip_unmatchable_patterns
from edgemix.backends.executorch.runtime import ExecuTorchPredictor
from edgemix.errors import ToolchainError, UsageError
from edgemix.train import loss_name, qat_config


class ExecuTorchOptions(BaseModel):
    """``--backend-option`` switches of this backend (pydantic's booleans: true/false, 1/0, yes/no, on/off)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    decompose_layernorm: bool = Field(True, description="write LayerNorm with ops XNNPACK delegates, so the "
                                      "Mixer is one delegate (false keeps ATen's native_layer_norm on the "
                                      "portable CPU kernel)")
    patch_linear: bool = Field(True, description="write the patch-embedding Conv as patchify + Linear")
    family_float: bool = Field(True, description="leave in float what a family's export form marks as slower in "
                               "INT8 (ConvMixer: the depthwise branches and per-channel affines); false "
                               "quantizes every op XNNPACK can")
    activations: Optional[Literal["static", "dynamic"]] = Field(
        None, description="static: calibrated per-tensor INT8 activations, every op INT8 where XNNPACK "
        "can; dynamic: each GEMM quantizes its input rows at run time from their own ranges (no "
        "calibration, float outputs, other ops in float): closer to FP32, a little slower on a Mixer; with "
        "--qat-epochs, QAT simulates that run-time rounding. Default: the family's choice (static; "
        "ConvMixer: dynamic), static for QAT")


def activations_for(requested: str | None, family: str, qat: bool) -> str:
    """The INT8 activations a phone build uses: those asked for (``--backend-option activations=``),
    else the family's choice (its export form's ``activations``), else static. Without a request QAT
    trains calibrated static activations, the path measured for every family; asked for, dynamic
    activations get their own QAT (:func:`quantizer.qat_dynamic`)."""
    if requested is not None:
        return requested
    return "static" if qat else family


@register
class ExecuTorchBackend(Backend):
    name = "executorch"
    precisions = ("int8", "fp32")
    supports_qat = True
    supports_dynamic_batch = False  # fixed batch: the XNNPACK plan is built once for one shape
    artifact_suffix = ".pte"
    options_model = ExecuTorchOptions

    def build(self, job: BuildJob) -> BuiltArtifact:
        self.check_request(job.target, job.precision, job.qat_epochs)
        try:
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
            from executorch.exir import to_edge_transform_and_lower

            from edgemix.backends.executorch import quantizer as pt2e
        except ImportError as e:
            raise ToolchainError(f"the ExecuTorch toolchain cannot be imported ({e})",
                                 hint="pip install executorch==1.5.1 torchao==0.18.0") from None
        opts = self.parse_options(job.options)
        batch = job.target.export_batch
        bundle_x, bundle_y = _bundle_data(job, batch)  # bad bundle data fails before any work
        decompose = opts.decompose_layernorm
        model, rewrite = export_view(job.model, decompose, opts.patch_linear)
        # module types the INT8 quantizer leaves in float: LayerNorm's statistics, and what a family's
        # export form declares (e.g. ConvMixer's depthwise branches, slower in INT8 on XNNPACK)
        family_float = tuple(getattr(model, "float_types", ())) if opts.family_float else ()
        float_modules = ((XnnpackLayerNorm,) if decompose else ()) + family_float
        if family_float and job.precision == "int8":
            rewrite += f"; left in float by the INT8 quantizer: {', '.join(t.__name__ for t in family_float)}"
        dynamic = activations_for(opts.activations, getattr(model, "activations", "static"), job.qat_epochs > 0) == "dynamic"
        if dynamic and opts.activations is None and job.precision == "int8":
            rewrite += "; activations: dynamic, the family's default (--backend-option activations=static for calibrated)"
        example = _example_input(job, batch)

        t0 = time.perf_counter()  # exported before QAT too: a model that cannot export fails in seconds
        exported = pt2e.export_model(model, example)
        n_ops = sum(1 for n in exported.graph.nodes if n.op == "call_function")
        job.stage("export", f"torch.export graph: {n_ops} ops, batch {batch}", time.perf_counter() - t0, None)

        quant = {"scheme": "none", "observer": None, "calibration_images": 0, "qat_epochs": 0.0}
        float_ops: dict[str, int] = {}
        if job.precision == "int8":
            t0 = time.perf_counter()
            if dynamic and job.qat_epochs > 0:
                converted = pt2e.qat_dynamic(model, exported, job.spec, job.train_set, job.qat_epochs,
                                             job.train_config, example, float_modules, device=job.device)
                quant.update(observer="none: each GEMM input row's range, at run time, simulated in QAT",
                             **_qat_quantization(job))
                produced = (f"QAT {job.qat_epochs:g} epochs on {len(job.train_set)} images for dynamic per-row "
                            "activations")
                stage_name = "qat"
            elif dynamic:
                converted = pt2e.dynamic(exported, example, float_modules)
                quant.update(observer="none: each GEMM input row's range, at run time")
                produced = "INT8 GEMMs with dynamic per-row activations, no calibration"
                stage_name = "quantize"
            elif job.qat_epochs > 0:
                converted = pt2e.qat(model, job.spec, job.train_set, job.qat_epochs, job.train_config,
                                     job.calib_inputs, job.recipe.observer, job.recipe.percentile, float_modules,
                                     device=job.device, calib_batch=job.recipe.batch_size)
                quant.update(observer=f"{job.recipe.observer} (calibrated, then frozen for QAT)",
                             calibration_images=len(job.calib_inputs), **_qat_quantization(job))
                produced = f"QAT {job.qat_epochs:g} epochs on {len(job.train_set)} images"
                stage_name = "qat"
            else:
                # calibrate in the recipe's batches, not the artifact's (a phone's is 1): a graph with
                # a symbolic batch for calibration, re-exported at the artifact's batch below. (Not
                # faster for S/16 on 2 cores: eager runs ~60 ms per image at batch 1 and at 32.)
                calib_batch = max(1, min(job.recipe.batch_size, len(job.calib_inputs)))
                observed = exported if calib_batch == batch else pt2e.export_model(
                    model, job.calib_inputs[:calib_batch].float(), dynamic_batch=True, max_batch=max(calib_batch, 2))
                converted = pt2e.ptq(observed, job.calib_inputs, calib_batch, job.recipe.observer,
                                     job.recipe.percentile, float_modules, device=job.device)
                quant.update(observer=job.recipe.observer, calibration_images=len(job.calib_inputs))
                if job.recipe.observer == "percentile":
                    quant["percentile"] = job.recipe.percentile
                produced = f"INT8 Q/DQ graph, {len(job.calib_inputs)} images, {job.recipe.observer} observers"
                stage_name = "calibrate"
            quant["scheme"] = pt2e.DYNAMIC_SCHEME if dynamic else pt2e.SCHEME
            float_ops = pt2e.float_ops(converted, dynamic=dynamic)
            with torch.no_grad():  # the quantized graph again at the artifact's fixed batch
                exported = torch.export.export(converted, (example,))
            job.stage(stage_name, produced, time.perf_counter() - t0, None)

        t0 = time.perf_counter()
        drop_provenance(exported)
        with _partitioner_reasons() as reasons, skip_unmatchable_patterns():
            try:
                edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
            except RuntimeError as e:
                if not (dynamic and job.precision == "int8"):
                    raise
                # ExecuTorch 1.5.1's XNNPACK backend rejects some dynamic graphs it partitioned, e.g.
                # where its layout pass puts a copy between a GEMM input's dequantize and the GEMM
                # ("Weight and Input should both be quantized"; CycleMLP's export form avoids it)
                raise UsageError(f"{job.spec.name} cannot be lowered with dynamic INT8 activations: ExecuTorch's "
                                 f"XNNPACK backend refused its program ({e})",
                                 hint="use --backend-option activations=static (calibrated activations)") from None
        report = delegation_report(edge.exported_program().graph_module, reasons)
        gemms = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in job.model.modules())
        report["model_linear_conv"] = gemms
        report["all_linear_conv_delegated"] = (report["gemm_not_delegated"] == 0
                                               and report["gemm_delegated"] >= gemms)
        program = edge.to_executorch()
        job.stage("lower", f"{report['delegated_ops']} ops in {report['partitions']} XNNPACK partition(s), "
                  f"{report['outside_ops']} outside", time.perf_counter() - t0, len(program.buffer))

        t0 = time.perf_counter()
        pte = job.stage_dir / f"{job.basename}.pte"
        bpte = job.stage_dir / f"{job.basename}.bpte"
        cases = _write_artifacts(program, pte, bpte, bundle_x, bundle_y, batch)
        job.stage("write", f"{pte.name} + {bpte.name} ({cases} test cases)", time.perf_counter() - t0,
                  pte.stat().st_size)
        return BuiltArtifact(
            files={"model": pte, "bundled": bpte}, runtime="executorch", batch_size=batch, dynamic_batch=False,
            quantization=quant,
            details={"delegation": report, "export_rewrite": rewrite, "float_ops": float_ops,
                     "bundle_test_cases": cases,
                     "runtime_threads": "process-wide ExecuTorch threadpool (_unsafe_reset_threadpool); "
                                        "loaded methods are reloaded after a change"})

    def isa_profiles(self, target) -> list[str]:
        return list(target.executorch.isa_profiles)

    def check_isa_toolchain(self) -> None:
        from edgemix.backends.executorch import native

        for arch in {native.host_arch(), "aarch64"}:
            native.check_toolchain(arch)  # a missing cross compiler or qemu fails before any work

    def prepare_isa(self, target) -> None:
        """The host and arm64 runners (a C++ compile each when not cached) and each profile's
        emulator self-test: subprocesses, so they run on the core the single-threaded lowering
        leaves idle."""
        from edgemix.backends.executorch import native

        native.build_runner(native.host_arch())
        native.build_runner("aarch64")
        for cpu in self.isa_profiles(target):
            native.selftest("aarch64", cpu)

    def isa_drift(self, artifact: BuiltArtifact, target, x, ref, labels) -> list[dict]:
        """The written .pte on the phone's instruction set: the native runner on arm64 kernels under
        qemu, one run per CPU profile of the target, plus the same runner natively on this host.
        Profiles whose emulated matrix instructions fail the runner's self-test are reported as
        untrusted (their figures measure the emulator), and the gate ignores them."""
        import numpy as np

        from edgemix.backends.executorch import native
        from edgemix.verify.drift import drift_metrics

        pte = artifact.files["model"]
        host_out, host_run = native.run_pte(pte, x, arch=native.host_arch())
        runs = {(native.host_arch(), None): (host_out, host_run, True, "native run: nothing is emulated")}
        for cpu, pr in native.run_profiles(pte, x, self.isa_profiles(target)).items():
            runs[("aarch64", cpu)] = (pr.outputs, pr.run, pr.trust.trusted, pr.trust.reason)
        rows = []
        for (arch, cpu), (out, run, trusted, reason) in runs.items():
            d = drift_metrics(ref, out, labels)
            rows.append({"arch": arch, "cpu": cpu or "native", "emulated": run.emulated, "trusted": trusted,
                         "reason": reason, "samples": len(x), "agreement": d["agreement"],
                         "top1_delta": d["top1_delta"], "cosine_mean": d["cosine_mean"], "sqnr_db": d["sqnr_db"],
                         "max_abs_vs_host": float(np.abs(out - host_out).max()),
                         "ms_per_image": run.median_ms_per_image, "cpu_features": run.cpu_features})
        return rows

    def load_predictor(self, artifact: BuiltArtifact, threads: int) -> ExecuTorchPredictor:
        path = artifact.files.get("model")
        if path is None or not Path(path).is_file():
            raise UsageError(f"ExecuTorch program {path} does not exist", hint="build it first")
        return ExecuTorchPredictor(Path(path), artifact.batch_size, artifact.dynamic_batch, threads)


def _qat_quantization(job: BuildJob) -> dict:
    """The report's QAT fields, the same for static and dynamic activations (after QAT ran: it
    refuses a missing training set first)."""
    return {"qat_epochs": float(job.qat_epochs), "qat_loss": loss_name(job.train_config or qat_config(job.qat_epochs)),
            "qat_train_images": len(job.train_set)}


def _example_input(job: BuildJob, batch: int) -> torch.Tensor:
    spec = job.spec
    if job.calib_inputs is not None and len(job.calib_inputs) >= batch:
        return job.calib_inputs[:batch].float().contiguous()
    return torch.zeros(batch, spec.in_chans, spec.img_size, spec.img_size)


def _bundle_data(job: BuildJob, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference inputs and FP32 outputs for the BundledProgram; the FP32 model fills in missing outputs."""
    spec = job.spec
    x = job.bundle_inputs if job.bundle_inputs is not None else _example_input(job, batch)
    shape = (spec.in_chans, spec.img_size, spec.img_size)
    if x.ndim != 4 or tuple(x.shape[1:]) != shape or len(x) == 0:
        raise UsageError(f"bundle inputs must be (N, {', '.join(map(str, shape))}) for {spec.name}, "
                         f"got {tuple(x.shape)}")
    y = job.bundle_outputs
    if y is None:
        with torch.no_grad():
            y = torch.cat([job.model(x[i:i + 64].float()) for i in range(0, len(x), 64)])
    if tuple(y.shape) != (len(x), spec.num_classes):
        raise UsageError(f"bundle outputs must be ({len(x)}, {spec.num_classes}) to match the inputs, "
                         f"got {tuple(y.shape)}")
    return x.float().contiguous(), y.float().contiguous()


def _write_artifacts(program, pte: Path, bpte: Path, x: torch.Tensor, y: torch.Tensor, batch: int) -> int:
    """Write the .pte and the .bpte under temporary names, then rename both; on any failure remove
    what was written, so the stage folder never holds a half-written or orphaned artifact."""
    from executorch.devtools import BundledProgram
    from executorch.devtools.bundled_program import serialize
    from executorch.devtools.bundled_program.config import MethodTestCase, MethodTestSuite

    from edgemix.batching import pad_to_batch

    cases = []
    for i in range(0, len(x), batch):  # the program takes whole batches
        xb, yb = pad_to_batch(x[i:i + batch], batch), pad_to_batch(y[i:i + batch], batch)
        cases.append(MethodTestCase(inputs=[xb.contiguous()], expected_outputs=[yb.contiguous()]))
    finals = (pte, bpte)
    tmps = [p.with_name(f".{p.name}.tmp") for p in finals]
    placed: list[Path] = []
    try:
        with open(tmps[0], "wb") as f:
            program.write_to_file(f)
        bundled = BundledProgram(program, [MethodTestSuite(method_name="forward", test_cases=cases)])
        tmps[1].write_bytes(serialize.serialize_from_bundled_program_to_flatbuffer(bundled))
        for tmp, final in zip(tmps, finals):
            tmp.replace(final)
            placed.append(final)
    except BaseException:
        for path in placed:  # a .pte without its .bpte would look like a finished build
            path.unlink(missing_ok=True)
        raise
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
    return len(cases)

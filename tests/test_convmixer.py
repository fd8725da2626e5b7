"""ConvMixer: the paper's variants, the authors' (locuslab) and timm's checkpoint layouts, the export
form, and `edgemix eval` giving the authors' logits for the authors' file."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import assert_clean_error, run_cli
from edgemix.errors import CheckpointError
from edgemix.models import VARIANTS, build_model, count_params
from edgemix.models.checkpoints import load_weights


@pytest.mark.parametrize("alias,params_m", [("convmixer-1536-20", 51.6), ("convmixer-768-32", 21.1),
                                            ("convmixer-1024-20", 24.4)])
def test_paper_variants_parameter_counts(alias, params_m):
    with torch.device("meta"):
        model = build_model(VARIANTS[alias])
    assert abs(count_params(model) / 1e6 - params_m) < 0.05  # the paper's figures, rounded to 0.1M


def _trained_like(spec) -> nn.Module:
    """Random weights and BatchNorm statistics that are not the identity, so a missed or misplaced
    key changes the outputs."""
    torch.manual_seed(0)
    model = build_model(spec)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.1)
                m.bias.normal_(0, 0.1)
    return model.eval()


def locuslab_convmixer(dim, depth, kernel_size, patch_size, n_classes, in_chans=1):
    """The authors' flat nn.Sequential, as their README defines it (padding k // 2 is their "same")."""
    class Residual(nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, x):
            return self.fn(x) + x

    return nn.Sequential(
        nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size), nn.GELU(), nn.BatchNorm2d(dim),
        *[nn.Sequential(Residual(nn.Sequential(nn.Conv2d(dim, dim, kernel_size, groups=dim, padding=kernel_size // 2),
                                               nn.GELU(), nn.BatchNorm2d(dim))),
                        nn.Conv2d(dim, dim, kernel_size=1), nn.GELU(), nn.BatchNorm2d(dim)) for _ in range(depth)],
        nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(dim, n_classes)).eval()


def _authors_file(tmp_path):
    spec = VARIANTS["convmixer-fmnist"]
    ours = _trained_like(spec)
    ref = locuslab_convmixer(spec.dim, spec.depth, spec.kernel_size, spec.patch_size, spec.num_classes)
    # our keys -> the flat numbering; loading it into the authors' module proves the mapping is theirs
    flat = {}
    for k, v in ours.state_dict().items():
        if k.startswith("stem."):
            flat[k.removeprefix("stem.")] = v
        elif k.startswith("blocks."):
            i, rest = k.removeprefix("blocks.").split(".", 1)
            flat[f"{int(i) + 3}.{rest}"] = v
        else:
            flat[f"{spec.depth + 5}.{k.removeprefix('head.')}"] = v
    ref.load_state_dict(flat)
    path = tmp_path / "convmixer_locuslab.pth"
    torch.save(flat, path)
    return spec, ref, path


def test_locuslab_and_timm_layouts_load_and_match_the_authors_module(tmp_path):
    spec, ref, path = _authors_file(tmp_path)
    x = torch.randn(4, 1, 28, 28)
    model = build_model(spec).eval()
    assert load_weights(model, path)["format"] == "state-dict"
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-5)  # fp32 vs fp32, same ops
    timm_file = tmp_path / "timm.pth"
    torch.save({"state_dict": model.state_dict()}, timm_file)  # timm's key names are edgemix's
    again = build_model(spec).eval()
    load_weights(again, timm_file)
    with torch.no_grad():
        torch.testing.assert_close(again(x), ref(x), rtol=0, atol=1e-5)


def test_eval_gives_the_authors_logits_for_the_authors_file(tmp_path):
    from edgemix.data import load_dataset, stratified_indices, to_model_input

    spec, ref, path = _authors_file(tmp_path)
    out = tmp_path / "logits.npz"
    p = run_cli("eval", "--model", "convmixer-fmnist", "--weights", path, "--data", "sample", "--limit", "40",
                "--save-logits", out)
    assert p.returncode == 0, p.stderr
    ds = load_dataset("sample", "test")
    ds = ds.subset(stratified_indices(ds.labels, 40, 0))
    with torch.no_grad():
        expected = ref(to_model_input(ds.images, spec)).numpy()
    np.testing.assert_allclose(np.load(out)["logits"], expected, rtol=0, atol=1e-4)  # fp32, batch order may differ


def test_missing_batchnorm_statistics_are_a_clear_error(tmp_path):
    spec = VARIANTS["convmixer-fmnist"]
    sd = {k: v for k, v in _trained_like(spec).state_dict().items() if "running_" not in k}
    path = tmp_path / "weights_only.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="BatchNorm running statistics"):
        load_weights(build_model(spec), path)
    assert_clean_error(run_cli("eval", "--model", "convmixer-fmnist", "--weights", path), 2,
                       "BatchNorm running statistics (running_mean, running_var) are missing", "blocks.0.0.fn.2")


def test_export_form_is_the_same_function_and_fully_delegated():
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from edgemix.backends.executorch.delegation import delegation_report
    from edgemix.models.registry import export_form

    model = _trained_like(VARIANTS["convmixer-fmnist"])
    view, what = export_form(model)
    assert "13 BatchNorms" in what and not any(isinstance(m, nn.BatchNorm2d) for m in view.modules())
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(view(x), model(x), rtol=0, atol=1e-5)  # same function, fp32
    edge = to_edge_transform_and_lower(torch.export.export(view, (x[:1],)), partitioner=[XnnpackPartitioner()])
    report = delegation_report(edge.exported_program().graph_module, {})
    assert report["not_delegated"] == [] and report["partitions"] == 1, report["not_delegated"]


def test_int8_graph_keeps_the_depthwise_branch_in_float():
    """The phone's INT8 graph quantizes the 1x1 convs and the head (where INT8 is faster) and leaves
    each depthwise conv and the per-channel affines in float: XNNPACK's INT8 depthwise conv and
    mul/add ran slower than their FP32 kernels, which made the whole INT8 program slower."""
    from edgemix.backends.executorch import quantizer as pt2e
    from edgemix.backends.executorch.passes.mixer import export_view

    spec = VARIANTS["convmixer-fmnist"]
    view, what = export_view(_trained_like(spec))
    assert {t.__name__ for t in view.float_types} == {"DepthwiseBranch", "ChannelAffine"}
    x = torch.randn(4, 1, 28, 28)
    converted = pt2e.ptq(pt2e.export_model(view, x[:1]), x, 1, float_modules=view.float_types)

    def is_dq(n):
        return n.op == "call_function" and "dequantize_per_" in str(n.target)

    convs = [n for n in converted.graph.nodes if n.op == "call_function" and "conv2d" in str(n.target)]
    depthwise = [n for n in convs if len(n.args) > 6 and n.args[6] == spec.dim]
    dense = [n for n in convs if n not in depthwise]
    assert len(depthwise) == spec.depth and len(dense) == spec.depth + 1  # the blocks' 1x1 convs and the stem
    assert not any(is_dq(n.args[1]) for n in depthwise) and all(is_dq(n.args[1]) for n in dense)
    muls = [n for n in converted.graph.nodes if n.op == "call_function" and "aten.mul" in str(n.target)]
    assert len(muls) == 2 * spec.depth + 1 and not any(is_dq(a) for n in muls for a in n.all_input_nodes)
    # and still the same function as the FP32 model, up to INT8 rounding
    with torch.no_grad():
        ref, out = view(x), converted(x[:1])
    assert torch.nn.functional.cosine_similarity(ref[:1], out).item() > 0.99


def test_phone_activations_default_to_the_familys_choice():
    """ConvMixer's export form asks for dynamic activations on the phone (its static INT8 program ran
    no faster than FP32); an explicit choice wins, and QAT, which trains static activations, gets them."""
    from edgemix.backends.executorch.backend import activations_for
    from edgemix.models.registry import export_form

    view, _ = export_form(_trained_like(VARIANTS["convmixer-fmnist"]))
    assert view.activations == "dynamic"
    assert activations_for(None, view.activations, qat=False) == "dynamic"
    assert activations_for("static", view.activations, qat=False) == "static"
    assert activations_for(None, view.activations, qat=True) == "static"
    assert activations_for(None, "static", qat=False) == "static"  # every other family's default
    assert activations_for("dynamic", "static", qat=False) == "dynamic"


def test_jetson_conv_outputs_follow_the_family_unless_the_option_says_otherwise(tmp_path):
    """`--backend-option conv_outputs=false` gives NNCF's placement alone (Q/DQ on Conv inputs, as
    TensorRT's guide places them): no Conv of the artifact writes INT8."""
    out = tmp_path / "b"
    p = run_cli("build", "--target", "jetson", "--model", "convmixer-fmnist", "--random-weights", "--eval-limit",
                "20", "--latency-runs", "3", "--latency-seconds", "0", "--backend-option", "conv_outputs=false",
                "--out", out)
    assert p.returncode == 0, p.stdout + p.stderr
    quant = json.loads((out / "report.json").read_text())["quantization"]
    assert quant["conv_outputs"] is False and quant["conv_outputs_quantized"] == 0
    assert "Conv outputs" not in quant["scheme"]

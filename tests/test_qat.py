"""Quantization-aware training: the distillation loss, the PTQ-or-QAT choice (on fixed numbers), the
FP32 model left untouched, a short seeded QAT run on the sample, and bad input."""

import copy

import pytest
import torch

from conftest import assert_clean_error, run_cli
from edgemix.errors import UsageError
from edgemix.train import TrainConfig, loss_name, training_loss


def test_distillation_loss_is_zero_on_the_teachers_own_logits_and_blends_with_labels():
    torch.manual_seed(0)
    logits, labels = torch.randn(8, 10), torch.randint(0, 10, (8,))
    other = torch.randn(8, 10)
    kd = TrainConfig(distill=1.0, label_smoothing=0.0)
    assert training_loss(logits, labels, kd, logits).item() == pytest.approx(0.0, abs=1e-6)
    assert training_loss(logits, labels, kd, other).item() > 0.1
    ce = torch.nn.functional.cross_entropy(logits, labels)
    half = TrainConfig(distill=0.5, label_smoothing=0.0)
    assert training_loss(logits, labels, half, logits).item() == pytest.approx(0.5 * ce.item(), rel=1e-5)
    labels_only = TrainConfig(distill=0.0, label_smoothing=0.0)
    assert training_loss(logits, labels, labels_only, other).item() == pytest.approx(ce.item(), rel=1e-6)


def test_mse_distillation_matches_the_logits_themselves_and_says_so():
    torch.manual_seed(0)
    logits, labels, other = torch.randn(8, 10), torch.randint(0, 10, (8,)), torch.randn(8, 10)
    mse = TrainConfig(distill=1.0, label_smoothing=0.0, distill_loss="mse")
    assert training_loss(logits, labels, mse, logits).item() == pytest.approx(0.0, abs=1e-7)
    expected = ((logits - other) ** 2).mean().item()
    assert training_loss(logits, labels, mse, other).item() == pytest.approx(expected, rel=1e-6)
    # a logit shift that leaves the softmax alone costs nothing under KL and something under MSE
    kl = TrainConfig(distill=1.0, label_smoothing=0.0)
    assert training_loss(logits + 1.0, labels, kl, logits).item() == pytest.approx(0.0, abs=1e-5)
    assert training_loss(logits + 1.0, labels, mse, logits).item() == pytest.approx(1.0, rel=1e-6)
    ce = torch.nn.functional.cross_entropy(logits, labels)
    half = TrainConfig(distill=0.5, label_smoothing=0.0, distill_loss="mse")
    assert training_loss(logits, labels, half, other).item() == pytest.approx(0.5 * expected + 0.5 * ce.item(), rel=1e-5)
    assert "mean squared error" in loss_name(mse) and "temperature" in loss_name(kl)


@pytest.mark.parametrize("bad", [{"distill": 1.5}, {"distill": -0.1}, {"temperature": 0.0},
                                 {"distill_loss": "l2"}])
def test_distillation_settings_are_checked(bad):
    with pytest.raises(UsageError):
        TrainConfig(**bad).validate()


@pytest.mark.parametrize("ptq, qat, keep, kept", [
    (0.990, 0.995, "better", "qat"),   # QAT recovered what PTQ lost
    (0.999, 0.995, "better", "ptq"),   # PTQ already better: QAT's worse artifact is not shipped
    (0.999, 0.995, "qat", "qat"),      # told to keep QAT
    (0.995, 0.995, "better", "qat"),   # a tie keeps QAT
])
def test_the_better_of_ptq_and_qat_is_kept(ptq, qat, keep, kept):
    from edgemix.pipeline import keep_of

    assert keep_of(ptq, qat, keep) == kept


def _fmnist_sample(calib_images: int, test_images: int):
    """The shipped fmnist model, the sample's training set, a stratified calibration batch of it and
    the first test images, as model inputs."""
    from edgemix.data import load_dataset, stratified_indices, to_model_input
    from edgemix.models import load_model

    model, _ = load_model("fmnist")
    train = load_dataset("sample", "train")
    calib = to_model_input(train.images[stratified_indices(train.labels, calib_images, 0)], model.spec)
    x = to_model_input(load_dataset("sample", "test").images[:test_images], model.spec)
    return model, train, calib, x


def test_phone_qat_is_reproducible_and_leaves_the_fp32_model_alone():
    """PT2E QAT from the PTQ calibration, distilling the FP32 model, seeded: the same call gives the
    same quantized model bit for bit, and the FP32 model it was given (the build's reference, teacher
    and FP32 twin) is unchanged: an exported graph shares its module's parameters, and QAT used to
    train the caller's model in place."""
    from edgemix.backends.executorch import quantizer as pt2e

    model, train, calib, x = _fmnist_sample(128, 200)
    spec = model.spec
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(epochs=0.5, batch_size=64, lr=3e-5, warmup_epochs=0.0, augment=False, label_smoothing=0.0,
                      weight_decay=0.0, distill=1.0, seed=0)
    outputs = []
    for _ in range(2):
        converted = pt2e.qat(model, spec, train, 0.5, cfg, calib)
        with torch.no_grad():
            outputs.append(converted(x))
    assert torch.equal(outputs[0], outputs[1])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert (outputs[0].argmax(1) == model(x).argmax(1)).float().mean() > 0.95


def test_bad_qat_requests_are_usage_errors(tmp_path):
    out = tmp_path / "o"
    base = ("build", "--target", "phone", "--out", out)
    assert_clean_error(run_cli(*base, "--precision", "fp32", "--qat-epochs", "1"), 2, "needs --precision int8")
    assert_clean_error(run_cli(*base, "--qat-epochs", "1", "--qat-lr", "0"), 2, "--qat-lr")
    assert_clean_error(run_cli(*base, "--qat-epochs", "1", "--qat-distill", "2"), 2, "--qat-distill")
    assert_clean_error(run_cli(*base, "--qat-epochs", "1", "--qat-keep", "bettr"), 2, "did you mean 'better'")
    assert_clean_error(run_cli(*base, "--qat-epochs", "1", "--qat-loss", "mes"), 2, "did you mean 'mse'")
    other = tmp_path / "other"  # a training folder with 12 classes for a 10-class model
    for c in range(12):
        (other / f"c{c:02d}").mkdir(parents=True)
        from PIL import Image

        Image.new("L", (28, 28), c * 20).save(other / f"c{c:02d}" / "x.png")
    assert_clean_error(run_cli(*base, "--qat-epochs", "0.1", "--train-data", other), 2, "classes")
    assert not out.exists()


def test_phone_qat_trains_the_graph_it_ships():
    """The fake-quant graph PT2E QAT fine-tunes computes the same logits as the INT8 graph
    convert_pt2e makes of it, before and after training steps. The XNNPACK quantizer's QAT default
    for weights (FusedMovingAvgObsFakeQuantize) trains on max|w|/127.5 and converts with max|w|/127
    (pytorch/ao#4824): logits differed by up to 1.1 and the rounding QAT learned was lost."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    from edgemix.backends.executorch import quantizer as pt2e
    from edgemix.train import fit

    model, train, calib, x = _fmnist_sample(64, 64)
    spec = model.spec
    prepared, set_train = pt2e.prepare_qat(model, calib, 32)
    for trained in (False, True):
        if trained:
            cfg = TrainConfig(epochs=0.1, batch_size=32, lr=1e-3, warmup_epochs=0.0, augment=False,
                              label_smoothing=0.0, weight_decay=0.0, seed=0)
            fit(prepared, list(prepared.parameters()), spec, train, cfg, set_train=set_train)
        with torch.no_grad():
            fake_quant = prepared(x)  # eval mode: the weight observers see the current weights
            converted = convert_pt2e(copy.deepcopy(prepared))(x)
        assert torch.allclose(fake_quant, converted, atol=1e-4), (trained, (fake_quant - converted).abs().max())


@pytest.mark.parametrize("observer", ["minmax", "histogram"])
def test_phone_qat_starts_where_ptq_ends(observer):
    """Before its first step, the QAT graph is the PTQ model: same ranges (calibrated in PTQ's
    batches, which a histogram observer depends on), same weight grid, same logits."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    from edgemix.backends.executorch import quantizer as pt2e

    model, _, calib, x = _fmnist_sample(64, 64)
    exported = pt2e.export_model(model, calib[:16], dynamic_batch=True, max_batch=16)
    ptq = pt2e.ptq(exported, calib, 16, observer)
    prepared, _ = pt2e.prepare_qat(model, calib, 32, observer, calib_batch=16)
    with torch.no_grad():
        assert torch.allclose(ptq(x), convert_pt2e(prepared)(x), atol=1e-5)


def _pte_logits(converted, x, tmp_path, name):
    """Lower a converted graph as the phone build does and run the written .pte on ``x``."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from edgemix.backends.base import batched_predict
    from edgemix.backends.executorch.runtime import ExecuTorchPredictor

    with torch.no_grad():
        exported = torch.export.export(converted, (x[:1],))
    path = tmp_path / f"{name}.pte"
    with open(path, "wb") as f:
        to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()]).to_executorch().write_to_file(f)
    return torch.from_numpy(batched_predict(ExecuTorchPredictor(path, 1, False, 1), x.numpy()))


def test_dynamic_qat_trains_the_rounding_xnnpack_does_at_run_time(tmp_path):
    """Dynamic activations: the fake-quant model QAT trains computes what XNNPACK's dynamically
    quantized kernels compute in the written .pte (per-channel weights on the converted graph's grid,
    each GEMM input row rounded from its own range), and a short seeded fine-tune brings the .pte
    closer to FP32 than the dynamic PTQ .pte it starts from, leaving the FP32 model alone."""
    pytest.importorskip("executorch", reason="the executorch package (ExecuTorch toolchain) is not installed")
    from edgemix.backends.executorch import quantizer as pt2e
    from edgemix.backends.executorch.passes import XnnpackLayerNorm, export_view

    model, train, _, x = _fmnist_sample(8, 200)
    view, _ = export_view(model)
    float_modules = (XnnpackLayerNorm,)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x)
    converted = pt2e.dynamic(pt2e.export_model(view, x[:1]), x[:1], float_modules)
    ptq = _pte_logits(converted, x, tmp_path, "ptq")
    twin = copy.deepcopy(view)
    paths = pt2e.dynamic_gemm_paths(converted)
    assert "head" in paths and not any("norm" in p for p in paths)  # LayerNorm's mean GEMVs stay float
    assert pt2e._wrap_gemms(twin, paths) == 18  # 16 block Linears, the stem, the head
    with torch.no_grad():
        simulated = twin(x)
    # the same rounding, up to XNNPACK's own arithmetic for scales and zero points (an input that
    # lands on a rounding boundary may go the other way): far closer to the .pte than FP32 is
    sim_vs_pte, ref_vs_pte = float(((simulated - ptq) ** 2).mean()), float(((ref - ptq) ** 2).mean())
    assert sim_vs_pte < 0.15 * ref_vs_pte, (sim_vs_pte, ref_vs_pte)  # 2026-12-01: 0.056; weights alone: 0.50

    # two epochs of the 2,000-image sample at the build's QAT defaults (lr 3e-5, MSE on the FP32 logits)
    cfg = TrainConfig(epochs=2.0, batch_size=64, lr=3e-5, warmup_epochs=0.0, augment=False, label_smoothing=0.0,
                      weight_decay=0.0, distill=1.0, distill_loss="mse", seed=0)
    qat = _pte_logits(pt2e.qat_dynamic(view, pt2e.export_model(view, x[:1]), model.spec, train, 2.0, cfg, x[:1],
                                       float_modules), x, tmp_path, "qat")
    mse = {name: float(((out - ref) ** 2).mean()) for name, out in (("ptq", ptq), ("qat", qat))}
    assert mse["qat"] < 0.95 * mse["ptq"], mse  # 2026-12-01: 0.85
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

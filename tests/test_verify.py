import math

import numpy as np
import pytest

from edgemix.verify.drift import drift_metrics, paired_delta_interval, wilson_interval
from edgemix.verify.latency import measure_interleaved, summarize


def test_identical_logits_are_perfect():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(50, 10)).astype(np.float32)
    labels = ref.argmax(1)
    d = drift_metrics(ref, ref.copy(), labels)
    assert d["agreement"] == 1.0 and d["top1_delta"] == 0.0 and d["sqnr_db"] == math.inf
    assert abs(d["cosine_mean"] - 1) < 1e-12


def test_known_noise_gives_known_sqnr_and_flips():
    ref = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    dep = ref.copy()
    dep[0] = [0.0, 2.0]  # one prediction flips
    labels = np.array([0, 1, 1, 1])  # ref: 3/4 correct; dep: 2/4 correct
    d = drift_metrics(ref, dep, labels)
    assert d["samples"] == 4 and d["agreement"] == 0.75
    assert d["top1_delta"] == pytest.approx(-25.0)
    assert d["flips"] == {"fixed": 0, "broken": 1}
    # signal 16, noise 8 -> 10*log10(2) dB
    assert d["sqnr_db"] == pytest.approx(10 * math.log10(2))
    assert d["cosine_min"] == pytest.approx(0.0, abs=1e-9)


def test_wilson_interval_matches_textbook():
    lo, hi = wilson_interval(95, 100)  # textbook: 0.888 .. 0.978
    assert lo == pytest.approx(0.8883, abs=1e-3) and hi == pytest.approx(0.9785, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_paired_interval_shrinks_with_samples():
    ref = np.ones(100, bool)
    dep = ref.copy()
    dep[:2] = False
    lo, hi = paired_delta_interval(ref, dep)
    # 2 broken of 100: the interval still includes 0 (not significant) ...
    assert lo < -2 < 0 < hi
    lo2, hi2 = paired_delta_interval(np.tile(ref, 100), np.tile(dep, 100))
    # ... but the same rate over 10,000 images is: 10x the samples, ~1/10 the width
    assert hi2 < 0 and (hi2 - lo2) == pytest.approx((hi - lo) / 10, rel=0.05)


def test_latency_summary_and_interleaving():
    s = summarize([1.0, 2.0, 3.0, 4.0, 100.0], batch=2)
    assert s["p50"] == 3.0 and s["runs"] == 5 and s["min"] == 1.0
    assert s["throughput_ips"] == pytest.approx(2000 / 3)
    calls = []
    out = measure_interleaved({"a": lambda x: calls.append("a"), "b": lambda x: calls.append("b")}, None, 1, 3)
    # warm-up a, b; then rounds alternate their order so neither always runs second
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"] and len(out["a"]) == 3


def test_interleaved_timing_runs_past_the_count_until_the_time_floor():
    import time

    out = measure_interleaved({"a": lambda x: time.sleep(0.001), "b": lambda x: None}, None, 0, 3,
                              min_seconds=0.1, max_runs=10_000)
    assert 30 <= len(out["a"]) == len(out["b"]) < 110  # ~1 ms a round for 0.1 s, not just the 3 asked
    capped = measure_interleaved({"a": lambda x: None}, None, 0, 3, min_seconds=60, max_runs=50)
    assert len(capped["a"]) == 50


def test_reference_runs_small_batches_on_the_cpu_and_asked_ones_otherwise():
    """On the CPU the FP32 reference goes 8 images a pass (activations stay in cache); an asked batch
    size is used as is; the logits do not depend on it beyond float rounding."""
    import torch

    from edgemix.data import load_dataset
    from edgemix.models import build_model, resolve_spec
    from edgemix.verify.reference import reference_logits

    torch.manual_seed(0)
    model = build_model(resolve_spec("fmnist")).eval()
    data = load_dataset("sample", "test").subset(np.arange(20))
    sizes = []
    hook = model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    small = reference_logits(model, data, model.spec)
    assert sizes == [8, 8, 4]
    sizes.clear()
    large = reference_logits(model, data, model.spec, batch_size=250)
    assert sizes == [20]
    hook.remove()
    np.testing.assert_allclose(small, large, atol=1e-5, rtol=0)

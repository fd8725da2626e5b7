"""The build cache (edgemix.cache): keyed by content, never trusted when unreadable, never fatal."""

import numpy as np
import pytest
import torch

from edgemix import cache
from edgemix.data import load_dataset
from edgemix.models import load_model
from edgemix.verify.reference import cached_reference_logits, reference_logits


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def small():
    model, _ = load_model("fmnist")
    data = load_dataset("sample", "test")
    return model, data.subset(np.arange(40))


def test_reference_logits_come_back_from_the_cache_only_for_the_same_inputs(cache_dir, small):
    model, data = small
    first, cached = cached_reference_logits(model, data, model.spec)
    assert not cached and len(list((cache_dir / "reference").iterdir())) == 1
    again, cached = cached_reference_logits(model, data, model.spec)
    assert cached and np.array_equal(again, first)
    np.testing.assert_allclose(first, reference_logits(model, data, model.spec), atol=1e-5)
    # another weight, other images or another device: other keys, computed afresh
    other, _ = load_model("fmnist")
    with torch.no_grad():
        other.head.bias[0] += 1.0
    shifted, cached = cached_reference_logits(other, data, model.spec)
    assert not cached and np.allclose(shifted[:, 0] - first[:, 0], 1.0, atol=1e-4)
    _, cached = cached_reference_logits(model, data.subset(np.arange(20)), model.spec)
    assert not cached
    assert len(list((cache_dir / "reference").iterdir())) == 3


def test_an_unreadable_entry_is_recomputed_and_replaced(cache_dir, small):
    model, data = small
    first, _ = cached_reference_logits(model, data, model.spec)
    (entry,) = (cache_dir / "reference").iterdir()
    entry.write_bytes(b"not an npz")
    again, cached = cached_reference_logits(model, data, model.spec)
    assert not cached and np.array_equal(again, first)
    assert cached_reference_logits(model, data, model.spec)[1]  # rewritten, readable again


def test_cache_off_and_unwritable_cache_never_fail(tmp_path, monkeypatch, small):
    model, data = small
    monkeypatch.setenv(cache.ENV, "off")
    assert cache.root() is None
    assert not cached_reference_logits(model, data, model.spec)[1]
    assert not cached_reference_logits(model, data, model.spec)[1]
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv(cache.ENV, str(blocker))  # the cache folder cannot be created
    logits, cached = cached_reference_logits(model, data, model.spec)
    assert not cached and logits.shape == (40, 10) and blocker.read_text() == "x"
    monkeypatch.setenv(cache.ENV, str(tmp_path / "on"))
    assert not cached_reference_logits(model, data, model.spec, use_cache=False)[1]
    assert not (tmp_path / "on").exists()  # --no-cache: nothing read, nothing written


def test_default_location_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv(cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.root() == tmp_path / "edgemix"


def test_folder_entries_need_every_file(cache_dir, tmp_path):
    src = tmp_path / "model.pte"
    src.write_bytes(b"\x01" * 10)
    entry = cache.save_folder("fp32-artifact", "k1", {"model.pte": src}, {"files": {"model": "model.pte"}})
    assert entry is not None and (entry / "model.pte").read_bytes() == src.read_bytes()
    assert cache.load_folder("fp32-artifact", "k1", required=("entry.json", "model.pte")) == entry
    (entry / "model.pte").unlink()
    assert cache.load_folder("fp32-artifact", "k1", required=("entry.json", "model.pte")) is None
    assert not entry.exists()  # an incomplete entry is dropped


def test_digest_separates_values_and_model_digest_sees_every_tensor():
    assert cache.digest("a", 1) != cache.digest("a1")
    assert cache.digest(np.zeros(3, np.float32)) != cache.digest(np.zeros(3, np.float64))
    assert cache.digest(np.zeros((2, 3))) != cache.digest(np.zeros((3, 2)))
    m, _ = load_model("fmnist")
    before = cache.model_digest(m)
    with torch.no_grad():
        m.blocks[2].norm1.weight[5] += 1e-3
    assert cache.model_digest(m) != before

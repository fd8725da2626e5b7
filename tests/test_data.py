import gzip

import numpy as np
import pytest
import torch
from PIL import Image

from edgemix.data import load_dataset, stratified_indices, to_model_input
from edgemix.data.idx import DEBIAN_DIR, read_idx, write_idx
from edgemix.errors import DataError
from edgemix.models import resolve_spec


def test_shipped_sample_is_stratified_fashion_mnist():
    test = load_dataset("sample", "test")
    assert test.images.shape == (1000, 1, 28, 28) and test.images.dtype == torch.uint8
    assert torch.bincount(test.labels).tolist() == [100] * 10
    assert test.classes[9] == "Ankle boot"
    assert len(load_dataset("sample", "train")) == 2000


@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip_gzipped_and_raw(tmp_path, gz):
    arr = np.random.default_rng(0).integers(0, 255, (5, 28, 28), dtype=np.uint8)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    write_idx(path, arr)
    np.testing.assert_array_equal(read_idx(path), arr)


def test_truncated_idx_is_clear_error(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, np.zeros((4, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(path)
    bad = tmp_path / "x.gz"
    bad.write_bytes(gzip.compress(b"\x01\x02\x03"))
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(bad)


def test_idx_folder_missing_split_names_files(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((2, 28, 28), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros((2,), np.uint8))
    assert len(load_dataset(tmp_path, "test")) == 2
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_dataset(tmp_path, "train")


@pytest.mark.skipif(DEBIAN_DIR.exists(), reason="the Debian data package is installed on this machine")
def test_full_set_absent_prints_install_command():
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "test")


@pytest.mark.skipif(not DEBIAN_DIR.exists(), reason="dataset-fashion-mnist not installed")
def test_full_debian_set():
    assert len(load_dataset("fashion-mnist", "test")) == 10000


def test_image_folder(tmp_path):
    for ci, cls in enumerate(["cat", "dog"]):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.full((12, 10, 3), 40 * ci + i, np.uint8)).save(tmp_path / cls / f"{i}.png")
    ds = load_dataset(tmp_path)
    assert ds.classes == ["cat", "dog"] and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.images.shape == (6, 3, 12, 10)
    x = to_model_input(ds.images, resolve_spec("s32", img_size=32))
    assert x.shape == (6, 3, 32, 32)


def test_empty_and_unreadable_folders(tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "missing")
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image"):
        load_dataset(tmp_path / "bad")


def test_stratified_sampling_is_deterministic_and_balanced():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    a = stratified_indices(labels, 30, seed=3)
    assert torch.equal(a, stratified_indices(labels, 30, seed=3))
    assert torch.bincount(labels[a]).tolist() == [10, 10, 10]
    assert not torch.equal(a, stratified_indices(labels, 30, seed=4))


def test_transform_grey_to_rgb_resize_normalise():
    spec = resolve_spec("s32", img_size=64)
    imgs = torch.full((2, 1, 28, 28), 255, dtype=torch.uint8)
    x = to_model_input(imgs, spec)
    assert x.shape == (2, 3, 64, 64)
    torch.testing.assert_close(x, torch.ones_like(x), atol=1e-5, rtol=0)  # (1 - 0.5) / 0.5
    fm = resolve_spec("fmnist")
    y = to_model_input(torch.zeros((1, 1, 28, 28), dtype=torch.uint8), fm)
    assert abs(float(y.mean()) - (0 - fm.mean[0]) / fm.std[0]) < 1e-6


def test_transform_resizes_with_the_fewer_channels_to_the_same_values():
    """Grey images are resized once and repeated (not repeated, then resized three times); colour
    images for a grey model are reduced to luma first. Either way each channel holds exactly what
    resizing it on its own gives, normalised with its own mean/std."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    grey = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8, generator=g)
    spec = resolve_spec("s16")  # 3 channels, 224 px, ImageNet-style mean/std per channel
    x = to_model_input(grey, spec)
    resized = F.interpolate(grey.float() / 255, size=(224, 224), mode="bilinear", align_corners=False,
                            antialias=True)
    for ch in range(3):
        assert torch.equal(x[:, ch:ch + 1], (resized - spec.mean[ch]) / spec.std[ch]), ch
    assert x.is_contiguous() and x.dtype == torch.float32
    colour = torch.randint(0, 256, (2, 3, 20, 20), dtype=torch.uint8, generator=g)
    fm = resolve_spec("fmnist")
    luma = (colour.float() / 255 * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    want = F.interpolate(luma, size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(to_model_input(colour, fm), (want - fm.mean[0]) / fm.std[0], atol=1e-6, rtol=0)
    with pytest.raises(DataError, match="cannot convert 2-channel images to the model's 3 channels"):
        to_model_input(torch.zeros((1, 2, 8, 8), dtype=torch.uint8), spec)

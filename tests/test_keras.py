"""Keras MLP-Mixers: models built and saved by real Keras 3 (torch backend), imported by edgemix
with h5py alone, compared with Keras's own predictions on the same images."""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

keras = pytest.importorskip("keras")
from keras import layers  # noqa: E402

from conftest import assert_clean_error, run_cli  # noqa: E402
from edgemix.data import load_dataset, stratified_indices, to_model_input  # noqa: E402
from edgemix.errors import CheckpointError  # noqa: E402
from edgemix.models import load_model  # noqa: E402
from edgemix.models.keras import read_keras_mixer  # noqa: E402

# Keras (torch backend) and edgemix run the same float32 ops in a different order, and Keras's
# resize is its own bilinear kernel: 1e-4 on logits of order 1
TOL = 1e-4


class Patches(layers.Layer):
    """The keras.io example's patch layer."""

    def __init__(self, patch_size, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = patch_size

    def call(self, x):
        p = keras.ops.image.extract_patches(x, self.patch_size)
        return keras.ops.reshape(p, (keras.ops.shape(p)[0], p.shape[1] * p.shape[2], p.shape[3]))


class MLPMixerLayer(layers.Layer):
    """The keras.io example's block: one LayerNormalization for both pre-norms."""

    def __init__(self, num_patches, hidden_units, dropout_rate, **kwargs):
        super().__init__(**kwargs)
        self.mlp1 = keras.Sequential([layers.Dense(num_patches, activation="gelu"), layers.Dense(num_patches),
                                      layers.Dropout(dropout_rate)])
        self.mlp2 = keras.Sequential([layers.Dense(num_patches, activation="gelu"), layers.Dense(hidden_units),
                                      layers.Dropout(dropout_rate)])
        self.normalize = layers.LayerNormalization(epsilon=1e-6)

    def call(self, inputs):
        x = self.normalize(inputs)
        x = keras.ops.transpose(self.mlp1(keras.ops.transpose(x, (0, 2, 1))), (0, 2, 1)) + inputs
        return x + self.mlp2(self.normalize(x))


def _images(n=24):
    ds = load_dataset("sample", "test")
    ds = ds.subset(stratified_indices(ds.labels, n, 0))
    return ds.images  # uint8 (N, 1, 28, 28): Keras gets them as 3 channels, as edgemix feeds the model


def _keras_input(images):
    return images.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).float().numpy()  # NHWC, raw 0..255


def keras_io_model(seed=0):
    keras.utils.set_random_seed(seed)
    image_size, patch, hidden, classes = 64, 8, 32, 10
    num_patches = (image_size // patch) ** 2
    aug = keras.Sequential([layers.Normalization(), layers.Resizing(image_size, image_size),
                            layers.RandomFlip("horizontal"), layers.RandomZoom(0.2, 0.2)], name="data_augmentation")
    # adapted on synthetic data: nothing is downloaded
    aug.layers[0].adapt(np.random.default_rng(seed).uniform(0, 255, (256, 28, 28, 3)).astype("float32"))
    inputs = layers.Input(shape=(28, 28, 3))
    x = layers.Dense(hidden)(Patches(patch)(aug(inputs)))
    x = keras.Sequential([MLPMixerLayer(num_patches, hidden, 0.2) for _ in range(2)])(x)
    x = layers.Dropout(0.2)(layers.GlobalAveragePooling1D()(x))
    return keras.Model(inputs, layers.Dense(classes)(x))


def conv_stem_model(seed=0, rescale=True):
    """Sayak Paul's CIFAR-10 layout: Conv2D stem, Permute for token mixing, default-epsilon LayerNorms,
    a final LayerNorm; inputs rescaled inside the model (or, without ``rescale``, raw pixels)."""
    keras.utils.set_random_seed(seed)
    patch, hidden, tokens_mlp, channels_mlp = 4, 24, 16, 48
    inputs = layers.Input(shape=(28, 28, 3))
    x = layers.Rescaling(1 / 255.0)(inputs) if rescale else inputs
    x = layers.Conv2D(hidden, patch, strides=patch, padding="valid")(x)
    x = layers.Reshape((x.shape[1] * x.shape[2], hidden))(x)
    for _ in range(2):
        y = layers.Permute((2, 1))(layers.LayerNormalization()(x))
        y = layers.Dense(x.shape[1])(layers.Activation("gelu")(layers.Dense(tokens_mlp)(y)))
        x = layers.Add()([x, layers.Permute((2, 1))(y)])
        y = layers.LayerNormalization()(x)
        x = layers.Add()([x, layers.Dense(hidden)(layers.Activation("gelu")(layers.Dense(channels_mlp)(y)))])
    x = layers.GlobalAveragePooling1D()(layers.LayerNormalization()(x))
    return keras.Model(inputs, layers.Dense(10)(x))


def _edgemix_logits(path, images):
    model, prov = load_model(None, path)
    with torch.no_grad():
        return model(to_model_input(images, model.spec)).numpy(), model, prov


@pytest.mark.parametrize("build", [keras_io_model, conv_stem_model])
@pytest.mark.parametrize("save", ["keras", "weights"])
def test_keras_files_give_keras_predictions(tmp_path, build, save):
    # a bare .weights.h5 cannot hold a Rescaling layer (it has no weights): that file comes from the
    # same layout reading raw pixels; the Rescaling is covered by the .keras archive
    km = conv_stem_model(rescale=False) if build is conv_stem_model and save == "weights" else build()
    images = _images()
    expected = km.predict(_keras_input(images), verbose=0)
    path = tmp_path / ("m.keras" if save == "keras" else "m.weights.h5")
    km.save(path) if save == "keras" else km.save_weights(path)
    got, model, prov = _edgemix_logits(path, images)
    assert prov["format"] == "keras" and model.spec.num_classes == 10
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOL)
    spec = model.spec
    if build is keras_io_model:
        assert (spec.shared_norm, spec.pre_head_norm, spec.ln_eps, spec.img_size) == (True, False, 1e-6, 64)
    else:
        assert (spec.shared_norm, spec.pre_head_norm, spec.ln_eps, spec.patch_size) == (False, True, 1e-3, 4)


@pytest.mark.parametrize("break_it", ["untransposed token dense", "patch features as (channel, row, column)"])
def test_a_wrong_mapping_fails_the_comparison(tmp_path, break_it):
    km = keras_io_model()
    images = _images()
    expected = km.predict(_keras_input(images), verbose=0)
    km.save(tmp_path / "m.keras")
    spec, sd = read_keras_mixer(tmp_path / "m.keras")
    if break_it.startswith("untransposed"):
        sd["blocks.0.mlp_tokens.fc1.weight"] = sd["blocks.0.mlp_tokens.fc1.weight"].T.contiguous()
    else:
        w = sd["stem.proj.weight"]  # (out, c, ky, kx) read back in the wrong feature order
        sd["stem.proj.weight"] = w.reshape(w.shape[0], -1).reshape(w.shape[0], w.shape[2], w.shape[3], w.shape[1]) \
            .permute(0, 3, 1, 2).contiguous()
    from edgemix.models import build_model

    model = build_model(spec).eval()
    model.load_state_dict(sd)
    with torch.no_grad():
        got = model(to_model_input(images, spec)).numpy()
    assert np.abs(got - expected).max() > 100 * TOL  # the comparison above would catch it


def test_unknown_keras_layout_is_a_clear_error(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = layers.Input(shape=(8,))
    km = keras.Model(inputs, layers.Dense(3)(layers.Dense(4)(inputs)))
    path = tmp_path / "mlp.weights.h5"
    km.save_weights(path)
    with pytest.raises(CheckpointError, match="layout edgemix does not recognise; it holds: layers/dense"):
        read_keras_mixer(path)
    assert_clean_error(run_cli("eval", "--weights", path), 2, "does not recognise", "layers/dense_1")


@pytest.mark.parametrize("target", ["phone", "jetson"])
def test_a_keras_mixer_builds_for_each_target(tmp_path, target):
    path = tmp_path / "cifar_mixer.keras"
    keras_io_model().save(path)
    out = tmp_path / "out"
    p = run_cli("build", "--target", target, "--weights", path, "--eval-limit", "100", "--latency-runs", "5",
                "--latency-seconds", "0", "--no-isa-check" if target == "phone" else "--no-cache", "--out", out)
    assert p.returncode == 0, p.stdout + p.stderr
    import json

    r = json.loads((out / "report.json").read_text())
    assert r["model"] == "keras-cifar_mixer" and r["provenance"]["weights_format"] == "keras"
    assert r["drift"]["samples"] == 100 and r["latency_ms"]["p50"] > 0 and r["drift"]["cosine_mean"] > 0.9

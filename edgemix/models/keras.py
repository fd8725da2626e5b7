"""Keras MLP-Mixers (Keras 3 ``.keras`` archives and ``.weights.h5`` files) as edgemix Mixers,
read with h5py: no TensorFlow and no Keras needed.

Two layouts are recognised, from the implementations TensorFlow users hold:

- the keras.io example "Image classification with modern MLP models": preprocessing inside the
  model (Normalization, Resizing, random flips/zooms that do nothing at inference), patches by
  ``keras.ops.image.extract_patches`` (features ordered kernel-row, kernel-column, channel) then
  ``Dense(hidden)``, blocks with ONE LayerNormalization(epsilon=1e-6) used for both pre-norms, token
  MLP ``Dense(num_patches, gelu) -> Dense(num_patches)``, channel MLP ``Dense(num_patches, gelu) ->
  Dense(hidden)``, no final LayerNorm, average pooling, ``Dense(classes)``;
- Sayak Paul's CIFAR-10 Mixer: a Conv2D stem, two LayerNormalization per block (Keras's default
  epsilon 1e-3), a final LayerNorm.

Keras stores a Dense kernel as (in, out) and a Conv2D kernel as (kh, kw, in, out). In a weights
file the groups are named by class and creation order (``dense``, ``dense_1``, ...), not by the
layer names of the model's config, so the layout is recognised from the groups and shapes, and the
hyperparameters are read from the tensor shapes. A ``.keras`` archive's config.json adds what the
weights cannot say (epsilons, the resized image size, the head's activation).
"""

from __future__ import annotations

import io
import json
import math
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from edgemix.errors import CheckpointError

KERAS_SUFFIXES = (".keras", ".weights.h5")
NORMALIZATION_EPS = 1e-7  # keras.backend.epsilon(): Normalization divides by max(sqrt(var), eps)


def is_keras_file(path: str | Path) -> bool:
    return str(path).lower().endswith(KERAS_SUFFIXES)


def _h5_arrays(data: bytes | Path) -> dict[str, np.ndarray]:
    import h5py

    out: dict[str, np.ndarray] = {}
    try:
        with h5py.File(io.BytesIO(data) if isinstance(data, bytes) else data, "r") as f:
            f.visititems(lambda name, obj: out.__setitem__(name, np.asarray(obj)) if isinstance(obj, h5py.Dataset)
                         else None)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"not a readable Keras weights file (HDF5): {e}") from None
    return out


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict | None]:
    if path.name.lower().endswith(".keras"):
        try:
            with zipfile.ZipFile(path) as z:
                config = json.loads(z.read("config.json"))
                weights = z.read("model.weights.h5")
        except (zipfile.BadZipFile, KeyError, ValueError, OSError) as e:
            raise CheckpointError(f"{path} is not a Keras 3 archive (config.json + model.weights.h5): {e}") from None
        return _h5_arrays(weights), config
    return _h5_arrays(path), None


def _index(name: str) -> int:
    """dense -> 0, dense_3 -> 3: Keras's creation order within one container."""
    m = re.search(r"_(\d+)$", name)
    return int(m.group(1)) if m else 0


def _vars(arrays: dict, group: str) -> list[np.ndarray]:
    found = sorted((int(k.rsplit("/", 1)[1]), v) for k, v in arrays.items()
                   if k.startswith(group + "/vars/") and k.rsplit("/", 1)[1].isdigit())
    return [v for _, v in found]


def _top(arrays: dict, kind: str) -> list[str]:
    """Top-level groups of one layer class (``dense``, ``dense_1``, ...), in creation order."""
    names = {k.split("/")[1] for k in arrays if k.startswith("layers/")}
    return sorted((n for n in names if re.fullmatch(rf"{kind}(_\d+)?", n)), key=_index)


def _config_layers(config: dict | None) -> list[dict]:
    """Every layer config of the model, nested Sequentials flattened, in order."""
    out = []

    def walk(layers):
        for layer in layers:
            out.append(layer)
            walk(layer.get("config", {}).get("layers", []) or [])

    if config:
        walk(config.get("config", {}).get("layers", []))
    return out


def _preprocessing(arrays: dict, layers: list[dict], channels: int) -> tuple[tuple, tuple, int | None]:
    """(mean, std) for edgemix's inputs in [0, 1], from the model's own preprocessing of raw 0..255
    pixels, and the size a Resizing layer resizes to (None without one)."""
    mean, std = np.zeros(channels), np.ones(channels)  # in raw-pixel units; none: the model reads 0..255
    norm = [k.rsplit("/vars/", 1)[0] for k in arrays if re.search(r"(^|/)normalization(_\d+)?/vars/0$", k)]
    if norm:
        m, var = _vars(arrays, norm[0])[:2]
        mean, std = m.reshape(-1), np.maximum(np.sqrt(var.reshape(-1)), NORMALIZATION_EPS)
    else:
        for layer in layers:  # y = x * scale + offset is (x - m) / s with s = 1 / scale, m = -offset / scale
            if layer.get("class_name") == "Rescaling":
                scale = np.asarray(layer["config"].get("scale", 1.0), dtype=np.float64)
                mean, std = -np.asarray(layer["config"].get("offset", 0.0)) / scale, 1.0 / scale
    resize = next((layer["config"]["height"] for layer in layers if layer.get("class_name") == "Resizing"), None)
    mean = np.broadcast_to(np.asarray(mean, dtype=np.float64), (channels,)) / 255.0
    std = np.broadcast_to(np.asarray(std, dtype=np.float64), (channels,)) / 255.0
    return tuple(float(v) for v in mean), tuple(float(v) for v in std), resize


def _eps(layers: list[dict], default: float) -> float:
    return next((float(layer["config"]["epsilon"]) for layer in layers
                 if layer.get("class_name") == "LayerNormalization"), default)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _keras_io(arrays: dict, layers: list[dict], stem: str):
    """The keras.io example: blocks in a Sequential of MLPMixerLayer."""
    from edgemix.models.mixer import MixerSpec

    block_groups = sorted({m.group(0) for k in arrays
                           if (m := re.match(r"layers/sequential(_\d+)?/layers/mlp_mixer_layer(_\d+)?", k))},
                          key=lambda g: _index(g.rsplit("/", 1)[1]))
    dense = _top(arrays, "dense")
    if len(dense) != 2 or not block_groups:
        raise CheckpointError("a keras.io-style Mixer has one patch-embedding Dense and one head Dense at the top "
                              f"level and MLPMixerLayer blocks; found top-level Dense {dense}")
    embed_k, embed_b = _vars(arrays, f"layers/{dense[0]}")
    head_k, head_b = _vars(arrays, f"layers/{dense[1]}")
    hidden = embed_k.shape[1]
    sd = {"head.weight": _t(head_k.T), "head.bias": _t(head_b)}
    num_tokens = tokens_dim = channels_dim = None
    for i, g in enumerate(block_groups):
        t1k, t1b = _vars(arrays, f"{g}/mlp1/layers/dense")
        t2k, t2b = _vars(arrays, f"{g}/mlp1/layers/dense_1")
        c1k, c1b = _vars(arrays, f"{g}/mlp2/layers/dense")
        c2k, c2b = _vars(arrays, f"{g}/mlp2/layers/dense_1")
        gamma, beta = _vars(arrays, f"{g}/normalize")
        num_tokens, tokens_dim, channels_dim = t1k.shape[0], t1k.shape[1], c1k.shape[1]
        sd.update({f"blocks.{i}.norm1.weight": _t(gamma), f"blocks.{i}.norm1.bias": _t(beta),
                   f"blocks.{i}.mlp_tokens.fc1.weight": _t(t1k.T), f"blocks.{i}.mlp_tokens.fc1.bias": _t(t1b),
                   f"blocks.{i}.mlp_tokens.fc2.weight": _t(t2k.T), f"blocks.{i}.mlp_tokens.fc2.bias": _t(t2b),
                   f"blocks.{i}.mlp_channels.fc1.weight": _t(c1k.T), f"blocks.{i}.mlp_channels.fc1.bias": _t(c1b),
                   f"blocks.{i}.mlp_channels.fc2.weight": _t(c2k.T), f"blocks.{i}.mlp_channels.fc2.bias": _t(c2b)})
    norm = [k for k in arrays if re.search(r"/normalization/vars/0$", k)]
    channels = _vars(arrays, norm[0].rsplit("/vars/", 1)[0])[0].size if norm else 3
    patch = math.isqrt(embed_k.shape[0] // channels)
    if patch * patch * channels != embed_k.shape[0]:
        raise CheckpointError(f"the patch-embedding Dense takes {embed_k.shape[0]} features, not patch x patch x "
                              f"{channels} channels")
    # extract_patches orders a patch's features (row, column, channel): as a conv kernel (out, c, ky, kx)
    sd["stem.proj.weight"] = _t(embed_k.T.reshape(hidden, patch, patch, channels).transpose(0, 3, 1, 2))
    sd["stem.proj.bias"] = _t(embed_b)
    mean, std, resize = _preprocessing(arrays, layers, channels)
    side = math.isqrt(num_tokens) * patch
    spec = MixerSpec(f"keras-{stem}", patch, hidden, len(block_groups), tokens_dim, channels_dim, img_size=resize or side,
                     in_chans=channels, num_classes=head_k.shape[1], mean=mean, std=std, ln_eps=_eps(layers, 1e-6),
                     shared_norm=True, pre_head_norm=False)
    return spec, sd


def _conv_stem(arrays: dict, layers: list[dict], stem: str):
    """Sayak Paul's layout: Conv2D stem, per block LayerNorm, token Dense x2, LayerNorm, channel Dense x2;
    a final LayerNorm and the head Dense."""
    from edgemix.models.mixer import MixerSpec

    conv = _top(arrays, "conv2d")
    norms = _top(arrays, "layer_normalization")
    dense = _top(arrays, "dense")
    if len(conv) != 1 or len(norms) < 3 or (len(norms) - 1) % 2 or len(dense) != 2 * (len(norms) - 1) + 1:
        raise CheckpointError(f"a Conv2D-stem Keras Mixer has one Conv2D, 2 LayerNormalization and 4 Dense per block, "
                              f"a final LayerNormalization and a head Dense; found {len(conv)} Conv2D, "
                              f"{len(norms)} LayerNormalization, {len(dense)} Dense")
    kernel, bias = _vars(arrays, f"layers/{conv[0]}")
    patch, _, channels, hidden = kernel.shape
    depth = (len(norms) - 1) // 2
    sd = {"stem.proj.weight": _t(kernel.transpose(3, 2, 0, 1)), "stem.proj.bias": _t(bias)}
    for i in range(depth):
        n1, n2 = (_vars(arrays, f"layers/{norms[2 * i + j]}") for j in (0, 1))
        t1, t2, c1, c2 = (_vars(arrays, f"layers/{dense[4 * i + j]}") for j in range(4))
        for name, (k, b) in (("mlp_tokens.fc1", t1), ("mlp_tokens.fc2", t2), ("mlp_channels.fc1", c1),
                             ("mlp_channels.fc2", c2)):
            sd[f"blocks.{i}.{name}.weight"], sd[f"blocks.{i}.{name}.bias"] = _t(k.T), _t(b)
        sd.update({f"blocks.{i}.norm1.weight": _t(n1[0]), f"blocks.{i}.norm1.bias": _t(n1[1]),
                   f"blocks.{i}.norm2.weight": _t(n2[0]), f"blocks.{i}.norm2.bias": _t(n2[1])})
    final = _vars(arrays, f"layers/{norms[-1]}")
    head_k, head_b = _vars(arrays, f"layers/{dense[-1]}")
    sd.update({"norm.weight": _t(final[0]), "norm.bias": _t(final[1]), "head.weight": _t(head_k.T),
               "head.bias": _t(head_b)})
    num_tokens = sd["blocks.0.mlp_tokens.fc1.weight"].shape[1]
    mean, std, resize = _preprocessing(arrays, layers, channels)
    spec = MixerSpec(f"keras-{stem}", patch, hidden, depth, sd["blocks.0.mlp_tokens.fc1.weight"].shape[0],
                     sd["blocks.0.mlp_channels.fc1.weight"].shape[0], img_size=resize or math.isqrt(num_tokens) * patch,
                     in_chans=channels, num_classes=head_k.shape[1], mean=mean, std=std, ln_eps=_eps(layers, 1e-3))
    return spec, sd


def read_keras_mixer(path: str | Path):
    """(MixerSpec, state dict in edgemix's keys) of a Keras Mixer file; CheckpointError naming what
    was found when the layout is not one edgemix knows."""
    path = Path(path)
    arrays, config = _read(path)
    layers = _config_layers(config)
    stem = re.sub(r"(\.weights)?\.(h5|keras)$", "", path.name.lower())
    if any(re.match(r"layers/sequential(_\d+)?/layers/mlp_mixer_layer", k) for k in arrays):
        return _keras_io(arrays, layers, stem)
    if _top(arrays, "conv2d") and _top(arrays, "layer_normalization"):
        return _conv_stem(arrays, layers, stem)
    groups = sorted({"/".join(k.split("/")[:2]) for k in arrays})
    raise CheckpointError(f"{path} is a Keras file whose layout edgemix does not recognise; it holds: "
                          f"{', '.join(groups[:12])}" + (" ..." if len(groups) > 12 else ""),
                          hint="edgemix reads the keras.io MLP-Mixer example and the Conv2D-stem Keras Mixer")

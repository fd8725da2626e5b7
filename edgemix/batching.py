"""The one padding rule of edgemix: a fixed-batch program takes whole batches only, so a short last
chunk repeats its last row up to the batch and the padded rows' outputs are dropped. numpy only at
import (the device runners import it); tensors are padded with torch when they are given."""

from __future__ import annotations

import numpy as np


def pad_to_batch(chunk, batch: int):
    """``chunk`` (numpy array or torch tensor) with its last row repeated up to ``batch`` rows.
    (The device script, which runs without edgemix, repeats this rule in its own code.)"""
    n = len(chunk)
    if n >= batch:
        return chunk
    if not isinstance(chunk, np.ndarray):  # a torch tensor
        import torch

        return torch.cat([chunk, chunk[-1:].expand(batch - n, *chunk.shape[1:])])
    return np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])

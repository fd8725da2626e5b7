"""Activation observers for a calibration recipe's ``observer`` field, shared by both backends: the
ExecuTorch quantizer puts them in its PT2E graph, the TensorRT backend uses them for the Conv-output
quantizers it adds beside NNCF's (:mod:`edgemix.backends.tensorrt.qdq`)."""

from __future__ import annotations

import math

import torch
from torchao.quantization.pt2e import HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver

OBSERVERS = ("minmax", "moving_average_minmax", "histogram", "percentile")


class PercentileObserver(MinMaxObserver):
    """Activation range = the [100-p, p] percentiles of everything seen, not the extremes.

    torchao has no percentile observer. This one keeps a fixed-size histogram over the running
    [min, max]; when a batch widens the range the old counts are re-binned into the new range (each
    count moves by at most one old bin width), so memory stays constant over any number of
    calibration images and the percentile is taken over all of them, not averaged per batch.
    """

    def __init__(self, percentile: float = 99.99, bins: int = 4096, **kwargs):
        super().__init__(**kwargs)
        self.percentile = float(percentile)
        self.bins = int(bins)
        self.register_buffer("histogram", torch.zeros(self.bins))

    def forward(self, x_orig):
        if x_orig.numel() == 0:
            return x_orig
        x = x_orig.detach().float().flatten()
        old_lo, old_hi = float(self.min_val), float(self.max_val)
        super().forward(x)
        lo, hi = float(self.min_val), float(self.max_val)
        hi = max(hi, lo + 1e-8)  # a constant tensor still needs a non-empty histogram range
        if math.isfinite(old_lo) and (lo, hi) != (old_lo, old_hi) and self.histogram.sum() > 0:
            old_width = (old_hi - old_lo) / self.bins
            centres = old_lo + (torch.arange(self.bins) + 0.5) * old_width
            idx = ((centres - lo) / (hi - lo) * self.bins).long().clamp_(0, self.bins - 1)
            self.histogram = torch.zeros(self.bins).index_add_(0, idx, self.histogram)
        self.histogram += torch.histc(x, bins=self.bins, min=lo, max=hi)
        return x_orig

    def calculate_qparams(self):
        total = float(self.histogram.sum())
        if total == 0:
            return super().calculate_qparams()
        lo, hi = float(self.min_val), float(self.max_val)
        width = max(hi - lo, 1e-8) / self.bins
        cdf = torch.cumsum(self.histogram, 0) / total
        tail = 1.0 - self.percentile / 100.0
        lo_bin = int(torch.searchsorted(cdf, torch.tensor(tail), right=True))
        hi_bin = min(int(torch.searchsorted(cdf, torch.tensor(1.0 - tail))), self.bins - 1)
        clip_lo, clip_hi = lo + lo_bin * width, lo + (hi_bin + 1) * width
        return self._calculate_qparams(torch.tensor(max(clip_lo, lo)), torch.tensor(min(clip_hi, hi)))

    def extra_repr(self):
        return f"percentile={self.percentile}, min_val={self.min_val}, max_val={self.max_val}"


class BatchAverageMinMaxObserver(MovingAverageMinMaxObserver):
    """Moving-average min-max whose k-th batch is weighted 1/k: the running mean of per-batch ranges.

    torchao's fixed averaging constant (0.01) is made for training-length streams. Calibrating
    64 images one at a time (the exported batch on a phone is 1), it would leave about half the
    weight on the first image; with 1/k every calibration batch counts the same.
    """

    def __init__(self, **kwargs):
        kwargs.pop("averaging_constant", None)
        super().__init__(averaging_constant=1.0, **kwargs)
        self.register_buffer("batches", torch.tensor(0))

    def forward(self, x_orig):
        if x_orig.numel() == 0:
            return x_orig
        self.batches += 1
        self.averaging_constant = 1.0 / int(self.batches)
        return super().forward(x_orig)


def activation_observer(name: str, percentile: float = 99.99):
    """The torchao observer constructor for a recipe's ``observer`` field (activations only;
    weights always use per-channel min-max, which is exact for a tensor known in advance)."""
    eps = {"eps": 2**-12}  # the XNNPACK quantizer's floor on a scale, kept for every observer
    if name == "minmax":
        return MinMaxObserver.with_args(**eps)
    if name == "moving_average_minmax":
        return BatchAverageMinMaxObserver.with_args(**eps)
    if name == "histogram":
        return HistogramObserver.with_args(**eps)
    if name == "percentile":
        return PercentileObserver.with_args(percentile=percentile, **eps)
    from edgemix.errors import unknown_choice

    raise unknown_choice("observer", name, OBSERVERS)

"""Activation range (amax) estimation from streamed batches, for symmetric per-tensor INT8 (and FP8 E4M3).

Quantization is scale = amax / 127, q = clamp(round(x / scale), -127, 127); a calibrator only has to pick amax.
FP8 builds take scale = amax / 448 from the same ranges (quant.formats); "mse-fp8" picks amax for that grid instead:
E4M3 rounds to 3 mantissa bits (a step relative to the value), so clipping the tail buys far less than on INT8's
uniform grid and the amax minimizing FP8's error sits much nearer the max than INT8's does.
`make_calibrator(method)` returns one small object per quantization point: `collect(x)` is called once per batch,
`compute_amax()` once at the end.

Choice: our own calibrators, with nvidia-modelopt's HistogramCalibrator as the test-time oracle only, because
  * collection stays on the tensor's device with one scalar host sync per batch (histc needs a host-side range),
    and no global state, distributed hooks or scipy at run time;
  * the histogram keeps a fixed 2048 bins over [0, running max]; modelopt appends bins of the first batch's width
    whenever the range grows, so its bin count (and its entropy search, and its cost) depends on batch order;
  * modelopt's entropy search is a per-element Python loop (2-3.5 s per tensor on 2048 bins, far more once its
    bins multiply; hundreds of tensors in BERT); ours is an exact prefix-sum form of the same divergence, ~5-15 ms;
  * modelopt 0.47's "mse" passes (num_bits, unsigned) into fake_tensor_quant's (bias, num_bits) slots, so it
    scores candidates with 0-bit quantization (that is where its 2.51 on N(0,1) + outliers at 40 comes from).
modelopt stays in the requirements: tests/test_calib_calibrators.py checks entropy and percentile against it, and
mse against its sweep with fake_tensor_quant called correctly, each to within one histogram bin.

Entropy details (TensorRT EntropyCalibrator2 as published; see `entropy_divergences`): thresholds i = 128..2048,
amax = upper edge of the last kept bin, ties go to the larger threshold. Unlike modelopt we do not overwrite
bin 0's count with bin 1's before the sweep.

Histogram growth: when a batch's max exceeds the current range, the old counts are re-binned onto 2048 bins over
[0, new max] assuming mass is uniform inside each old bin (the piecewise-linear CDF is evaluated at the new edges).
Each re-bin moves mass by less than one new bin, and a running max over i.i.d. batches only grows O(log n) times,
so the smoothing stays below a bin width in practice; counts are float64 so totals stay exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from quant.formats import FP8_E4M3, INT8, QuantFormat
from quant.quantizer import QMAX, fake_quantize, scale_from_amax  # symmetric INT8: levels -127..127
from common.errors import WorkbenchError

METHODS = ("max", "percentile", "mse", "mse-fp8", "entropy")
# The grid a method picks its amax for (max and percentile look at no grid): building another format from such a
# cache works, with a warning (calib/spec.py).
GRIDS: dict[str, QuantFormat] = {"entropy": INT8, "mse": INT8, "mse-fp8": FP8_E4M3}
# Bump when an algorithm changes the amax it picks, so caches keyed on it are recomputed.
ALGORITHM_VERSION = 3

_CHUNK = 1 << 24  # histc counts in float32 per call; at most 2**24 elements keeps every count exact


class Calibrator(Protocol):
    def collect(self, x: torch.Tensor) -> None:
        """Fold in one batch (any shape, dtype or device); state stays on x's device, no per-element Python."""

    def compute_amax(self) -> float:
        """The range to quantize with; raises WorkbenchError when nothing usable was collected."""


def _abs_max(x: torch.Tensor) -> torch.Tensor:
    """max |x| as a 0-d float64 tensor on x's device, without materialising |x|."""
    lo, hi = torch.aminmax(x.detach())
    return torch.maximum(hi.double(), -lo.double())


class MaxCalibrator:
    """Running max of |x|; no host sync per batch."""

    def __init__(self) -> None:
        self._amax: torch.Tensor | None = None

    def collect(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        m = _abs_max(x)
        self._amax = m if self._amax is None else torch.maximum(self._amax, m.to(self._amax.device))

    def compute_amax(self) -> float:
        if self._amax is None:
            raise WorkbenchError("max calibrator: no activations were collected")
        amax = float(self._amax)
        if not math.isfinite(amax):
            raise WorkbenchError("max calibrator: activations contain NaN or Inf")
        return amax


@dataclass(frozen=True, eq=False)
class Histogram:
    """Counts of |x| in len(counts) equal bins over [0, upper]."""

    counts: np.ndarray  # float64
    upper: float

    @property
    def num_bins(self) -> int:
        return len(self.counts)

    @property
    def width(self) -> float:
        return self.upper / self.num_bins

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(0.0, self.upper, self.num_bins + 1)


def _rebin(counts: torch.Tensor, old_upper: float, new_upper: float) -> torch.Tensor:
    """Re-bin counts from [0, old_upper] onto as many bins over [0, new_upper], mass uniform within old bins."""
    n = counts.numel()
    cdf = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    pos = torch.arange(n + 1, dtype=torch.float64, device=counts.device) * (new_upper / old_upper)
    idx = pos.floor().clamp(max=n).long()
    within = torch.cat([counts, counts.new_zeros(1)])[idx] * (pos - idx)  # partial bin below each new edge
    new_cdf = torch.minimum(cdf[idx] + within, cdf[-1])
    return new_cdf.diff()


class HistogramCollector:
    """Histogram of |x| over [0, running max], shared by the percentile, mse and entropy calibrators.

    When the range is known in advance (`fix_range`, from a max pass over the same data), no batch ever raises it,
    nothing is re-binned, and the histogram is the same however the data was batched.
    """

    def __init__(self, num_bins: int = 2048) -> None:
        self.num_bins = num_bins
        self._counts: torch.Tensor | None = None  # float64, on the first batch's device
        self._upper = 0.0
        self._zeros = 0  # elements seen while every value so far was 0 (no range to bin them in yet)

    def fix_range(self, upper: float, device: torch.device | str = "cpu") -> None:
        """Bin over [0, upper] from the start; call before `collect`. upper 0 (all-zero data) changes nothing."""
        if self._counts is not None or self._zeros:
            raise RuntimeError("fix_range must come before the first collect")
        if upper > 0:
            self._counts = torch.zeros(self.num_bins, dtype=torch.float64, device=device)
            self._upper = float(upper)

    def collect(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        x = x.detach()
        m = float(_abs_max(x))  # the one host sync per batch
        if not math.isfinite(m):
            raise WorkbenchError("histogram calibrator: activations contain NaN or Inf")
        if m == 0.0 and self._counts is None:
            self._zeros += x.numel()
            return
        if self._counts is None:
            self._counts = torch.zeros(self.num_bins, dtype=torch.float64, device=x.device)
            self._counts[0] = self._zeros
            self._upper = m
        elif m > self._upper:
            self._counts = _rebin(self._counts, self._upper, m)
            self._upper = m
        for chunk in x.reshape(-1).split(_CHUNK):
            h = torch.histc(chunk.abs().float(), bins=self.num_bins, min=0.0, max=self._upper)
            self._counts += h.to(self._counts.device, torch.float64)

    def histogram(self) -> Histogram:
        if self._counts is None:
            what = "every collected activation is 0" if self._zeros else "no activations were collected"
            raise WorkbenchError(f"histogram calibrator: {what}")
        return Histogram(self._counts.cpu().numpy().copy(), self._upper)

    def _amax(self, pick) -> float:
        # All-zero activations get amax 0 like MaxCalibrator; the quantizer owns what a zero range means.
        return 0.0 if self._counts is None and self._zeros else pick(self.histogram())


def percentile_amax(h: Histogram, percentile: float) -> float:
    """Upper edge of the bin where the cumulative count reaches `percentile` % (so at most one bin above truth)."""
    cum = np.cumsum(h.counts)
    idx = int(np.searchsorted(cum, cum[-1] * percentile / 100.0, side="left"))
    return float(h.edges[min(idx, h.num_bins - 1) + 1])


def mse_amax(h: Histogram, start_bin: int = 128, stride: int = 1, block: int = 256,
             fmt: QuantFormat = INT8) -> float:
    """Bin edge minimising the count-weighted squared error of fake-quantizing the bin centers on `fmt`'s grid."""
    edges = h.edges
    centers = (edges[:-1] + edges[1:]) / 2
    cands = np.arange(min(start_bin, h.num_bins), h.num_bins + 1, stride)
    errors = _integer_grid_errors if fmt.integer else _float_grid_errors
    errs = np.concatenate([errors(centers, h.counts, edges[cands[s : s + block]], fmt)
                           for s in range(0, len(cands), block)])  # blocks bound memory to block x num_bins
    return float(edges[cands[int(np.argmin(errs))]])


def _integer_grid_errors(centers: np.ndarray, counts: np.ndarray, amaxes: np.ndarray,
                         fmt: QuantFormat) -> np.ndarray:
    """Squared error of each candidate amax on a uniform grid (INT8's), in float64 numpy: the calibrator the INT8
    caches were made with (ALGORITHM_VERSION 3)."""
    scale = amaxes[:, None] / fmt.qmax
    fq = np.clip(np.round(centers / scale), -fmt.qmax, fmt.qmax) * scale
    return ((fq - centers) ** 2 * counts).sum(axis=1)


def _float_grid_errors(centers: np.ndarray, counts: np.ndarray, amaxes: np.ndarray,
                       fmt: QuantFormat) -> np.ndarray:
    """Squared error of each candidate amax on a floating-point grid (FP8 E4M3), rounded by the quantizer the
    engine uses (quant.quantizer.fake_quantize: float32 scale amax / qmax, saturation, the dtype cast's rounding).
    Bin centers stand for their bins' mass, as for INT8: on heavy-tailed data, centers and 4 points per bin chose
    amaxes whose sample errors differed by under 0.1%."""
    x = torch.from_numpy(centers).float()
    scale = scale_from_amax(torch.from_numpy(amaxes)[:, None], fmt)
    fq = fake_quantize(x.expand(len(amaxes), -1), scale, fmt).double().numpy()
    return ((fq - centers) ** 2 * counts).sum(axis=1)


def entropy_divergences(counts: np.ndarray, thresholds: np.ndarray, levels: int = QMAX + 1) -> np.ndarray:
    """KL(P_i || Q_i) for every threshold i (number of bins kept), TensorRT EntropyCalibrator2 style.

    P_i = counts[:i] with the clipped mass (counts[i:]) added to its last bin. Q_i quantizes counts[:i] (without
    the clipped mass) into `levels` merged groups of consecutive bins and spreads each group's mass uniformly over
    its non-empty bins; empty bins stay empty. Both are normalized. Groups are contiguous bin ranges, so every
    per-group sum is a difference of prefix sums and the whole sweep is a (thresholds x levels) array computation:
      T*KL = sum_j b_j log b_j - B log T + B log Z - sum_groups S_g log(S_g / N_g)   (bins j < i-1)
             + p log(p / q) term for the last bin, which also carries the clipped mass.
    A threshold where the last bin is empty but mass was clipped has Q = 0 where P > 0: divergence inf.
    """
    b = counts.astype(np.float64)
    T = b.sum()
    cum = np.concatenate([[0.0], np.cumsum(b)])
    nz = np.concatenate([[0], np.cumsum(b > 0)])
    blogb = np.concatenate([[0.0], np.cumsum(np.where(b > 0, b * np.log(np.where(b > 0, b, 1.0)), 0.0))])

    i = thresholds[:, None]
    bounds = (np.arange(levels + 1)[None, :] * i + levels - 1) // levels  # group g = bins [bounds[g], bounds[g+1])
    S = np.diff(cum[bounds], axis=1)
    N = np.diff(nz[bounds], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(N > 0, S / np.maximum(N, 1), 1.0)
        sum_s_log_m = np.where(S > 0, S * np.log(mean), 0.0).sum(axis=1)

    i = thresholds
    last = b[i - 1]
    Z = cum[i]
    B = cum[i - 1]
    m_last = mean[:, -1]
    with np.errstate(divide="ignore", invalid="ignore"):
        log_mlast = np.where(last > 0, np.log(m_last), 0.0)
        body = blogb[i - 1] - B * np.log(T) + np.where(B > 0, B * np.log(Z), 0.0) - (sum_s_log_m - last * log_mlast)
        p = last + (T - Z)
        tail = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - np.log(T) - log_mlast + np.log(Z)), 0.0)
    kl = (body + tail) / T
    return np.where((p > 0) & (last <= 0), np.inf, kl)


def entropy_amax(h: Histogram, start_bin: int = 128, stride: int = 1) -> float:
    """Upper edge of the last kept bin for the threshold with least divergence (ties: the larger threshold)."""
    thresholds = np.arange(min(start_bin, h.num_bins), h.num_bins + 1, stride)
    kl = entropy_divergences(h.counts, thresholds)
    best = len(kl) - 1 - int(np.argmin(kl[::-1]))
    return float(h.edges[thresholds[best]])


class PercentileCalibrator(HistogramCollector):
    def __init__(self, percentile: float = 99.99, num_bins: int = 2048) -> None:
        super().__init__(num_bins)
        self.percentile = percentile

    def compute_amax(self) -> float:
        return self._amax(lambda h: percentile_amax(h, self.percentile))


class MseCalibrator(HistogramCollector):
    def __init__(self, num_bins: int = 2048, fmt: QuantFormat = INT8) -> None:
        super().__init__(num_bins)
        self.fmt = fmt

    def compute_amax(self) -> float:
        return self._amax(lambda h: mse_amax(h, fmt=self.fmt))


class EntropyCalibrator(HistogramCollector):
    def compute_amax(self) -> float:
        return self._amax(entropy_amax)


def make_calibrator(method: str, *, percentile: float = 99.99, num_bins: int = 2048) -> Calibrator:
    """A fresh calibrator for one quantization point."""
    if method not in METHODS:
        raise WorkbenchError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "max":
        return MaxCalibrator()
    if not isinstance(num_bins, int) or num_bins < QMAX + 1:
        raise WorkbenchError(f"num_bins must be an integer >= {QMAX + 1} (one per INT8 level), got {num_bins!r}")
    if method == "percentile":
        if not 0.0 < percentile <= 100.0:
            raise WorkbenchError(f"percentile must be in (0, 100], got {percentile!r}")
        return PercentileCalibrator(percentile=percentile, num_bins=num_bins)
    if method in ("mse", "mse-fp8"):
        return MseCalibrator(num_bins=num_bins, fmt=GRIDS[method])
    return EntropyCalibrator(num_bins=num_bins)

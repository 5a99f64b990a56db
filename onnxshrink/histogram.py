"""Streaming value histograms and the calibrators that turn them into quantization ranges.

A `Histogram` folds in one sample at a time: memory is the bin array, whatever the sample count.
Its range is symmetric, [-R, R], with R a power of two: when a larger value arrives R doubles and
pairs of bins merge exactly, so no rebinning error accumulates and one pass over the data suffices.
"""

from __future__ import annotations

import math

import numpy as np

BINS = 4096  # over [-R, R]: at least 2048 bins cover a one-sided (post-ReLU) tensor


class Histogram:
    """`bins=0` keeps only the extremes: all that minmax calibration reads, at a fraction of the cost."""

    def __init__(self, bins: int = BINS):
        if bins % 2:
            raise ValueError("bins must be even")
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.int64)
        self.radius = 0.0  # R; 0 until a nonzero value arrives
        self.min = math.inf
        self.max = -math.inf
        self.seen = 0

    def update(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float32).ravel()
        if values.size == 0:
            return
        low, high = float(values.min()), float(values.max())
        if not (math.isfinite(low) and math.isfinite(high)):  # min/max carry any NaN or inf: filter only then
            values = values[np.isfinite(values)]
            if values.size == 0:
                return
            low, high = float(values.min()), float(values.max())
        self.min, self.max = min(self.min, low), max(self.max, high)
        self.seen += values.size
        if self.bins == 0:
            return
        reach = max(-low, high)
        if reach > self.radius:
            self._grow(reach)
        if self.radius == 0.0:  # all zeros so far: they sit in the middle bin pair
            self.counts[self.bins // 2] += values.size
            return
        # float32 is exact enough to pick one of a few thousand bins, and half the memory traffic
        index = ((values + np.float32(self.radius)) * np.float32(self.bins / (2 * self.radius))).astype(np.int32)
        np.clip(index, 0, self.bins - 1, out=index)
        self.counts += np.bincount(index, minlength=self.bins)

    def update_extremes(self, low: float, high: float) -> None:
        """Fold in a sample known only by its extremes (bins=0 only: there is nothing to bin).
        `seen` then counts samples rather than values; only whether it is zero matters."""
        if self.bins:
            raise ValueError("only an extremes-only Histogram (bins=0) takes extremes")
        if low <= high:
            self.min, self.max = min(self.min, low), max(self.max, high)
            self.seen += 1

    def _grow(self, reach: float) -> None:
        radius = 2.0 ** math.ceil(math.log2(reach)) if reach > 0 else 0.0
        if self.radius == 0.0:
            zeros = self.counts.sum()
            self.counts[:] = 0
            self.radius = radius
            self.counts[self.bins // 2] += zeros  # zeros seen so far land where 0 lives in the new range
            return
        while self.radius < radius:
            # Doubling R: the old bins fold pairwise into the middle half of the new array.
            merged = self.counts.reshape(-1, 2).sum(axis=1)
            self.counts[:] = 0
            quarter = self.bins // 4
            self.counts[quarter:quarter + merged.size] = merged
            self.radius *= 2

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(-self.radius, self.radius, self.bins + 1)

    @property
    def centers(self) -> np.ndarray:
        edges = self.edges
        return (edges[:-1] + edges[1:]) / 2


def calibrate(hist: Histogram, method: str, levels: int = 256, symmetric: bool = False,
              percentile: float = 99.999) -> tuple[float, float]:
    """(low, high) range for a tensor: `minmax`, `percentile`, `entropy` (KL) or `mse` (searched clipping).

    The range always contains 0 so that zero (padding, ReLU floors) is represented exactly."""
    if hist.seen == 0:
        return 0.0, 0.0
    low, high = min(hist.min, 0.0), max(hist.max, 0.0)
    if method != "minmax" and hist.radius > 0 and hist.bins:
        threshold = {"percentile": _percentile_threshold, "entropy": _entropy_threshold,
                     "mse": _mse_threshold}[method](hist, levels, symmetric, percentile)
        low, high = max(low, -threshold), min(high, threshold)
    if symmetric:
        reach = max(-low, high)
        return -reach, reach
    return low, high


def _abs_counts(hist: Histogram) -> np.ndarray:
    """Counts of |x| over [0, R] with bins/2 bins."""
    half = hist.bins // 2
    return hist.counts[half:] + hist.counts[:half][::-1]


def _percentile_threshold(hist, levels, symmetric, percentile) -> float:
    counts = _abs_counts(hist)
    cumulative = np.cumsum(counts)
    index = int(np.searchsorted(cumulative, cumulative[-1] * percentile / 100.0))
    return (index + 1) * hist.radius / counts.size


def _entropy_threshold(hist, levels, symmetric, percentile) -> float:
    """The clipping threshold whose quantized distribution of |x| is closest in KL divergence."""
    counts = _abs_counts(hist).astype(np.float64)
    size = counts.size
    # One-sided tensors use all levels on one side; signed ones split them between two sides.
    one_sided = hist.min >= 0 or hist.max <= 0
    target = levels if one_sided and not symmetric else levels // 2
    best, best_kl = size, math.inf
    present = (counts > 0).astype(np.float64)
    for stop in range(target, size + 1, max(1, (size - target) // 256)):
        reference = counts[:stop].copy()
        reference[-1] += counts[stop:].sum()  # clipped values pile up at the threshold
        # Quantize `stop` bins into `target` levels; spread each level's mass over its nonzero bins.
        starts = (np.arange(target) * stop) // target
        level = np.repeat(np.arange(target), np.diff(np.append(starts, stop)))
        mass = np.add.reduceat(counts[:stop], starts)
        occupied = np.add.reduceat(present[:stop], starts)
        share = np.divide(mass, occupied, out=np.zeros_like(mass), where=occupied > 0)
        candidate = share[level] * present[:stop]
        kl = _kl(reference, candidate)
        if kl < best_kl:
            best, best_kl = stop, kl
    return best * hist.radius / size


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    p = p / p.sum()
    total = q.sum()
    if total == 0:
        return math.inf
    q = q / total
    mask = p > 0
    if np.any(q[mask] == 0):
        return math.inf
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def _mse_threshold(hist, levels, symmetric, percentile) -> float:
    """The clipping threshold that minimizes the expected squared quantization error over the histogram."""
    centers, counts = hist.centers, hist.counts.astype(np.float64)
    keep = counts > 0
    centers, counts = centers[keep], counts[keep]
    reach = max(-hist.min, hist.max)
    candidates = reach * np.linspace(0.05, 1.0, 96)
    base_low, base_high = min(hist.min, 0.0), max(hist.max, 0.0)
    low = np.maximum(base_low, -candidates)[:, None]
    high = np.minimum(base_high, candidates)[:, None]
    if symmetric:
        low, high = -np.maximum(-low, high), np.maximum(-low, high)
    step = (high - low) / (levels - 1)
    inside = (centers >= low) & (centers <= high)
    clipped = np.maximum(low - centers, 0.0) + np.maximum(centers - high, 0.0)
    # Values inside the range err uniformly within half a step; clipped ones by their distance.
    errors = (inside * counts).sum(axis=1) * step[:, 0] ** 2 / 12 + (counts * clipped ** 2).sum(axis=1)
    return float(candidates[int(np.argmin(errors))])

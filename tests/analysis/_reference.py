"""Slow, obvious references: plain Python loops, written independently of the package code."""

from __future__ import annotations

import math

import numpy as np


def moving(series: np.ndarray, window: int, statistic: str = "t") -> list[float]:
    """The moving statistic of one series per centred window: the one-sample t (``"t"``,
    two-pass mean and variance) or Σx/√(Σx²) (``"z"``)."""
    half = window // 2
    out = []
    for s in range(len(series)):
        values = [v for v in series[max(0, s - half) : s + half + 1] if not math.isnan(v)]
        if window == 1:
            out.append(float(series[s]))
        elif statistic == "z":
            q = sum(v * v for v in values)
            out.append(sum(values) / math.sqrt(q) if q > 0 else math.nan)
        elif len(values) < 2:
            out.append(math.nan)
        elif max(values) == min(values):  # the t of a constant: ±inf (0: NaN)
            out.append(math.copysign(math.inf, values[0]) if values[0] != 0 else math.nan)
        else:
            n = len(values)
            mean = sum(values) / n
            sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
            out.append(mean / (sd / math.sqrt(n)))
    return out


def clusters(t: list[float], threshold: float) -> list[tuple[int, int, int, float]]:
    """(start, stop, sign, mass) of every run of same-sign steps beyond ±threshold."""
    found: list[tuple[int, int, int, float]] = []
    s = 0
    while s < len(t):
        sign = 1 if t[s] > threshold else -1 if t[s] < -threshold else 0
        if sign == 0:
            s += 1
            continue
        start, mass = s, 0.0
        while s < len(t) and (t[s] > threshold if sign > 0 else t[s] < -threshold):
            mass += abs(t[s])
            s += 1
        found.append((start, s, sign, mass))
    return found


def null_max(
    d: np.ndarray, flips: np.ndarray, window: int, threshold: float, statistic: str = "t"
) -> np.ndarray:
    """Largest cluster mass per permutation and cell; ``d`` ``[cells, steps]``."""
    out = np.zeros((flips.shape[0], d.shape[0]))
    for p in range(flips.shape[0]):
        for c in range(d.shape[0]):
            t = moving(d[c] * flips[p], window, statistic)
            out[p, c] = max([m for *_, m in clusters(t, threshold)], default=0.0)
    return out


def cluster_pvalues(
    d: np.ndarray, flips: np.ndarray, window: int, threshold: float, statistic: str = "t"
) -> list[tuple[int, int, int, int, float, float]]:
    """(cell, start, stop, sign, mass, p) per cluster, each cell its own family."""
    null = null_max(d, flips, window, threshold, statistic)
    out = []
    for c in range(d.shape[0]):
        for start, stop, sign, mass in clusters(moving(d[c], window, statistic), threshold):
            exceed = sum(1 for v in null[:, c] if v >= mass)
            out.append((c, start, stop, sign, mass, (1 + exceed) / (1 + flips.shape[0])))
    return out

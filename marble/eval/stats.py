"""Evaluation statistics: bootstrap intervals, paired deltas, win rates, composite z-scores, Pareto dominance.

Pure numpy (intervals come back as the evaluation contract's `Interval`); no models, no files. Every
function is NaN-aware in the same way as the rewards: a NaN score means "this reward does not apply to
this prompt" (a specialist reward), so it is dropped, and paired statistics use only the samples where
both models were scored.
"""

from __future__ import annotations

import numpy as np

from marble.eval.contract import Interval


def _finite(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).ravel()  # [N]
    return x[np.isfinite(x)]


def bootstrap_mean_ci(
    x: np.ndarray, *, num_samples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> Interval:
    """Mean of `x` (NaNs dropped) and its percentile-bootstrap confidence interval.

    The percentile bootstrap (Efron & Tibshirani 1993, ch. 13): resample the N values with
    replacement `num_samples` times and take the (1-c)/2 and (1+c)/2 quantiles of the resampled means.
    No values -> NaN everywhere with n=0; one value -> a zero-width interval.
    """
    v = _finite(x)  # [n]
    n = v.size
    if n == 0:
        return Interval(mean=float("nan"), ci_lo=float("nan"), ci_hi=float("nan"), n=0)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(num_samples, n))  # [B, n]
    means = v[idx].mean(axis=1)  # [B]
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return Interval(mean=float(v.mean()), ci_lo=float(lo), ci_hi=float(hi), n=int(n))


def paired_mask(base: np.ndarray, adapter: np.ndarray) -> np.ndarray:
    """Samples scored by both models (the reward applied and returned a finite score): [N] bool."""
    a = np.asarray(base, dtype=np.float64)  # [N]
    b = np.asarray(adapter, dtype=np.float64)  # [N]
    if a.shape != b.shape:
        raise ValueError(f"paired scores need equal shapes, got {a.shape} and {b.shape}")
    return np.isfinite(a) & np.isfinite(b)


def paired_delta_ci(
    base: np.ndarray, adapter: np.ndarray, *, num_samples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> Interval:
    """Mean of adapter - base over paired samples (same prompt and seed) with a bootstrap interval.

    Resampling the pairs (not the two columns independently) keeps the shared-noise correlation,
    which is what makes a same-seed comparison far tighter than two independent means.
    """
    m = paired_mask(base, adapter)  # [N]
    diff = np.asarray(adapter, dtype=np.float64)[m] - np.asarray(base, dtype=np.float64)[m]  # [n]
    return bootstrap_mean_ci(diff, num_samples=num_samples, confidence=confidence, seed=seed)


def win_rate(base: np.ndarray, adapter: np.ndarray) -> float:
    """Share of paired samples where the adapter scores higher than the base; ties count one half."""
    m = paired_mask(base, adapter)  # [N]
    if not m.any():
        return float("nan")
    a = np.asarray(base, dtype=np.float64)[m]  # [n]
    b = np.asarray(adapter, dtype=np.float64)[m]  # [n]
    return float(((b > a).sum() + 0.5 * (b == a).sum()) / m.sum())


def composite_zscores(table: np.ndarray) -> np.ndarray:
    """Composite score per model: the mean over rewards of each column's z-score.

    `table` is [M, K]: M compared models (rows) by K rewards (columns), higher is better. As in the
    MARBLE paper's composite (docs/algorithm.md §7), each column is standardised with the POPULATION std
    (ddof=0) over the M rows; a column where every model scores the same contributes 0. Returns [M].
    """
    t = np.asarray(table, dtype=np.float64)  # [M, K]
    if t.ndim != 2 or t.shape[0] == 0:
        raise ValueError(f"composite_zscores needs an [M, K] table with M >= 1, got shape {t.shape}")
    mu = np.nanmean(t, axis=0, keepdims=True)  # [1, K]
    sd = np.nanstd(t, axis=0, keepdims=True)  # [1, K], population std
    z = np.where(sd > 0, (t - mu) / np.where(sd > 0, sd, 1.0), 0.0)  # [M, K]
    return np.nanmean(z, axis=1)  # [M]


def dominates(a: np.ndarray, b: np.ndarray) -> bool:
    """Pareto dominance for maximisation: `a` is >= `b` on every objective and > on at least one.

    NaN objectives (not measured for one of them) are ignored; with nothing comparable, False.
    """
    x = np.asarray(a, dtype=np.float64)  # [K]
    y = np.asarray(b, dtype=np.float64)  # [K]
    m = np.isfinite(x) & np.isfinite(y)  # [K]
    if not m.any():
        return False
    return bool(np.all(x[m] >= y[m]) and np.any(x[m] > y[m]))

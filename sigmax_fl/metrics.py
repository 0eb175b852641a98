"""Forecast and trading metrics, numpy only, so the federation and ``compare`` agree.

Conventions: ``pred`` is the forecast of the log return over the next ``horizon`` bars made at
the close of t; ``realised`` is what happened. Undefined statistics (a constant forecast has no
correlation) are NaN, never 0, so nobody mistakes "undefined" for "no skill".
"""

from __future__ import annotations

import numpy as np


def mse(pred: np.ndarray, realised: np.ndarray) -> float:
    """Mean squared error, the loss the model is trained on."""
    return float(np.mean((np.asarray(pred, np.float64) - np.asarray(realised, np.float64)) ** 2))


def r2_oos(pred: np.ndarray, realised: np.ndarray) -> float:
    """Out-of-sample R^2 against predicting zero (Campbell-Thompson), the honest baseline."""
    realised = np.asarray(realised, np.float64)
    denom = float(np.sum(realised**2))
    if denom == 0:
        return float("nan")
    return 1.0 - float(np.sum((np.asarray(pred, np.float64) - realised) ** 2)) / denom


def hit_rate(pred: np.ndarray, realised: np.ndarray) -> float:
    """Share of bars where the forecast's sign matches the move; zero moves are left out."""
    pred, realised = np.asarray(pred), np.asarray(realised)
    moved = realised != 0
    if not moved.any():
        return float("nan")
    return float(np.mean(np.sign(pred[moved]) == np.sign(realised[moved])))


def ic(pred: np.ndarray, realised: np.ndarray) -> float:
    """Information coefficient: Pearson correlation of forecast and realised return."""
    pred, realised = np.asarray(pred, np.float64), np.asarray(realised, np.float64)
    if len(pred) < 2 or np.std(pred) == 0 or np.std(realised) == 0:
        return float("nan")
    return float(np.corrcoef(pred, realised)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), as Spearman's rho needs."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def rank_ic(pred: np.ndarray, realised: np.ndarray) -> float:
    """Spearman correlation: IC that one outlier bar cannot dominate."""
    return ic(_ranks(np.asarray(pred)), _ranks(np.asarray(realised)))

"""Forecast and trading metrics, numpy only, so the federation and ``compare`` agree.

Conventions: ``pred`` is the forecast of the log return over the next ``horizon`` bars made at
the close of t (for :func:`qlike` and :func:`vol_correlation`, of the log realised volatility);
``realised`` is what happened. Undefined statistics (a constant forecast has no
correlation) are NaN, never 0, so nobody mistakes "undefined" for "no skill".

NaN-safety: a bar where either ``pred`` or ``realised`` is NaN is a missing bar (an instance
whose test period ended, a cell of an instance-by-date panel) and is left out; the forecast
metrics accept arrays of any shape and use every remaining pair. When nothing is left the
result is NaN. Infinities are not missing data and are kept, so a diverged model scores as
badly as it is.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import numpy as np

BPS = 1e-4
"""One basis point as a fraction."""


def _pairs(pred: np.ndarray, realised: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat float64 copies of the pairs where neither side is missing (NaN)."""
    pred, realised = np.asarray(pred, np.float64), np.asarray(realised, np.float64)
    if pred.shape != realised.shape:
        raise ValueError(f"pred has shape {pred.shape}, realised {realised.shape}: they must match")
    keep = ~(np.isnan(pred) | np.isnan(realised))
    return pred[keep], realised[keep]


def mse(pred: np.ndarray, realised: np.ndarray) -> float:
    """Mean squared error, the loss the model is trained on."""
    pred, realised = _pairs(pred, realised)
    if len(pred) == 0:
        return float("nan")
    return float(np.mean((pred - realised) ** 2))


def r2_oos(pred: np.ndarray, realised: np.ndarray) -> float:
    """Out-of-sample R^2 against predicting zero (Campbell-Thompson), the honest baseline."""
    pred, realised = _pairs(pred, realised)
    denom = float(np.sum(realised**2))
    if denom == 0:
        return float("nan")
    return 1.0 - float(np.sum((pred - realised) ** 2)) / denom


def hit_rate(pred: np.ndarray, realised: np.ndarray) -> float:
    """Share of bars where the forecast's sign matches the move; zero moves are left out."""
    pred, realised = _pairs(pred, realised)
    moved = realised != 0
    if not moved.any():
        return float("nan")
    return float(np.mean(np.sign(pred[moved]) == np.sign(realised[moved])))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    # Written out rather than np.corrcoef: the bootstrap calls this ~10^5 times per compare.
    if len(a) < 2 or a.min() == a.max() or b.min() == b.max():
        return float("nan")  # a constant has no correlation (tested exactly, not by rounding)
    a, b = a - a.mean(), b - b.mean()
    denom = float(np.sqrt(np.dot(a, a) * np.dot(b, b)))
    if denom == 0:
        return float("nan")
    return float(np.dot(a, b)) / denom


def ic(pred: np.ndarray, realised: np.ndarray) -> float:
    """Information coefficient: Pearson correlation of forecast and realised return."""
    return _pearson(*_pairs(pred, realised))


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), as Spearman's rho needs; one sort."""
    order = np.argsort(x, kind="mergesort")
    ordered = x[order]
    first = np.concatenate([[True], ordered[1:] != ordered[:-1]])
    starts = np.flatnonzero(first)
    ends = np.append(starts[1:], len(x))
    ranks = np.empty(len(x), np.float64)
    ranks[order] = ((starts + ends - 1) / 2.0)[np.cumsum(first) - 1]
    return ranks


def rank_ic(pred: np.ndarray, realised: np.ndarray) -> float:
    """Spearman correlation: IC that one outlier bar cannot dominate."""
    pred, realised = _pairs(pred, realised)
    return _pearson(_ranks(pred), _ranks(realised))


def qlike(pred: np.ndarray, realised: np.ndarray) -> float:
    """Mean QLIKE loss of log-volatility forecasts, on variances: RV/PV - ln(RV/PV) - 1.

    ``pred`` and ``realised`` are log volatilities, so the predicted variance is exp(2 pred)
    and RV/PV = exp(2 (realised - pred)). QLIKE is 0 for a perfect forecast and, unlike MSE
    on variances, ranks forecasts correctly against a noisy realised variance (Patton 2011);
    it punishes under-forecasting risk far more than over-forecasting it.
    """
    pred, realised = _pairs(pred, realised)
    if len(pred) == 0:
        return float("nan")
    d = 2.0 * (realised - pred)
    return float(np.mean(np.exp(d) - d - 1.0))


def vol_correlation(pred: np.ndarray, realised: np.ndarray) -> float:
    """Pearson correlation of predicted and realised volatility (not log), from log forecasts.

    The question a risk desk asks: do the forecasts rise and fall with the volatility that
    followed? It ignores the level, which MSE and QLIKE judge.
    """
    pred, realised = _pairs(pred, realised)
    return _pearson(np.exp(pred), np.exp(realised))


def periods_per_year(bar_interval: dt.timedelta | np.timedelta64) -> float:
    """Bars in a 365-day year (crypto trades every day): 365 for daily bars, 8,760 for hourly.

    Annualising from the bar interval, rather than from a setting, keeps a Sharpe ratio of an
    hourly instance comparable with that of a daily one.
    """
    interval = np.timedelta64(bar_interval)
    if not interval > np.timedelta64(0):
        raise ValueError(f"bar interval must be positive, got {bar_interval!r}")
    return float(np.timedelta64(365, "D") / interval)


def strategy_returns(
    pred: np.ndarray, realised: np.ndarray, *, cost_bps: float = 10.0, horizon: int = 1
) -> np.ndarray:
    """Net log return of holding sign(pred) for each holding period, NaN where no trade is held.

    Convention: the position sign(pred_t) (0 for a zero forecast) is taken at the close of t and
    held for ``horizon`` bars. With ``horizon > 1`` the holding periods do not overlap: positions
    are taken at every ``horizon``-th usable bar and the bars in between are NaN, so each
    realised return is counted once. Every change of position costs ``cost_bps`` per unit
    traded, so entering from flat costs 1 x and a flip from long to short 2 x; the first
    position is entered from flat and the last one is left open (marked to market).

    Parameters
    ----------
    pred, realised : numpy.ndarray
        1-D, one value per bar in time order; NaN marks a missing bar, which is skipped.
    cost_bps : float
        Cost per unit of position traded, in basis points.
    horizon : int
        Bars each position is held; ``realised`` is the log return over that many bars.

    Returns
    -------
    numpy.ndarray
        Same length as ``pred``: the net return of each holding period at the bar it starts.
    """
    pred, realised = np.asarray(pred, np.float64), np.asarray(realised, np.float64)
    if pred.ndim != 1 or pred.shape != realised.shape:
        raise ValueError(
            f"strategy returns need two 1-D series of equal length, got {pred.shape} "
            f"and {realised.shape}"
        )
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1 bar, got {horizon}")
    if cost_bps < 0:
        raise ValueError(f"cost_bps must be >= 0, got {cost_bps}")
    held = np.flatnonzero(~(np.isnan(pred) | np.isnan(realised)))[::horizon]
    position = np.sign(pred[held])
    traded = np.abs(np.diff(position, prepend=0.0))
    out = np.full(len(pred), np.nan)
    out[held] = position * realised[held] - cost_bps * BPS * traded
    return out


def sharpe_ratio(returns: np.ndarray, *, periods_per_year: float) -> float:
    """Annualised Sharpe ratio mean / std (ddof 1) x sqrt(periods per year), NaN skipped.

    No risk-free rate is subtracted: the strategies are long/short, self-financing in return
    terms. NaN for fewer than two periods or no variation (a strategy that never trades).
    """
    returns = np.asarray(returns, np.float64)
    returns = returns[~np.isnan(returns)]
    if len(returns) < 2:
        return float("nan")
    sd = float(np.std(returns, ddof=1))
    if sd == 0:
        return float("nan")
    return float(np.mean(returns)) / sd * float(np.sqrt(periods_per_year))


def sharpe_net(
    pred: np.ndarray,
    realised: np.ndarray,
    *,
    periods_per_year: float,
    cost_bps: float = 10.0,
    horizon: int = 1,
) -> float:
    """Annualised Sharpe ratio of trading sign(pred), net of ``cost_bps`` per unit traded.

    See :func:`strategy_returns` for the trading convention; ``periods_per_year`` counts
    bars (:func:`periods_per_year`), and a position held ``horizon`` bars is one of
    ``periods_per_year / horizon`` periods a year.
    """
    returns = strategy_returns(pred, realised, cost_bps=cost_bps, horizon=horizon)
    return sharpe_ratio(returns, periods_per_year=periods_per_year / horizon)


def stationary_bootstrap_indices(
    length: int, n: int, block: float, rng: np.random.Generator
) -> np.ndarray:
    """``n`` resamples of positions 0..length-1 by Politis and Romano's stationary bootstrap.

    Blocks start at uniform random positions and have geometric lengths of mean ``block``,
    wrapping around the end, so each resample keeps the short-range dependence (volatility
    clustering) that an i.i.d. bootstrap would destroy, and is itself stationary.

    Returns
    -------
    numpy.ndarray
        int64, shape (n, length).
    """
    if length < 1 or n < 1:
        raise ValueError(f"need length >= 1 and n >= 1, got length={length}, n={n}")
    if block < 1:
        raise ValueError(f"mean block length must be >= 1 bar, got {block}")
    starts = rng.integers(0, length, size=(n, length))
    new_block = rng.random((n, length)) < 1.0 / block
    new_block[:, 0] = True
    steps = np.arange(length)
    # Position of the latest block start at or before each step, then walk on from there.
    last_start = np.maximum.accumulate(np.where(new_block, steps, 0), axis=1)
    first = np.take_along_axis(starts, last_start, axis=1)
    return (first + steps - last_start) % length


def bootstrap_distribution(
    fn: Callable[[np.ndarray, np.ndarray], float],
    pred: np.ndarray,
    realised: np.ndarray,
    n: int = 1000,
    block: float | None = None,
    seed: int = 0,
) -> np.ndarray:
    """``fn`` on ``n`` stationary block-bootstrap resamples of the bars (see :func:`bootstrap_ci`).

    Two statistics computed with the same ``seed`` on the same bars see the same resamples,
    so the distribution of their difference is their element-wise difference.
    """
    pred, realised = np.asarray(pred), np.asarray(realised)
    if pred.shape[-1] != realised.shape[-1]:
        raise ValueError(
            f"pred and realised need the same number of bars on their last axis, got "
            f"{pred.shape} and {realised.shape}"
        )
    length = realised.shape[-1]
    if length < 2:
        return np.full(n, np.nan)
    block = float(np.ceil(np.sqrt(length))) if block is None else block
    indices = stationary_bootstrap_indices(length, n, block, np.random.default_rng(seed))
    return np.array(
        [fn(np.take(pred, i, axis=-1), np.take(realised, i, axis=-1)) for i in indices],
        dtype=np.float64,
    )


def percentile_interval(stats: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """(alpha/2, 1 - alpha/2) quantiles of the finite bootstrap statistics.

    (NaN, NaN) when the statistic is undefined on more than half of the resamples (e.g. a
    forecast that is almost always constant): such an interval would describe a different
    population than the estimate.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    stats = np.asarray(stats, np.float64)
    finite = stats[np.isfinite(stats)]
    if len(finite) == 0 or len(finite) < len(stats) / 2:
        return float("nan"), float("nan")
    low, high = np.quantile(finite, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def bootstrap_ci(
    fn: Callable[[np.ndarray, np.ndarray], float],
    pred: np.ndarray,
    realised: np.ndarray,
    n: int = 1000,
    alpha: float = 0.05,
    block: float | None = None,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile confidence interval of ``fn(pred, realised)`` by a stationary block bootstrap.

    Returns are autocorrelated in their volatility and test sets hold a few hundred bars, so
    resampling single bars would understate the uncertainty; whole blocks of consecutive bars
    are resampled instead (:func:`stationary_bootstrap_indices`). For a Sharpe ratio, each
    join between two blocks can add one position change that did not happen (at most one in
    ~17 bars with the default block), a small cost next to the interval's width. With
    ``horizon > 1`` the resampled bars no longer fall on the holding-period grid, so its
    intervals are approximate.

    Parameters
    ----------
    fn : callable
        The statistic, ``fn(pred, realised) -> float``; it must accept the resampled arrays.
    pred, realised : numpy.ndarray
        Time is the last axis of both (leading axes, e.g. seeds or instances, are resampled
        together, so cross-sectional dependence is kept); their last axes must match.
    n : int
        Bootstrap resamples.
    alpha : float
        1 - coverage: 0.05 gives a 95 % interval.
    block : float, optional
        Mean block length in bars; default ceil(sqrt(T)), deliberately long (17 bars for 290
        daily bars), because too short a block gives too narrow an interval.
    seed : int
        Seeds the resampling: the same seed gives the same resamples for every model scored
        on the same bars, so their intervals are paired.

    Returns
    -------
    tuple of float
        (low, high); see :func:`percentile_interval` for when it is (NaN, NaN).
    """
    return percentile_interval(
        bootstrap_distribution(fn, pred, realised, n=n, block=block, seed=seed), alpha
    )

"""Forecast and trading metrics against hand computations; the block bootstrap's coverage."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from sigmax_fl import metrics

# -- Sharpe net of costs -------------------------------------------------------------------------


def test_sharpe_matches_hand_computation_with_costs_on_every_flip() -> None:
    # Prepare: long, long, short, short, long; 10 bps a unit of position traded
    pred = np.array([0.3, 0.1, -0.2, -0.5, 0.4])
    realised = np.array([0.01, -0.02, 0.03, -0.01, 0.02])
    # traded units: enter long 1, hold 0, flip 2, hold 0, flip 2
    net = [0.01 - 0.001, -0.02, -0.03 - 0.002, 0.01, 0.02 - 0.002]
    mean = sum(net) / 5
    sd = (sum((x - mean) ** 2 for x in net) / 4) ** 0.5

    # Execute
    got = metrics.sharpe_net(pred, realised, periods_per_year=365, cost_bps=10)

    # Assert
    np.testing.assert_allclose(
        metrics.strategy_returns(pred, realised, cost_bps=10), net, rtol=0, atol=1e-15
    )
    assert got == pytest.approx(mean / sd * 365**0.5, rel=1e-12)
    assert got == pytest.approx(-2.6409, abs=1e-4)


def test_costs_lower_sharpe_and_always_long_pays_once() -> None:
    rng = np.random.default_rng(0)
    realised = rng.normal(0.001, 0.02, 500)
    pred = rng.normal(size=500)
    free = metrics.sharpe_net(pred, realised, periods_per_year=365, cost_bps=0)
    assert metrics.sharpe_net(pred, realised, periods_per_year=365, cost_bps=10) < free
    long_only = metrics.strategy_returns(np.ones(500), realised, cost_bps=10)
    np.testing.assert_allclose(long_only[1:], realised[1:])
    assert long_only[0] == pytest.approx(realised[0] - 0.001)


def test_horizon_two_uses_non_overlapping_periods_and_annualises_per_period() -> None:
    pred = np.array([1.0, -1.0, -1.0, 1.0])
    realised = np.array([0.02, 0.5, -0.01, 0.7])  # 2-bar returns; bars 1 and 3 overlap
    rets = metrics.strategy_returns(pred, realised, cost_bps=10, horizon=2)
    np.testing.assert_allclose(rets, [0.019, np.nan, 0.008, np.nan])
    expected = np.mean([0.019, 0.008]) / np.std([0.019, 0.008], ddof=1) * np.sqrt(365 / 2)
    got = metrics.sharpe_net(pred, realised, periods_per_year=365, cost_bps=10, horizon=2)
    assert got == pytest.approx(expected)


@pytest.mark.parametrize(
    ("interval", "expected"),
    [
        (pd.Timedelta("1D"), 365.0),
        (pd.Timedelta("1h"), 8760.0),
        (np.timedelta64(4, "h"), 2190.0),
        (dt.timedelta(minutes=15), 35040.0),
    ],
)
def test_periods_per_year_from_the_bar_interval(interval, expected) -> None:
    assert metrics.periods_per_year(interval) == expected


def test_periods_per_year_rejects_a_zero_interval() -> None:
    with pytest.raises(ValueError, match="positive"):
        metrics.periods_per_year(pd.Timedelta(0))


def test_sharpe_is_nan_for_a_strategy_that_never_trades_or_too_few_bars() -> None:
    realised = np.array([0.01, -0.02, 0.03])
    assert np.isnan(metrics.sharpe_net(np.zeros(3), realised, periods_per_year=365))
    assert np.isnan(metrics.sharpe_net([1.0], [0.01], periods_per_year=365))


# -- IC and rank IC ------------------------------------------------------------------------------


def test_ic_and_rank_ic_by_hand() -> None:
    # deviations (-2,-1,0,1,2) and (-1,-2,1,0,2): 8 / sqrt(10 * 10)
    assert metrics.ic([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    assert metrics.rank_ic([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    # ties share their mean rank: (0.5, 0.5, 2, 3) against (0, 1, 2, 3) -> 4.5 / sqrt(4.5 * 5)
    assert metrics.rank_ic([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / np.sqrt(22.5))


def test_rank_ic_ignores_monotone_transforms_and_outliers() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=200), rng.normal(size=200)
    assert metrics.rank_ic(np.exp(3 * x), y) == pytest.approx(metrics.rank_ic(x, y))
    y_outlier = y.copy()
    y_outlier[np.argmax(x)] = 1e6
    assert metrics.ic(x, y_outlier) > 0.2
    assert abs(metrics.rank_ic(x, y_outlier) - metrics.rank_ic(x, y)) < 0.02


def test_ic_and_rank_ic_agree_with_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(2)
    x = rng.integers(0, 15, 300).astype(float)  # many ties
    y = x + rng.normal(size=300) * 5
    assert metrics.ic(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
    assert metrics.rank_ic(x, y) == pytest.approx(stats.spearmanr(x, y)[0])


# -- NaN safety ----------------------------------------------------------------------------------


def test_missing_bars_are_left_out_of_every_metric() -> None:
    rng = np.random.default_rng(3)
    pred, realised = rng.normal(size=50), rng.normal(size=50)
    pred_gaps, realised_gaps = pred.copy(), realised.copy()
    pred_gaps[[3, 10]] = np.nan
    realised_gaps[[20]] = np.nan
    keep = np.ones(50, bool)
    keep[[3, 10, 20]] = False
    for fn in (metrics.mse, metrics.r2_oos, metrics.hit_rate, metrics.ic, metrics.rank_ic):
        assert fn(pred_gaps, realised_gaps) == pytest.approx(fn(pred[keep], realised[keep]))
    got = metrics.sharpe_net(pred_gaps, realised_gaps, periods_per_year=365)
    assert got == pytest.approx(
        metrics.sharpe_net(pred[keep], realised[keep], periods_per_year=365)
    )


def test_panels_pool_their_valid_cells() -> None:
    pred = np.array([[0.1, np.nan, 0.3], [0.2, -0.1, np.nan]])
    realised = np.array([[0.2, np.nan, 0.1], [0.1, -0.3, np.nan]])
    assert metrics.mse(pred, realised) == pytest.approx(
        metrics.mse([0.1, 0.3, 0.2, -0.1], [0.2, 0.1, 0.1, -0.3])
    )


def test_undefined_statistics_are_nan_not_zero() -> None:
    nan2 = np.full(2, np.nan)
    for fn in (metrics.mse, metrics.r2_oos, metrics.hit_rate, metrics.ic, metrics.rank_ic):
        assert np.isnan(fn(nan2, nan2))
    assert np.isnan(metrics.ic(np.full(5, 0.1), np.arange(5.0)))  # constant forecast
    assert np.isnan(metrics.hit_rate([1.0, -1.0], [0.0, 0.0]))  # nothing moved
    assert np.isnan(metrics.r2_oos([0.1], [0.0]))
    assert metrics.mse([np.inf], [0.0]) == np.inf  # a diverged model is not a missing bar


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="shape"):
        metrics.mse(np.zeros(3), np.zeros(4))


# -- block bootstrap -----------------------------------------------------------------------------


def _ar1(rng: np.random.Generator, n: int, mean: float, phi: float) -> np.ndarray:
    shocks = rng.normal(size=n)
    x = np.empty(n)
    x[0] = shocks[0] / np.sqrt(1 - phi**2)
    for t in range(1, n):
        x[t] = phi * x[t - 1] + shocks[t]
    return mean + x


def _mean_of_realised(pred: np.ndarray, realised: np.ndarray) -> float:
    return float(np.mean(realised))


def test_block_bootstrap_covers_the_true_mean_of_an_autocorrelated_series() -> None:
    # Prepare: 60 AR(1) series with phi 0.5 and known mean 0.5
    rng = np.random.default_rng(4)
    covered, widths_block, widths_iid = 0, [], []
    for k in range(60):
        x = _ar1(rng, 300, 0.5, 0.5)

        # Execute
        low, high = metrics.bootstrap_ci(_mean_of_realised, x, x, n=300, seed=k)
        iid = metrics.bootstrap_ci(_mean_of_realised, x, x, n=300, block=1, seed=k)

        covered += low <= 0.5 <= high
        widths_block.append(high - low)
        widths_iid.append(iid[1] - iid[0])

    # Assert: near-nominal coverage, and wider than the i.i.d. bootstrap that ignores the
    # autocorrelation (the long-run sd is sqrt(3) x the marginal one for phi = 0.5)
    assert covered / 60 >= 0.85
    assert np.mean(widths_block) > 1.3 * np.mean(widths_iid)


def test_bootstrap_is_seeded_paired_and_resamples_the_last_axis() -> None:
    rng = np.random.default_rng(5)
    pred, realised = rng.normal(size=(3, 100)), rng.normal(size=100)

    def first_row_ic(p: np.ndarray, r: np.ndarray) -> float:
        return metrics.ic(p[0], r)

    a = metrics.bootstrap_distribution(first_row_ic, pred, realised, n=50, seed=7)
    b = metrics.bootstrap_distribution(first_row_ic, pred, realised, n=50, seed=7)
    np.testing.assert_array_equal(a, b)
    low, high = metrics.bootstrap_ci(first_row_ic, pred, realised, n=200, seed=7)
    assert low < metrics.ic(pred[0], realised) < high


def test_stationary_indices_wrap_and_have_the_mean_block_length() -> None:
    idx = metrics.stationary_bootstrap_indices(200, 400, 10.0, np.random.default_rng(6))
    assert idx.shape == (400, 200) and idx.min() >= 0 and idx.max() < 200
    continues = (np.diff(idx, axis=1) % 200) == 1
    mean_block = idx.size / (idx.shape[0] + (~continues).sum())
    assert 8.5 < mean_block < 11.5


def test_interval_is_nan_when_the_statistic_is_mostly_undefined() -> None:
    stats = np.array([0.1, np.nan, np.nan, 0.2])
    assert all(np.isnan(metrics.percentile_interval(stats[:3])))
    assert not any(np.isnan(metrics.percentile_interval(stats)))
    assert all(np.isnan(metrics.bootstrap_ci(metrics.ic, np.ones(50), np.arange(50.0), n=20)))

"""compare --use-case risk: QLIKE and vol correlation, a GARCH baseline fitted on train only,
and the whole comparison written out (small and fast)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sigmax_fl import compare, compare_risk, metrics

from .conftest import run_compare

INSTANCES = "coinbase-btc-usd-1d,bitstamp-eth-usd-1d"
OMEGA, ALPHA, BETA = 0.05, 0.10, 0.85


def test_qlike_is_the_variance_loss_and_punishes_under_forecasts() -> None:
    realised = np.log(np.array([0.01, 0.02, 0.04, np.nan]))
    pred = np.log(np.array([0.02, 0.02, 0.02, 0.03]))
    rv, pv = np.exp(2 * realised[:3]), np.exp(2 * pred[:3])
    expected = np.mean(rv / pv - np.log(rv / pv) - 1)
    assert metrics.qlike(pred, realised) == pytest.approx(expected, rel=1e-12)
    assert metrics.qlike(realised[:3], realised[:3]) == 0.0
    # Forecasting half the volatility costs more than forecasting twice it.
    assert metrics.qlike(realised - np.log(2), realised) > metrics.qlike(
        realised + np.log(2), realised
    )


def test_vol_correlation_is_on_volatilities_not_their_logs() -> None:
    rng = np.random.default_rng(0)
    realised = rng.normal(-4, 0.8, 300)
    pred = realised + rng.normal(0, 0.8, 300)
    assert metrics.vol_correlation(pred, realised) == pytest.approx(
        np.corrcoef(np.exp(pred), np.exp(realised))[0, 1], rel=1e-12
    )
    assert metrics.vol_correlation(pred, realised) != pytest.approx(metrics.ic(pred, realised))
    assert np.isnan(metrics.vol_correlation(np.full(300, -4.0), realised))


@pytest.fixture(scope="module")
def garch_returns() -> pd.Series:
    """4,000 daily log returns of a known GARCH(1,1) (percent^2 parameters)."""
    rng = np.random.default_rng(7)
    n = 4000
    r, var = np.empty(n), OMEGA / (1 - ALPHA - BETA)
    for i in range(n):
        r[i] = np.sqrt(var) * rng.standard_normal()
        var = OMEGA + ALPHA * r[i] ** 2 + BETA * var
    index = pd.date_range("2000-01-01", periods=n, freq="D", tz="UTC")
    return pd.Series(r / compare_risk.GARCH_SCALE, index=index)


def test_garch_recovers_its_parameters_and_forecasts_by_the_recursion(
    garch_returns: pd.Series,
) -> None:
    train_until = garch_returns.index[2999]
    forecast, params = compare_risk.garch_log_vol(garch_returns, train_until, horizon=3)
    assert params["train_returns"] == 3000
    assert params["alpha[1]"] == pytest.approx(ALPHA, abs=0.04)
    assert params["beta[1]"] == pytest.approx(BETA, abs=0.06)
    # One step ahead from the filtered variance, then E[var] decays at alpha + beta.
    w, a, b = params["omega"], params["alpha[1]"], params["beta[1]"]
    t = 3500
    r_t = garch_returns.iloc[t] * compare_risk.GARCH_SCALE
    s1 = w + a * r_t**2 + b * _filtered(garch_returns, params, t)
    steps = [s1, w + (a + b) * s1, w + (a + b) * (w + (a + b) * s1)]
    mean_var = np.exp(2 * forecast.iloc[t]) * compare_risk.GARCH_SCALE**2
    assert mean_var == pytest.approx(np.mean(steps), rel=1e-6)


def _filtered(returns: pd.Series, params: dict[str, float], t: int) -> float:
    """sigma^2_t of the fitted model, by the recursion from arch's own backcast start."""
    from arch import arch_model

    scaled = returns * compare_risk.GARCH_SCALE
    fixed = arch_model(scaled, **compare_risk.GARCH_SPEC).fix(
        [params["omega"], params["alpha[1]"], params["beta[1]"]]
    )
    return float(fixed.conditional_volatility.iloc[t] ** 2)


def test_garch_sees_no_return_after_train_and_no_forecast_sees_its_future(
    garch_returns: pd.Series,
) -> None:
    train_until = garch_returns.index[2999]
    forecast, params = compare_risk.garch_log_vol(garch_returns, train_until, horizon=2)
    changed = garch_returns.copy()
    changed.iloc[3500] *= 10.0
    forecast2, params2 = compare_risk.garch_log_vol(changed, train_until, horizon=2)
    assert params2 == params  # fitted on the training returns alone
    # Filtered, not refitted: a shock at bar 3500 reaches forecasts made at 3500 and after.
    np.testing.assert_array_equal(forecast.iloc[:3500], forecast2.iloc[:3500])
    assert (forecast2.iloc[3500:3510] > forecast.iloc[3500:3510]).all()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("compare-risk")
    return run_compare(out, "--use-case", "risk", "--data-sources", INSTANCES, "--horizon", "2")


def test_risk_compare_writes_every_model_baseline_and_difference(run: Path) -> None:
    result = json.loads((run / "compare.json").read_text())
    markdown = (run / "compare.md").read_text()
    assert result["use_case"] == "risk" and result["config"]["target"] == "volatility"
    assert result["config"]["horizon"] == 2
    assert set(result["scopes"]) == {*INSTANCES.split(","), compare.POOLED_SCOPE}
    for scope in result["scopes"].values():
        assert set(scope["models"]) == {*compare.KINDS, *compare_risk.BASELINES}
        for model in scope["models"].values():
            assert set(model) == set(compare_risk.COLUMNS)
            qlike = model["qlike"]
            assert qlike["value"] > 0 and qlike["ci_low"] <= qlike["value"] <= qlike["ci_high"]
        assert set(scope["differences"]) == {f"{a} - {b}" for a, b in compare_risk.DIFFERENCES}
    # Volatility clusters: GARCH's forecasts move with realised volatility on the bundled data.
    assert result["scopes"][compare.POOLED_SCOPE]["models"]["garch"]["vol_corr"]["value"] > 0.05
    for instance in INSTANCES.split(","):
        assert 0.5 < result["garch"][instance]["persistence"] <= 1.0
    for label in compare_risk.LABELS.values():
        assert label in markdown
    assert "hit rate" not in markdown and "Sharpe" not in markdown

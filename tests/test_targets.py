"""Targets: the realised window starts after t (tested by perturbing returns), cached apart,
scored with the volatility metrics, and trained end to end by the app with use-case = risk."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sigmax_fl import task
from sigmax_fl.data import resolve_source
from sigmax_fl.dataset import Recipe, build
from sigmax_fl.deploy.flwr_cli import FlwrHome
from sigmax_fl.features import make_features
from sigmax_fl.model import build_model
from sigmax_fl.settings import ConfigError, Settings
from sigmax_fl.targets import (
    forward_return,
    log_returns,
    make_target,
    realised_volatility,
    trailing_volatility,
)

from .conftest import DEFAULT_INSTANCES, simulate

Target = Callable[[pd.DataFrame, int], pd.Series]


def _bars(returns: np.ndarray) -> pd.DataFrame:
    """Daily bars whose close-to-close log returns are ``returns`` (the first bar has none)."""
    close = 100.0 * np.exp(np.concatenate([[0.0], np.cumsum(returns)]))
    index = pd.date_range("2020-01-01", periods=len(close), freq="D", tz="UTC")
    return pd.DataFrame(
        {"open": close, "high": close * 1.01, "low": close * 0.99, "close": close, "volume": 1.0},
        index=index,
    )


def _dependence(fn: Target, horizon: int, n: int = 40) -> dict[int, set[int]]:
    """For each bar k: the rows t whose target changes when only the return r_k changes."""
    returns = np.random.default_rng(1).normal(0, 0.02, n - 1)
    base = fn(_bars(returns), horizon).to_numpy()
    out = {}
    for k in range(1, n):
        bumped = returns.copy()
        bumped[k - 1] *= 3.0  # r_k: the return from bar k-1 to bar k
        changed = fn(_bars(bumped), horizon).to_numpy()
        # Not exact equality: every later close moves, so unaffected returns change by rounding.
        differs = ~np.isclose(base, changed, rtol=0, atol=1e-9) & ~(
            np.isnan(base) & np.isnan(changed)
        )
        out[k] = set(np.flatnonzero(differs).tolist())
    return out


def _uses_only_bars_after_t(fn: Target, horizon: int, n: int = 40) -> bool:
    """True iff the target at t moves with r_{t+1} .. r_{t+horizon} and nothing else.

    Rows t > n - 1 - horizon have no complete window and no target.
    """
    return all(
        rows == {t for t in range(k - horizon, k) if 0 <= t <= n - 1 - horizon}
        for k, rows in _dependence(fn, horizon, n).items()
    )


def _includes_bar_t(bars: pd.DataFrame, horizon: int) -> pd.Series:
    """A leaky volatility: the window r_t .. r_{t+h-1} contains the return ending at t."""
    return realised_volatility(bars, horizon).shift(1)


def _one_bar_too_far(bars: pd.DataFrame, horizon: int) -> pd.Series:
    """A wrong window r_{t+2} .. r_{t+h+1}."""
    return realised_volatility(bars, horizon).shift(-1)


@pytest.mark.parametrize("horizon", [1, 3])
@pytest.mark.parametrize("fn", [forward_return, realised_volatility])
def test_target_at_t_uses_only_returns_t_plus_1_to_t_plus_h(fn: Target, horizon: int) -> None:
    assert _uses_only_bars_after_t(fn, horizon)


@pytest.mark.parametrize("leaky", [_includes_bar_t, _one_bar_too_far, trailing_volatility])
def test_the_window_check_catches_a_target_looking_at_or_before_t(leaky: Target) -> None:
    assert not _uses_only_bars_after_t(leaky, 3)


def test_volatility_is_log_root_mean_square_and_trailing_is_its_past() -> None:
    returns = np.random.default_rng(2).normal(0, 0.03, 30)
    bars = _bars(returns)
    vol = realised_volatility(bars, 4)
    r = log_returns(bars).to_numpy()
    assert vol.iloc[10] == pytest.approx(np.log(np.sqrt(np.mean(r[11:15] ** 2))), abs=1e-12)
    assert vol.iloc[-4:].isna().all() and vol.iloc[:-4].notna().all()
    pd.testing.assert_series_equal(
        trailing_volatility(bars, 4).iloc[8:], vol.shift(4).iloc[8:], check_names=False
    )
    with pytest.raises(ValueError, match="unknown target 'variance'"):
        make_target(bars, "variance", 4)


def test_a_window_of_flat_bars_is_dropped_and_counted_not_minus_infinity() -> None:
    returns = np.random.default_rng(3).normal(0, 0.02, 120)
    returns[90:92] = 0.0  # r_91 and r_92 (into bars 91 and 92) are zero
    X, y = make_features(_bars(returns), horizon=2, target="volatility")
    assert np.isfinite(y.to_numpy()).all()
    assert X.attrs["dropped"]["target_undefined"] == 1  # only t = 90 sees r_91, r_92 = 0, 0
    index = _bars(returns).index
    assert index[90] not in y.index and index[89] in y.index and index[91] in y.index


def test_recipe_key_and_arrays_differ_by_target() -> None:
    source = resolve_source(DEFAULT_INSTANCES[2])
    returns_recipe = Recipe.of(Settings())
    risk_recipe = Recipe.of(Settings(use_case="risk"))
    assert risk_recipe.target == "volatility" and returns_recipe.target == "return"
    assert risk_recipe.key(source) != returns_recipe.key(source)
    data = build(source, risk_recipe)
    assert np.isfinite(data.y("train")).all()
    # Log daily volatility of ETH: a few percent a day, far from the next return's scale.
    assert -5.0 < data.y("train").mean() < -3.0


def test_volatility_evaluation_reports_qlike_and_vol_correlation_not_hit_rate() -> None:
    rng = np.random.default_rng(4)
    X = rng.normal(size=(200, 50)).astype(np.float32)
    y = rng.normal(-4, 0.5, 200).astype(np.float32)
    model = build_model("trading-mlp", seed=0)
    scores = task.evaluate(model, X, y, target="volatility")
    assert set(scores) == {"loss", "qlike", "vol_corr"}
    assert scores["qlike"] > 0 and -1 <= scores["vol_corr"] <= 1
    assert {"hit_rate", "ic", "rank_ic"} <= set(task.evaluate(model, X, y))


def test_early_stopping_metric_must_be_one_the_target_reports() -> None:
    assert Settings(use_case="risk", early_stopping_metric="qlike").target == "volatility"
    with pytest.raises(ConfigError, match="'early-stopping-metric' = 'ic'.*target = 'volatility'"):
        Settings(use_case="risk", early_stopping_metric="ic")
    with pytest.raises(ConfigError, match="'early-stopping-metric' = 'qlike'.*target = 'return'"):
        Settings(early_stopping_metric="qlike")


@pytest.mark.integration
def test_app_trains_the_volatility_model_with_use_case_risk(
    simulation: FlwrHome, tmp_path: Path
) -> None:
    outputs = tmp_path / "outputs"
    config = {
        "use-case": "risk",
        "num-server-rounds": 2,
        "local-epochs": 1,
        "data-sources": ",".join(DEFAULT_INSTANCES[2:]),
        "outputs-dir": str(outputs),
        "run-name": "risk",
    }
    simulate(simulation, config, 2)

    run_dir = outputs / "risk"
    assert json.loads((run_dir / "run_config.json").read_text())["target"] == "volatility"
    history = json.loads((run_dir / "history.json").read_text())
    assert [r["round"] for r in history] == [1, 2]
    for record in history:
        evaluate = record["evaluate"]
        assert {"val_loss", "qlike", "vol_corr"} <= set(evaluate)
        assert not {"hit_rate", "ic", "rank_ic"} & set(evaluate)
        assert np.isfinite(evaluate["qlike"]) and -1 <= evaluate["vol_corr"] <= 1
        for instance in DEFAULT_INSTANCES[2:]:
            assert "qlike" in record["instances"][instance]["evaluate"]
    # The model learned the level of log volatility (about -4), not of returns (about 0).
    model = build_model("trading-mlp")
    model.load_state_dict(torch.load(run_dir / "final_model.pt", weights_only=True))
    data = build(resolve_source(DEFAULT_INSTANCES[2]), Recipe.of(Settings(use_case="risk")))
    assert task.predict(model, data.X("val")).mean() < -2.0

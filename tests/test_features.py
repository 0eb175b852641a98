"""The 50 features: finite, causal, gap-aware; the shared calendar; train-only scaling."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sigmax_fl.data import load_ohlcv, resolve_source
from sigmax_fl.dataset import Recipe, build
from sigmax_fl.features import FEATURE_NAMES, WARMUP_BARS, Calendar, Scaler, make_features
from sigmax_fl.settings import Settings

from .conftest import DEFAULT_INSTANCES

RECIPE = Recipe(1, "3d", Settings().train_end, Settings().val_end, "strict")


@pytest.fixture(scope="module")
def btc() -> pd.DataFrame:
    return load_ohlcv(resolve_source("coinbase-btc-usd-1d").path)


def test_exactly_50_finite_float32_features(btc: pd.DataFrame) -> None:
    X, y = make_features(btc)
    assert X.shape[1] == 50 and list(X.columns) == list(FEATURE_NAMES)
    assert len(set(FEATURE_NAMES)) == 50
    assert (X.dtypes == np.float32).all()
    assert np.isfinite(X.to_numpy()).all() and np.isfinite(y.to_numpy()).all()
    assert len(X) >= len(btc) - WARMUP_BARS - 3


def test_target_is_next_log_return(btc: pd.DataFrame) -> None:
    _, y = make_features(btc, horizon=2)
    t = y.index[100]
    pos = btc.index.get_loc(t)
    assert y.loc[t] == pytest.approx(np.log(btc["close"].iloc[pos + 2] / btc["close"].iloc[pos]))


def test_no_look_ahead(btc: pd.DataFrame) -> None:
    # Changing every bar after t must leave every feature at or before t unchanged.
    X, _ = make_features(btc)
    cut = btc.index[900]
    rng = np.random.default_rng(0)
    changed = btc.copy()
    after = changed.index > cut
    factor = rng.uniform(0.5, 2.0, size=after.sum())
    for col in ("open", "high", "low", "close"):
        changed.loc[after, col] *= factor
    changed.loc[after, "volume"] *= rng.uniform(0, 3, size=after.sum())
    X2, _ = make_features(changed)
    upto = X.index <= cut
    pd.testing.assert_frame_equal(X.loc[upto], X2.loc[X2.index <= cut])
    assert not X.loc[~upto].iloc[5:].equals(X2.loc[X2.index > cut].iloc[5:])


def test_target_spanning_a_long_gap_is_dropped(btc: pd.DataFrame) -> None:
    X, _ = make_features(btc, max_gap="3d")
    assert pd.Timestamp("2019-03-19", tz="UTC") not in X.index  # next close is 13 days later
    assert pd.Timestamp("2019-03-18", tz="UTC") in X.index
    assert pd.Timestamp("2019-04-01", tz="UTC") in X.index  # features run in trading time
    assert X.attrs["dropped"]["target_spans_gap"] == 1
    X_long, _ = make_features(btc, max_gap="14d")
    assert pd.Timestamp("2019-03-19", tz="UTC") in X_long.index


def test_too_few_bars_is_a_clear_error(btc: pd.DataFrame) -> None:
    short = btc.iloc[:50].copy()
    short.attrs = {"source": "short.csv"}
    with pytest.raises(ValueError, match="short.csv: 50 bars are too few"):
        make_features(short)


@pytest.fixture(scope="module")
def instances() -> dict:
    return {name: build(resolve_source(name), RECIPE) for name in DEFAULT_INSTANCES}


def test_splits_share_one_calendar_with_embargo(instances: dict) -> None:
    calendar = Calendar.from_strings(RECIPE.train_end, RECIPE.val_end, embargo=1)
    ends = {}
    for name, data in instances.items():
        t = {s: pd.to_datetime(data.arrays[f"t_{s}"], utc=True) for s in ("train", "val", "test")}
        assert all(len(v) > 100 for v in t.values()), name
        assert t["train"].max() < calendar.train_end and t["val"].min() > calendar.train_end
        assert t["val"].max() < calendar.val_end and t["test"].min() > calendar.val_end
        ends[name] = t
    # No instance trains on a period another instance validates or tests on.
    last_train = max(t["train"].max() for t in ends.values())
    first_val = min(t["val"].min() for t in ends.values())
    last_val = max(t["val"].max() for t in ends.values())
    first_test = min(t["test"].min() for t in ends.values())
    assert last_train < first_val and last_val < first_test


def test_embargo_drops_rows_at_each_boundary() -> None:
    index = pd.date_range("2020-01-01", periods=30, freq="D", tz="UTC")
    calendar = Calendar.from_strings("2020-01-10", "2020-01-20", embargo=2)
    split = calendar.split(index)
    assert index[split["train"]].max() == pd.Timestamp("2020-01-08", tz="UTC")
    assert index[split["val"]].min() == pd.Timestamp("2020-01-13", tz="UTC")
    assert index[split["val"]].max() == pd.Timestamp("2020-01-18", tz="UTC")
    assert index[split["test"]].min() == pd.Timestamp("2020-01-23", tz="UTC")


def test_scaler_fitted_on_training_rows_alone(instances: dict) -> None:
    data = instances["coinbase-btc-usd-1d"]
    X_train, X_test = data.X("train"), data.X("test")
    varying = X_train.std(axis=0) > 0
    np.testing.assert_allclose(X_train.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(X_train.std(axis=0)[varying], 1, atol=1e-3)
    # Constant columns (time of day on daily bars) become exact zeros, not NaN.
    hour = FEATURE_NAMES.index("hour_sin")
    assert not varying[hour] and (X_train[:, hour] == 0).all() and (X_test[:, hour] == 0).all()
    assert np.isfinite(X_test).all()
    # The test split is scaled with the training statistics, so it is not standardised itself.
    assert np.abs(X_test.mean(axis=0)[varying]).max() > 0.1


def test_scaler_ignores_later_rows() -> None:
    rng = np.random.default_rng(0)
    train = rng.normal(3, 2, size=(500, 4))
    scaler = Scaler.fit(train)
    np.testing.assert_allclose(scaler.mean, train.mean(axis=0))
    with pytest.raises(ValueError, match="zero training rows"):
        Scaler.fit(np.empty((0, 4)))

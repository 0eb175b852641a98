"""Synthetic venues: deterministic, many, labelled, like the real series, with a known signal."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sigmax_fl import dataset
from sigmax_fl.data import (
    DataError,
    load_ohlcv,
    parse_sources,
    resolve_source,
    source_for_node,
    synthetic,
)
from sigmax_fl.data.calibration import oracle_r2, return_stats
from sigmax_fl.dataset import Recipe, build, load_instance
from sigmax_fl.features import Scaler, make_features
from sigmax_fl.settings import Settings

from .conftest import DATA

RECIPE = Recipe(1, "3d", Settings().train_end, Settings().val_end, "strict")


def test_same_seed_same_bars_and_instance_k_does_not_depend_on_n() -> None:
    spec = synthetic.SyntheticSpec(seed=3, signal=0.02)
    first = synthetic.generate(spec, 7).bars
    synthetic.latent.cache_clear()  # regenerate from scratch, not from the cache
    again = synthetic.generate(spec, 7).bars
    pd.testing.assert_frame_equal(first, again)

    in_ten = parse_sources("synthetic:10:seed=3:signal=0.02")[7]
    in_thousand = parse_sources("synthetic:1000:seed=3:signal=0.02")[7]
    assert in_ten.path == in_thousand.path == spec.path(7)
    assert in_ten.instance_id == "synthetic-0007"

    other_seed = synthetic.generate(synthetic.SyntheticSpec(seed=4, signal=0.02), 7).bars
    other_venue = synthetic.generate(spec, 8).bars
    assert not np.allclose(first["close"], other_seed["close"][: len(first)])
    # Venues of one seed share the latent path: close to each other, never equal.
    joined = (
        first.set_index("timestamp")["close"]
        .to_frame("a")
        .join(other_venue.set_index("timestamp")["close"].rename("b"), how="inner")
    )
    ratio = np.log(joined["a"] / joined["b"])
    assert 0 < ratio.abs().median() < 0.01


def test_a_thousand_instances_of_about_a_thousand_bars() -> None:
    sources = parse_sources("synthetic:1000:start=2017-01-01:end=2019-09-27")
    assert [s.instance_id for s in sources[:2]] == ["synthetic-0000", "synthetic-0001"]
    assert sources[-1].instance_id == "synthetic-0999"
    assert {s.venue for s in sources} == {"synthetic"}
    spec, _ = synthetic.parse_spec(sources[0].path)
    closes = [synthetic.generate(spec, i).bars["close"].iloc[-1] for i in range(1000)]
    assert len(set(closes)) == 1000  # each venue its own microstructure
    assert len(spec.index()) == 1000


def test_loaded_instance_is_canonical_labelled_and_fits_the_default_calendar() -> None:
    bars = load_ohlcv("synthetic:instance=12:seed=5")
    assert str(bars.index.tz) == "UTC" and bars.index.is_monotonic_increasing
    assert list(bars.columns) == ["open", "high", "low", "close", "volume"]
    assert (bars["high"] >= bars[["open", "close"]].max(axis=1)).all()
    assert (bars["low"] <= bars[["open", "close"]].min(axis=1)).all()
    label = bars.attrs["synthetic"]
    assert label["venue"] == "synthetic" and label["instance_id"] == "synthetic-0012"
    assert bars.attrs["source"].startswith("synthetic:instance=12:seed=5")
    assert bars.index[0] == pd.Timestamp("2016-01-01", tz="UTC")
    assert bars.index[-1] == pd.Timestamp("2019-12-31", tz="UTC")

    data = build(resolve_source("synthetic:instance=12:seed=5"), RECIPE)
    assert all(data.rows(split) > 150 for split in ("train", "val", "test"))
    assert data.report["venue"] == "synthetic"


def test_gaps_and_flat_bars_exist_and_are_reported_not_filled() -> None:
    reports = [load_ohlcv(f"synthetic:instance={i}:bar=1h").attrs["report"] for i in range(8)]
    assert sum(r["gaps"] for r in reports) > 0 and sum(r["zero_volume_bars"] for r in reports) > 0
    assert all(r["repairs"] == {} for r in reports)
    assert all(r["rows"] + r["missing_bars"] == 4 * 365 * 24 + 24 for r in reports)


def test_statistics_near_the_real_series() -> None:
    # Bands: the median over seeds within these distances of the real series' figures
    # (a 4-year daily sample's kurtosis easily varies by a factor of 2 between seeds).
    real_daily = return_stats(load_ohlcv(DATA / "Coinbase_BTCUSD_d.csv").loc["2016":])
    real_hourly = return_stats(load_ohlcv(DATA / "Coinbase_BTCUSD_1h.csv", policy="repair"))
    for bar, real, seeds in (("1d", real_daily, 12), ("1h", real_hourly, 3)):
        specs = [synthetic.SyntheticSpec(seed=s, bar=bar) for s in range(seeds)]
        sim = pd.DataFrame([return_stats(synthetic.load(spec.path(0))) for spec in specs]).median()
        assert sim["sd"] == pytest.approx(real["sd"], rel=0.2), bar
        assert 0.5 < sim["excess_kurtosis"] / real["excess_kurtosis"] < 2.0, bar
        for lag in (1, 5, 20):
            assert abs(sim[f"acf_abs_{lag}"] - real[f"acf_abs_{lag}"]) < 0.08, (bar, lag)


def test_stated_true_r2_matches_a_large_sample() -> None:
    spec = synthetic.SyntheticSpec(seed=1, signal=0.05, bar="1h")
    stated, measured = oracle_r2(spec, range(2))  # 2 x 35,000 bars
    assert stated == pytest.approx(0.05, rel=0.002)
    assert measured == pytest.approx(stated, abs=0.01)


def ridge_out_of_sample_r2(text: str) -> float:
    """Fit ridge on the first 60 % of each instance's rows (pooled), score the rest."""
    train, test = [], []
    for source in parse_sources(text):
        X, y = make_features(load_ohlcv(source.path))
        cut = int(len(X) * 0.6)
        train.append((X.to_numpy(np.float64)[:cut], y.to_numpy()[:cut]))
        test.append((X.to_numpy(np.float64)[cut:], y.to_numpy()[cut:]))
    X_train, y_train = (np.concatenate(parts) for parts in zip(*train, strict=True))
    X_test, y_test = (np.concatenate(parts) for parts in zip(*test, strict=True))
    scaler = Scaler.fit(X_train)
    A = np.c_[np.ones(len(X_train)), scaler.transform(X_train)]
    B = np.c_[np.ones(len(X_test)), scaler.transform(X_test)]
    # Ridge, because ret_k is a sum of ret_1 and its lags: plain least squares is singular.
    penalty = np.eye(A.shape[1]) * 0.01 * len(A)
    penalty[0, 0] = 0
    w = np.linalg.solve(A.T @ A + penalty, A.T @ y_train)
    residual = y_test - B @ w
    return 1 - (residual**2).sum() / ((y_test - y_test.mean()) ** 2).sum()


def test_planted_signal_is_recoverable_from_the_50_features() -> None:
    # Over seeds 0..9 this fit recovers 0.48 .. 0.95 of the true R^2 (the oracle scales by
    # the next bar's volatility, which a linear model cannot); without a signal it loses.
    spec = "bar=1h:start=2018-01-01:end=2018-12-31"
    planted = ridge_out_of_sample_r2(f"synthetic:2:seed=0:signal=0.1:{spec}")
    assert 0.3 * 0.1 < planted < 1.1 * 0.1
    assert ridge_out_of_sample_r2(f"synthetic:2:seed=0:{spec}") < 0.005


def test_sources_expand_mix_and_reach_nodes() -> None:
    text = "coinbase-btc-usd-1d,synthetic:3:seed=7:signal=0.02"
    sources = parse_sources(text)
    assert [s.instance_id for s in sources] == [
        "coinbase-btc-usd-1d",
        "synthetic-0000",
        "synthetic-0001",
        "synthetic-0002",
    ]
    assert sources[2].path == synthetic.SyntheticSpec(seed=7, signal=0.02).path(1)

    node = source_for_node({"partition-id": 2, "num-partitions": 4}, text)
    assert (node.instance_id, node.venue) == ("synthetic-0001", "synthetic")
    deployed = source_for_node(
        {"data-path": "synthetic:instance=7:seed=3", "venue": "binance", "instance-id": "desk"},
        "",
    )
    # Always labelled synthetic, whatever the node config calls it.
    assert (deployed.instance_id, deployed.venue) == ("synthetic-desk", "synthetic")
    assert load_ohlcv(deployed.path).attrs["synthetic"]["spec"]["seed"] == 3


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("synthetic:0", "N must be at least 1"),
        ("synthetic:5:bogus=1", "'bogus=1' is not one of"),
        ("synthetic:5:bar=5m", "bar='5m' is not one of \\['1d', '1h'\\]"),
        ("synthetic:5:signal=1.5", "signal='1.5' is not a number in \\[0, 1\\)"),
        ("synthetic:2:instance=1", "either a count N or instance=K"),
        ("synthetic:2,synthetic:2", "appears twice"),
        ("synthetic:5:start=2019-01-01:end=2018-01-01", "start is after end"),
    ],
)
def test_bad_synthetic_entries_are_named(entry: str, message: str) -> None:
    with pytest.raises(DataError, match=message) as err:
        parse_sources(entry)
    assert "data-sources" in str(err.value)


def test_feature_cache_key_follows_the_spec_without_a_file() -> None:
    key = RECIPE.key(resolve_source("synthetic:instance=1"))
    assert key == RECIPE.key(resolve_source("synthetic:instance=1:seed=0:bar=1d"))
    assert key != RECIPE.key(resolve_source("synthetic:instance=1:seed=1"))
    assert key != RECIPE.key(resolve_source("synthetic:instance=2"))


def _damage(npz: Path, meta: Path, damage: str) -> Path:
    """Damage a cache as a power cut, a bad disk or another program could; the file at fault."""
    whole = npz.read_bytes()
    if damage == "empty arrays":
        npz.write_bytes(b"")
    elif damage == "arrays cut short":
        npz.write_bytes(whole[: len(whole) // 2])
    elif damage == "an array missing":
        with np.load(npz) as stored:
            kept = {k: v for k, v in stored.items() if k != "y_train"}
        with npz.open("wb") as handle:
            np.savez(handle, **kept)
    elif damage == "arrays without rows":
        with np.load(npz) as stored:
            scalars = {k: np.float32(0) for k in stored}
        with npz.open("wb") as handle:
            np.savez(handle, **scalars)
    elif damage == "empty report":
        meta.write_bytes(b"")
        return meta
    elif damage == "report without its fields":
        meta.write_text("{}")
        return meta
    else:  # "report not an object"
        meta.write_text("null")
        return meta
    return npz


@pytest.mark.parametrize(
    "damage",
    [
        "empty arrays",
        "arrays cut short",
        "an array missing",
        "arrays without rows",
        "empty report",
        "report without its fields",
        "report not an object",
    ],
)
def test_a_feature_cache_that_cannot_be_used_is_built_again_and_named(
    damage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: an instance's cached features, damaged, and a fresh process (nothing in memory)
    source = resolve_source("synthetic:instance=2:seed=43")
    monkeypatch.setattr(dataset, "_MEMORY", {})
    built = load_instance(source, RECIPE, tmp_path)
    (npz,) = tmp_path.glob("*.npz")
    at_fault = _damage(npz, npz.with_suffix(".json"), damage)
    monkeypatch.setattr(dataset, "_MEMORY", {})

    # Execute
    with caplog.at_level(logging.WARNING, logger="flwr.sigmax_fl.dataset"):
        again = load_instance(source, RECIPE, tmp_path)

    # Assert: the file at fault named, the same arrays and report built again from the source,
    # the cache whole again
    assert f"cannot use the feature cache {at_fault} (" in caplog.text
    assert again.arrays.keys() == built.arrays.keys() == dataset.CACHED_ARRAYS
    for name, array in built.arrays.items():
        np.testing.assert_array_equal(again.arrays[name], array)
    assert again.report == built.report and again.report.keys() >= dataset.CACHED_REPORT
    monkeypatch.setattr(dataset, "_MEMORY", {})
    caplog.clear()
    assert load_instance(source, RECIPE, tmp_path).report == built.report
    assert "feature cache" not in caplog.text
    if os.name == "posix":
        assert stat.S_IMODE(npz.stat().st_mode) == 0o600
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".npz"]

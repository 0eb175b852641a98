"""Bundled files load to the canonical frame; bad input is a DataError naming file, row, field."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sigmax_fl.data import (
    BUNDLED,
    DataError,
    load_ohlcv,
    parse_sources,
    resolve_source,
    source_for_node,
)

from .conftest import DATA, DEFAULT_INSTANCES

GAP_START, GAP_END = pd.Timestamp("2019-03-19", tz="UTC"), pd.Timestamp("2019-04-01", tz="UTC")


@pytest.mark.parametrize("name", sorted(set(BUNDLED) - {"coinbase-btc-usd-1h"}))
def test_bundled_daily_series_load_canonical(name: str) -> None:
    bars = load_ohlcv(resolve_source(name).path)
    assert isinstance(bars.index, pd.DatetimeIndex) and str(bars.index.tz) == "UTC"
    assert bars.index.is_monotonic_increasing and bars.index.is_unique
    assert list(bars.columns) == ["open", "high", "low", "close", "volume"]
    assert all(dtype == np.float64 for dtype in bars.dtypes)
    assert np.isfinite(bars.to_numpy()).all()
    assert bars.attrs["bar_interval"] == pd.Timedelta("1D")
    # The 12-day outage common to all four is reported as a gap, not filled.
    assert not ((bars.index > GAP_START) & (bars.index < GAP_END)).any()
    assert bars.attrs["report"]["gaps"] == 1 and bars.attrs["report"]["missing_bars"] == 12


def test_wide_file_leading_empty_rows_are_not_bars() -> None:
    eth = load_ohlcv(DATA / "bitstamp_BTC_ETH_LTC_USD_d.csv#ETH")
    assert eth.index[0] == pd.Timestamp("2017-11-09", tz="UTC")
    ltc = load_ohlcv(DATA / "bitstamp_BTC_ETH_LTC_USD_d.csv", asset="LTC")
    assert ltc.index[0] == pd.Timestamp("2017-06-25", tz="UTC")


def test_hourly_file_has_real_corruption_strict_refuses_repair_counts() -> None:
    # The hourly CryptoDataDownload file has a few rows out of order around 2017-11-12.
    path = DATA / "Coinbase_BTCUSD_1h.csv"
    with pytest.raises(
        DataError, match=r"Coinbase_BTCUSD_1h.csv, row \d+, field 'timestamp': rows out of order"
    ):
        load_ohlcv(path)
    bars = load_ohlcv(path, policy="repair")
    assert bars.index.is_monotonic_increasing and len(bars) > 20_000
    assert bars.attrs["report"]["repairs"]


def test_zero_volume_bars_are_kept() -> None:
    bars = load_ohlcv(DATA / "Coinbase_BTCUSD_d.csv")
    assert bars.attrs["report"]["zero_volume_bars"] == int((bars["volume"] == 0).sum()) > 0


def write_generic(tmp_path: Path, rows: list[str]) -> Path:
    path = tmp_path / "bars.csv"
    path.write_text("timestamp,open,high,low,close,volume\n" + "\n".join(rows) + "\n")
    return path


GOOD = [f"2024-01-0{d} 00:00:00,10,11,9,10.5,100" for d in range(1, 6)]


@pytest.mark.parametrize(
    ("row_index", "bad_row", "field", "problem"),
    [
        (2, "2024-01-03 00:00:00,10,9.5,9,10.5,100", "high", "high below open or close"),
        (2, "2024-01-03 00:00:00,10,11,10.8,10.5,100", "low", "low above open or close"),
        (2, "2024-01-03 00:00:00,10,11,9,-1,100", "close", "non-positive price"),
        (2, "2024-01-03 00:00:00,10,11,9,,100", "close", "empty or NaN cell"),
        (2, "2024-01-03 00:00:00,10,11,9,10.5,-3", "volume", "negative volume"),
        (2, "2024-01-02 00:00:00,10,11,9,10.5,100", "timestamp", "duplicate timestamp"),
        (2, "2024-01-03 00:00:00,10,11,9,abc,100", "close", "'abc' is not a number"),
    ],
)
def test_corrupt_row_is_named(
    tmp_path: Path, row_index: int, bad_row: str, field: str, problem: str
) -> None:
    rows = list(GOOD)
    rows[row_index] = bad_row
    path = write_generic(tmp_path, rows)
    with pytest.raises(DataError) as err:
        load_ohlcv(path)
    text = str(err.value)
    assert str(path) in text and f"field '{field}'" in text and problem in text
    assert f"row {row_index + 2}" in text  # line in the file: header is line 1


def test_missing_file_and_unknown_asset() -> None:
    with pytest.raises(DataError, match="nope.csv: file not found"):
        load_ohlcv("nope.csv")
    with pytest.raises(DataError, match=r"no asset 'XRP'.*\['BTC', 'ETH', 'LTC'\]"):
        load_ohlcv(DATA / "bitstamp_BTC_ETH_LTC_USD_d.csv#XRP")


def test_sources_bundled_names_and_ids(tmp_path: Path) -> None:
    sources = parse_sources(",".join(DEFAULT_INSTANCES))
    assert [s.instance_id for s in sources] == list(DEFAULT_INSTANCES)
    assert all(Path(s.path.split("#")[0]).is_absolute() for s in sources)
    assert sources[0].venue == "coinbase"
    own = write_generic(tmp_path, GOOD)
    custom = parse_sources(f"desk-a={own},coinbase-btc-usd-1d", data_dir=DATA)
    assert custom[0].instance_id == "desk-a" and custom[0].path == str(own)
    with pytest.raises(DataError, match="appears twice"):
        parse_sources(f"a={own},a=coinbase-btc-usd-1d")
    with pytest.raises(DataError, match="not a file and not a bundled series name"):
        parse_sources("binance")


def test_node_config_takes_precedence_over_partition() -> None:
    path = str(DATA / "Coinbase_BTCUSD_d.csv")
    node = source_for_node(
        {"data-path": path, "venue": "coinbase", "instance-id": "sigmax_1"}, "bitstamp-eth-usd-1d"
    )
    assert (node.instance_id, node.path, node.venue) == ("sigmax_1", path, "coinbase")
    sim = source_for_node({"partition-id": 2, "num-partitions": 4}, ",".join(DEFAULT_INSTANCES))
    assert sim.instance_id == "bitstamp-eth-usd-1d"
    with pytest.raises(DataError, match="5 simulated SuperNodes but only 4 data sources"):
        source_for_node({"partition-id": 0, "num-partitions": 5}, ",".join(DEFAULT_INSTANCES))
    with pytest.raises(DataError, match="data-path"):
        source_for_node({}, ",".join(DEFAULT_INSTANCES))

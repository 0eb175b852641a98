"""Every exchange layout, written from the bundled real bars, loads to the same canonical frame.

Each fixture is the real Coinbase BTC-USD daily series rewritten in one exchange's exact
layout (field order, time unit, header or not, newest first where the exchange does that),
so a reader that swaps two fields or misreads a unit fails on real numbers, not toy ones.
Corrupt-data cases then break one row of such a file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest

from sigmax_fl.data import DataError, load_ohlcv
from sigmax_fl.data.formats import READERS, detect_format
from sigmax_fl.features import make_features

from .conftest import DATA

REFERENCE_FILE = DATA / "Coinbase_BTCUSD_d.csv"
MS_PER_DAY = 86_400_000


@pytest.fixture(scope="module")
def ref() -> pd.DataFrame:
    return load_ohlcv(REFERENCE_FILE)


def num(x: float) -> str:
    """Shortest text that reads back as exactly the same float."""
    return repr(float(x))


def stamped(ref: pd.DataFrame, unit: str) -> list[tuple[int, tuple]]:
    """(epoch time in ``unit``, (open, high, low, close, volume)) per bar, oldest first."""
    times = ref.index.as_unit("ns").asi8 // {"s": 10**9, "ms": 10**6, "us": 10**3}[unit]
    bars = ref[["open", "high", "low", "close", "volume"]].itertuples(index=False)
    return list(zip(times.tolist(), bars, strict=True))


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def binance_fields(t: int, bar: tuple, per_ms: int) -> list:
    """One Binance kline: open time, OHLCV, close time, quote volume, trades, taker, ignore."""
    quote = num(bar[3] * bar[4])
    close_time = t + MS_PER_DAY * per_ms - 1
    return [t, *map(num, bar), close_time, quote, 42, num(bar[4] / 2), quote, "0"]


# --- writers: one per exchange layout -----------------------------------------------------


def binance_spot_csv(ref: pd.DataFrame, path: Path, unit: str = "ms") -> Path:
    per_ms = 1000 if unit == "us" else 1
    rows = [binance_fields(t, bar, per_ms) for t, bar in stamped(ref, unit)]
    return write(path, [",".join(map(str, row)) for row in rows])


def binance_futures_csv(ref: pd.DataFrame, path: Path) -> Path:
    header = (
        "open_time,open,high,low,close,volume,close_time,quote_volume,count,"
        "taker_buy_volume,taker_buy_quote_volume,ignore"
    )
    body = binance_spot_csv(ref, path).read_text()
    path.write_text(header + "\n" + body)
    return path


def binance_rest_json(ref: pd.DataFrame, path: Path) -> Path:
    path.write_text(json.dumps([binance_fields(t, bar, 1) for t, bar in stamped(ref, "ms")]))
    return path


def coinbase_rows(ref: pd.DataFrame) -> list[list]:
    """[time s, low, high, open, close, volume], newest first, as the Exchange API answers."""
    return [[t, lo, h, o, c, v] for t, (o, h, lo, c, v) in stamped(ref, "s")][::-1]


def coinbase_json(ref: pd.DataFrame, path: Path) -> Path:
    path.write_text(json.dumps(coinbase_rows(ref)))
    return path


def coinbase_csv(ref: pd.DataFrame, path: Path) -> Path:
    rows = coinbase_rows(ref)
    return write(path, [",".join([str(t), *map(num, rest)]) for t, *rest in rows])


def coinbase_advanced_json(ref: pd.DataFrame, path: Path) -> Path:
    keys = ("start", "low", "high", "open", "close", "volume")
    candles = [
        dict(zip(keys, [str(t), *map(num, rest)], strict=True)) for t, *rest in coinbase_rows(ref)
    ]
    path.write_text(json.dumps({"candles": candles}))
    return path


def kraken_lines(ref: pd.DataFrame) -> list[str]:
    """time (s), open, high, low, close, volume, trades: bar i of the series is line i + 1."""
    return [",".join([str(t), *map(num, bar), "17"]) for t, bar in stamped(ref, "s")]


def kraken_csv(ref: pd.DataFrame, path: Path) -> Path:
    return write(path, kraken_lines(ref))


def ccxt_json(ref: pd.DataFrame, path: Path) -> Path:
    path.write_text(json.dumps([[t, *bar] for t, bar in stamped(ref, "ms")]))
    return path


def ccxt_csv(ref: pd.DataFrame, path: Path) -> Path:
    return write(path, [",".join([str(t), *map(num, bar)]) for t, bar in stamped(ref, "ms")])


def cryptodatadownload_hourly_style(ref: pd.DataFrame, path: Path) -> Path:
    """The bundled hourly files' layout (``2019-10-17 12-AM``), newest first."""
    lines = [
        "Created on 10-17-2019,https://www.CryptoDataDownload.com",
        "date,symbol,open,high,low,close,volume_btc,volume",
    ]
    for t, bar in stamped(ref, "s")[::-1]:
        date = pd.Timestamp(t, unit="s").strftime("%Y-%m-%d %I-%p")
        lines.append(f"{date},BTCUSD,{','.join(map(num, bar))},{num(bar[4] * bar[3])}")
    return write(path, lines)


def wide_multi_asset(ref: pd.DataFrame, path: Path) -> Path:
    """BTC plus an ETH that starts later (empty leading cells), like the Bitstamp file."""
    cols = ["open", "high", "low", "close", "volume"]
    lines = ["," + ",".join(f"{a}:{c}" for a in ("BTC", "ETH") for c in cols)]
    for i, (t, bar) in enumerate(stamped(ref, "s")):
        eth = ",".join(num(x / 20) for x in bar) if i > 300 else ",,,,"
        date = pd.Timestamp(t, unit="s").date()
        lines.append(f"{date},{','.join(map(num, bar))},{eth}")
    return write(path, lines)


def generic_csv(ref: pd.DataFrame, path: Path) -> Path:
    lines = ["Date,Open,High,Low,Close,Volume"]
    for t, bar in stamped(ref, "s"):
        lines.append(f"{pd.Timestamp(t, unit='s', tz='UTC').isoformat()},{','.join(map(num, bar))}")
    return write(path, lines)


def generic_epoch_csv(ref: pd.DataFrame, path: Path) -> Path:
    lines = ["TIME,o,h,l,c,v"]
    lines += [f"{t},{','.join(map(num, bar))}" for t, bar in stamped(ref, "s")]
    return write(path, lines)


def parquet_columns(ref: pd.DataFrame, path: Path) -> Path:
    pytest.importorskip("pyarrow")
    frame = ref.reset_index().rename(columns=str.upper)
    frame.attrs = {}
    frame.to_parquet(path, index=False)
    return path


def parquet_index(ref: pd.DataFrame, path: Path) -> Path:
    pytest.importorskip("pyarrow")
    frame = ref.copy()
    frame.attrs = {}
    frame.index = frame.index.tz_localize(None)  # naive times are read as UTC
    frame.to_parquet(path)
    return path


LAYOUTS: dict[str, tuple[str, str, Callable[..., Path]]] = {
    # id: (file name, detected format, writer)
    "binance-spot-ms": ("BTCUSDT-1d-2019-10.csv", "binance-klines-csv", binance_spot_csv),
    "binance-spot-us": (
        "BTCUSDT-1d-2025-01.csv",
        "binance-klines-csv",
        lambda r, p: binance_spot_csv(r, p, "us"),
    ),
    "binance-futures": ("BTCUSDT-1d-futures.csv", "binance-klines-csv", binance_futures_csv),
    "binance-rest": ("klines.json", "binance-klines-json", binance_rest_json),
    "coinbase-json": ("candles.json", "coinbase-candles-json", coinbase_json),
    "coinbase-csv": ("candles.csv", "coinbase-candles-csv", coinbase_csv),
    "coinbase-advanced": ("advanced.json", "coinbase-advanced-json", coinbase_advanced_json),
    "kraken": ("XBTUSD_1440.csv", "kraken-ohlcvt-csv", kraken_csv),
    "ccxt-json": ("ccxt.json", "ccxt-json", ccxt_json),
    "ccxt-csv": ("ccxt.csv", "ccxt-csv", ccxt_csv),
    "cryptodatadownload": ("cdd.csv", "cryptodatadownload", cryptodatadownload_hourly_style),
    "wide": ("wide.csv", "wide-multi-asset", wide_multi_asset),
    "generic-csv": ("bars.csv", "generic-csv", generic_csv),
    "generic-epoch": ("bars_epoch.csv", "generic-csv", generic_epoch_csv),
    "parquet": ("bars.parquet", "parquet", parquet_columns),
    "parquet-index": ("bars_index.parquet", "parquet", parquet_index),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_layout_loads_to_the_same_canonical_frame(
    tmp_path: Path, ref: pd.DataFrame, layout: str
) -> None:
    # Prepare: the real series in this exchange's exact layout
    name, fmt, writer = LAYOUTS[layout]
    path = writer(ref, tmp_path / name)
    spec = f"{path}#BTC" if fmt == "wide-multi-asset" else path

    # Execute: detected from the content, and named explicitly
    detected = detect_format(path)
    auto, explicit = load_ohlcv(spec), load_ohlcv(spec, fmt=fmt)

    # Assert
    assert detected == fmt
    pd.testing.assert_frame_equal(auto, ref)
    pd.testing.assert_frame_equal(explicit, ref)
    assert auto.attrs["report"]["gaps"] == ref.attrs["report"]["gaps"] == 1


def test_every_reader_is_covered() -> None:
    assert {fmt for _, fmt, _ in LAYOUTS.values()} | {"cryptodatadownload"} == set(READERS)


def test_binance_files_joined_across_2025_mix_ms_and_us(tmp_path: Path, ref: pd.DataFrame) -> None:
    # Binance switched its public files to microseconds in 2025: a joined file has both.
    ms = binance_spot_csv(ref.iloc[:900], tmp_path / "a.csv").read_text()
    us = binance_spot_csv(ref.iloc[900:], tmp_path / "b.csv", "us").read_text()
    path = tmp_path / "joined.csv"
    path.write_text(ms + us)
    pd.testing.assert_frame_equal(load_ohlcv(path), ref)


# --- corrupt data: strict names file, row and field; repair counts and logs ---------------

AT = 1000  # a lively bar (2017-08-27): a range and a volume, far from the series' ends


def set_field(line: str, position: int, value: str) -> str:
    fields = line.split(",")
    fields[position] = value
    return ",".join(fields)


def shifted(line: str, seconds: int) -> str:
    return set_field(line, 0, str(int(line.split(",")[0]) + seconds))


def replayed(lines: list[str]) -> list[str]:
    """Bars AT..AT+2 carry the values of bars AT-10..AT-8 under their own timestamps."""
    out = list(lines)
    for k in range(3):
        source = lines[AT - 10 + k].split(",")
        out[AT + k] = ",".join([lines[AT + k].split(",")[0], *source[1:]])
    return out


def at(value: str, position: int) -> Callable[[list[str]], list[str]]:
    """Corrupt one field of the bar at AT."""
    return lambda ls: [*ls[:AT], set_field(ls[AT], position, value), *ls[AT + 1 :]]


class Corruption(NamedTuple):
    corrupt: Callable[[list[str]], list[str]]
    line: int
    """The line strict must name."""
    field: str
    problem: str
    repair: str
    """The repair counted ..."""
    count: int
    """... this many times."""
    lost: int = 1
    """Rows (from AT on) that repair drops from the real series."""


OPEN, HIGH, LOW, CLOSE, VOLUME = 1, 2, 3, 4, 5
CORRUPTIONS = {
    "duplicate-exact": Corruption(
        lambda ls: [*ls[: AT + 1], ls[AT], *ls[AT + 1 :]],
        AT + 2,
        "timestamp",
        "duplicate timestamp",
        "exact duplicate row",
        1,
        lost=0,
    ),
    "duplicate-conflicting": Corruption(
        lambda ls: [*ls[: AT + 1], set_field(ls[AT], VOLUME, "1.5"), *ls[AT + 1 :]],
        AT + 2,
        "timestamp",
        "duplicate timestamp",
        "same timestamp with different values",
        2,
    ),
    "unsorted": Corruption(
        lambda ls: [*ls[:AT], ls[AT + 1], ls[AT], *ls[AT + 2 :]],
        AT + 2,
        "timestamp",
        "rows out of order",
        "rows out of order (sorted)",
        1,
        lost=0,
    ),
    "mixed-interval": Corruption(
        lambda ls: [*ls[: AT + 1], shifted(ls[AT], 6 * 3600), *ls[AT + 1 :]],
        AT + 2,
        "timestamp",
        "not a multiple of the 1 days 00:00:00 bar",
        "step is not a multiple of the 1 days 00:00:00 bar (mixed intervals)",
        1,
        lost=0,
    ),
    "high-below-close": Corruption(
        at("1.0", HIGH), AT + 1, "high", "high below open or close", "high below open or close", 1
    ),
    "low-above-open": Corruption(
        at("1e9", LOW), AT + 1, "low", "low above open or close", "low above open or close", 1
    ),
    "non-positive-price": Corruption(
        at("-4", OPEN), AT + 1, "open", "non-positive price", "non-positive price", 1
    ),
    "empty-cell": Corruption(
        at("", CLOSE),
        AT + 1,
        "close",
        "empty or NaN cell",
        "empty or NaN cell inside the series",
        1,
    ),
    "nan-cell": Corruption(
        at("NaN", VOLUME),
        AT + 1,
        "volume",
        "empty or NaN cell",
        "empty or NaN cell inside the series",
        1,
    ),
    "negative-volume": Corruption(
        at("-3", VOLUME), AT + 1, "volume", "negative volume", "negative volume", 1
    ),
    "not-a-number": Corruption(
        at("4.3e2.1", CLOSE),
        AT + 1,
        "close",
        "'4.3e2.1' is not a number",
        "unparseable cell or row",
        1,
    ),
    "not-a-time": Corruption(
        at("yesterday", 0),
        AT + 1,
        "timestamp",
        "'yesterday' is not a timestamp",
        "unparseable cell or row",
        1,
    ),
    "replayed-block": Corruption(
        replayed,
        AT + 1,
        "open,high,low,close,volume",
        "repeats, value for value, the bar at",
        "replayed block of bars (later copy)",
        3,
        lost=3,
    ),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_row_strict_names_it_repair_counts_it(
    tmp_path: Path, ref: pd.DataFrame, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: one corrupt row in a real Kraken export
    c = CORRUPTIONS[case]
    path = write(tmp_path / "XBTUSD_1440.csv", c.corrupt(kraken_lines(ref)))

    # Execute / Assert: strict refuses, naming file, row and field
    with pytest.raises(DataError) as err:
        load_ohlcv(path)
    message = str(err.value)
    assert message.startswith(f"{path}, row {c.line}, field '{c.field}': "), message
    assert c.problem in message, message

    # Execute / Assert: repair drops only the bad rows, counts and logs them with the file
    with caplog.at_level(logging.WARNING, logger="flwr.sigmax_fl.data.validate"):
        repaired = load_ohlcv(path, policy="repair")
    assert repaired.attrs["report"]["repairs"] == {c.repair: c.count}
    assert any(str(path) in r.getMessage() for r in caplog.records)
    pd.testing.assert_frame_equal(repaired, ref.drop(ref.index[AT : AT + c.lost]))


def test_json_element_of_the_wrong_shape(tmp_path: Path, ref: pd.DataFrame) -> None:
    path = binance_rest_json(ref, tmp_path / "klines.json")
    klines = json.loads(path.read_text())
    klines[AT] = klines[AT][:5]
    path.write_text(json.dumps(klines))
    with pytest.raises(DataError, match=rf"klines.json, row {AT + 1}: not a Binance kline"):
        load_ohlcv(path)
    repaired = load_ohlcv(path, policy="repair")
    assert repaired.attrs["report"]["repairs"] == {"unparseable cell or row": 1}
    pd.testing.assert_frame_equal(repaired, ref.drop(ref.index[AT]))


def test_unknown_layouts_and_empty_files_are_named(tmp_path: Path) -> None:
    cases = {
        "empty.csv": ("", "file is empty"),
        "five.csv": ("1,2,3,4,5\n", "unknown layout"),
        "error.json": ('{"code": -1121, "msg": "Invalid symbol."}', "unknown JSON layout"),
        "none.json": ("[]", "no bars"),
    }
    for name, (text, problem) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(DataError, match=problem) as err:
            load_ohlcv(path)
        assert str(path) in str(err.value)
    with pytest.raises(DataError, match="unknown format 'binance'"):
        load_ohlcv(tmp_path / "five.csv", fmt="binance")


# --- not corruption: gaps, closures, daylight saving ---------------------------------------


def test_gaps_are_reported_and_never_filled(tmp_path: Path, ref: pd.DataFrame) -> None:
    # Prepare: a 5-day outage cut out of the real series
    lines = kraken_lines(ref)
    path = write(tmp_path / "outage.csv", [*lines[:AT], *lines[AT + 5 :]])

    # Execute
    bars = load_ohlcv(path)
    X, _ = make_features(bars, max_gap="3d")

    # Assert: no bar is invented, the gap is counted, no target spans it
    outage = ref.index[AT : AT + 5]
    assert len(bars) == len(ref) - 5 and not bars.index.isin(outage).any()
    assert bars.attrs["report"]["gaps"] == 2 and bars.attrs["report"]["missing_bars"] == 17
    assert not X.index.isin(outage).any() and ref.index[AT - 1] not in X.index
    assert X.attrs["dropped"]["target_spans_gap"] == 2
    # Features run in trading time: the first bar after the outage compares to the last before.
    after = ref.index[AT + 5]
    expected = np.log(ref["close"].iloc[AT + 5] / ref["close"].iloc[AT - 1])
    assert X.loc[after, "ret_1"] == pytest.approx(expected, rel=1e-6)


def test_weekday_only_series_keeps_nearly_all_rows(tmp_path: Path, ref: pd.DataFrame) -> None:
    # An FX- or stock-like calendar: weekends closed, and daily bars stamped at a New York
    # session time, so their UTC hour moves with daylight saving.
    weekdays = ref[ref.index.day_of_week < 5].loc["2016-01-01":"2019-03-15"]
    new_york_5pm = weekdays.index.tz_localize(None) + pd.Timedelta(hours=17)
    session = weekdays.set_axis(new_york_5pm.tz_localize("America/New_York").tz_convert("UTC"))
    assert set(session.index.hour) == {21, 22}
    path = tmp_path / "eurusd.csv"
    session.rename_axis("time").to_csv(path)

    bars = load_ohlcv(path)
    X, _ = make_features(bars)

    assert len(bars) == len(session) and bars.attrs["report"]["repairs"] == {}
    # Only the three weekends where New York falls back (Friday 21:00 -> Monday 22:00 UTC,
    # 3 days and 1 hour) exceed max-gap = 3d; every other weekend keeps its Friday target.
    assert X.attrs["dropped"]["target_spans_gap"] == 3
    assert len(X) >= len(bars) - 62 - 3  # warm-up, the last bar and those three

"""Readers of the exchanges' own layouts: Binance, Coinbase, Kraken, and CCXT's output.

These layouts carry no column names (or only Binance futures' header row): a row is an array
whose fields mean what the exchange's documentation says by position. Each layout is one
:class:`Positional` description; the CSV and JSON readers share the code that applies it.
Times are epoch numbers whose unit is told by magnitude (:func:`.parsing.epoch_to_utc`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sigmax_fl.data.errors import DataError
from sigmax_fl.data.parsing import CANONICAL, flag_rows, pick_columns, raw_bars


@dataclass(frozen=True)
class Positional:
    """A header-less layout: how many fields a row has, and which field holds what."""

    name: str
    width: int
    positions: Mapping[str, int]


_OHLCV_ORDER = {"timestamp": 0, "open": 1, "high": 2, "low": 3, "close": 4, "volume": 5}

BINANCE_KLINE = Positional("Binance kline", 12, _OHLCV_ORDER)
"""open time, open, high, low, close, volume (base asset), close time, quote volume, trades,
taker buy base volume, taker buy quote volume, ignore."""

COINBASE_CANDLE = Positional(
    "Coinbase Exchange candle",
    6,
    {"timestamp": 0, "low": 1, "high": 2, "open": 3, "close": 4, "volume": 5},
)
"""time (s), low, high, open, close, volume: note low and high come first."""

KRAKEN_OHLCVT = Positional("Kraken OHLCVT", 7, _OHLCV_ORDER)
"""time (s), open, high, low, close, volume, trades."""

CCXT_OHLCV = Positional("CCXT OHLCV", 6, _OHLCV_ORDER)
"""timestamp (ms), open, high, low, close, volume."""


def _first_cell_is_text(path: Path) -> bool:
    with path.open("r", encoding="utf-8", errors="replace") as handle:
        first = handle.readline().split(",")[0].strip()
    try:
        float(first)
    except ValueError:
        return True
    return False


def _read_positional_csv(path: Path, layout: Positional) -> pd.DataFrame:
    """A header-less CSV of ``layout`` rows (one optional header row is skipped)."""
    skip = 1 if _first_cell_is_text(path) else 0
    try:
        rows = pd.read_csv(path, header=None, skiprows=skip, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise DataError(path, "no bars") from None
    except pd.errors.ParserError as err:
        raise DataError(path, f"not a {layout.name} CSV: {err}") from None
    if rows.shape[1] != layout.width:
        raise DataError(
            path,
            f"a {layout.name} row has {layout.width} fields, this file's rows have {rows.shape[1]}",
            row=skip + 1,
        )
    return raw_bars(pick_columns(rows, layout.positions), np.arange(len(rows)) + skip + 1)


def _load_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(
            path, f"not valid JSON: {err.msg}", row=f"{err.lineno}:{err.colno}"
        ) from None


def _read_positional_json(path: Path, layout: Positional) -> pd.DataFrame:
    """A JSON array of ``layout`` arrays; a row's number is its 1-based place in the array."""
    data = _load_json(path)
    if not isinstance(data, list):
        raise DataError(path, f"expected a JSON array of {layout.name} arrays")
    shaped = np.array([isinstance(r, list) and len(r) == layout.width for r in data], dtype=bool)
    empty = [None] * layout.width
    rows = pd.DataFrame(
        [r if ok else empty for r, ok in zip(data, shaped, strict=True)],
        columns=range(layout.width),
        dtype=object,
    )
    raw = raw_bars(pick_columns(rows, layout.positions), np.arange(len(data)) + 1)
    flag_rows(raw, ~shaped, f"not a {layout.name}: expected an array of {layout.width} fields")
    return raw


def read_binance_klines_csv(path: Path, asset: str | None) -> pd.DataFrame:
    """Binance public-data kline CSV: spot files have no header, futures files one row."""
    return _read_positional_csv(path, BINANCE_KLINE)


def read_binance_klines_json(path: Path, asset: str | None) -> pd.DataFrame:
    """Binance REST ``/api/v3/klines`` answer: arrays of 12 fields, prices as strings."""
    return _read_positional_json(path, BINANCE_KLINE)


def read_coinbase_candles_json(path: Path, asset: str | None) -> pd.DataFrame:
    """Coinbase Exchange ``/products/{id}/candles`` answer, newest first."""
    return _read_positional_json(path, COINBASE_CANDLE)


def read_coinbase_candles_csv(path: Path, asset: str | None) -> pd.DataFrame:
    """Coinbase Exchange candles written as header-less CSV rows, as the API orders them."""
    return _read_positional_csv(path, COINBASE_CANDLE)


def read_kraken_ohlcvt_csv(path: Path, asset: str | None) -> pd.DataFrame:
    """Kraken's downloadable OHLCVT CSV: no header, time in seconds, trades last."""
    return _read_positional_csv(path, KRAKEN_OHLCVT)


def read_ccxt_csv(path: Path, asset: str | None) -> pd.DataFrame:
    """CCXT ``fetch_ohlcv`` rows written as header-less CSV: ``ms, o, h, l, c, v``."""
    return _read_positional_csv(path, CCXT_OHLCV)


def read_ccxt_json(path: Path, asset: str | None) -> pd.DataFrame:
    """CCXT ``fetch_ohlcv`` output saved with ``json.dump``: ``[[ms, o, h, l, c, v], ...]``."""
    return _read_positional_json(path, CCXT_OHLCV)


def read_coinbase_advanced_json(path: Path, asset: str | None) -> pd.DataFrame:
    """Coinbase Advanced Trade candles: ``{"candles": [{"start": "...", ...}]}``, all strings."""
    data = _load_json(path)
    candles = data.get("candles") if isinstance(data, dict) else None
    if not isinstance(candles, list):
        raise DataError(path, 'expected a JSON object with a "candles" array')
    if not candles:
        raise DataError(path, "no bars")
    shaped = np.array([isinstance(c, dict) for c in candles], dtype=bool)
    rows = pd.DataFrame.from_records(
        [c if ok else {} for c, ok in zip(candles, shaped, strict=True)]
    ).rename(columns={"start": "timestamp"})
    missing = [c for c in CANONICAL if c not in rows.columns]
    if missing:
        wanted = ["start" if c == "timestamp" else c for c in missing]
        raise DataError(path, f"candles lack the field(s) {wanted}", row=1)
    raw = raw_bars(rows[list(CANONICAL)], np.arange(len(candles)) + 1)
    flag_rows(raw, ~shaped, "not a candle: expected a JSON object")
    return raw

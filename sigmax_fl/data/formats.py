"""Readers: one per file layout, each producing the same raw frame for :mod:`.validate`.

A reader only parses; it never judges. Every judgement (order, duplicates, OHLC sanity,
unparseable cells) lives in :func:`sigmax_fl.data.validate.validate_bars`, so that all
layouts obey one policy. The layout is detected from the file's content, not its name,
because exports get renamed; ``fmt=`` overrides the guess.

=========================  ==============================================================
``fmt``                    detected by
=========================  ==============================================================
``cryptodatadownload``     banner line naming CryptoDataDownload, then a ``date`` header
``wide-multi-asset``       header cells ``ASSET:open`` .. ``ASSET:volume``
``binance-klines-csv``     no header and 12 numeric fields, or a header with ``open_time``
                           and ``close_time`` (futures files)
``kraken-ohlcvt-csv``      no header and 7 numeric fields
``coinbase-candles-csv``   no header, 6 numeric fields, time in seconds (< 1e11)
``ccxt-csv``               no header, 6 numeric fields, time in milliseconds
``generic-csv``            a header naming a time column and ``close`` (any case)
``binance-klines-json``    a JSON array of 12-field arrays
``coinbase-candles-json``  a JSON array of 6-field arrays, time in seconds
``ccxt-json``              a JSON array of 6-field arrays, time in milliseconds
``coinbase-advanced-json`` a JSON object with a ``"candles"`` array
``parquet``                the ``PAR1`` magic bytes; columns matched like ``generic-csv``
=========================  ==============================================================

``synthetic:...`` paths are not files: :mod:`sigmax_fl.data.synthetic` generates them.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from sigmax_fl.data import exchanges, synthetic
from sigmax_fl.data.errors import DataError
from sigmax_fl.data.parsing import OHLCV, raw_bars, read_head
from sigmax_fl.data.sources import split_asset
from sigmax_fl.data.validate import validate_bars

Reader = Callable[[Path, str | None], pd.DataFrame]
"""(path, asset) -> raw frame: see :func:`sigmax_fl.data.parsing.raw_bars`."""


def _read_text_csv(path: Path, **kwargs: object) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, **kwargs)
    except pd.errors.EmptyDataError:
        raise DataError(path, "no bars") from None
    except pd.errors.ParserError as err:
        raise DataError(path, f"not a well-formed CSV: {err}") from None


def _base_volume_column(columns: list[str], symbol: str) -> str | None:
    """The volume column in the traded (base) asset, as the exchanges' own layouts give it.

    Old files name it ``volume_btc`` next to a quote ``volume``; newer ones ``volume btc``
    next to ``volume usd``: the base asset is the one the symbol starts with.
    """
    suffixed = [c for c in columns if re.fullmatch(r"volume[ _]\w+", c)]
    for column in suffixed:
        if symbol.upper().startswith(column[7:].upper()):
            return column
    return suffixed[0] if suffixed else None


def read_cryptodatadownload(path: Path, asset: str | None) -> pd.DataFrame:
    """CryptoDataDownload export: a banner line, then ``date,symbol,open,...``, newest first.

    The hourly files write hours as ``2019-10-17 09-AM``; daily ones as ``2019-10-17``;
    newer files add a ``unix`` column, which is used when present (it has no ambiguity).
    """
    frame = _read_text_csv(path, skiprows=1)
    frame.columns = [c.strip().lower() for c in frame.columns]
    missing = [c for c in ("date", "open", "high", "low", "close") if c not in frame.columns]
    if missing:
        raise DataError(path, f"CryptoDataDownload layout without column(s) {missing}", row=2)
    symbol = str(frame["symbol"].iloc[0]) if "symbol" in frame and len(frame) else ""
    base = _base_volume_column(list(frame.columns), symbol)
    table = frame.rename(columns={"unix" if "unix" in frame else "date": "timestamp"})
    if base is not None:
        table = table.drop(columns=["volume"], errors="ignore").rename(columns={base: "volume"})
    hourly = "unix" not in frame and frame["date"].str.contains(r"-(?:AM|PM)$").any()
    return raw_bars(
        table,
        np.arange(len(frame)) + 3,  # banner + header, 1-based
        time_format="%Y-%m-%d %I-%p" if hourly else None,
    )


def read_wide_multi_asset(path: Path, asset: str | None) -> pd.DataFrame:
    """A wide file with one date column and ``ASSET:open .. ASSET:volume`` per asset.

    Rows before an asset's first bar (and after its last) are empty cells in that asset's
    columns: they are not bars, so they are dropped here. Empty cells *between* bars are kept
    as NaN for validation to reject, because a hole inside a series is corruption.
    """
    frame = _read_text_csv(path)
    assets = sorted(c.split(":")[0] for c in frame.columns if c.lower().endswith(":close"))
    if asset is None:
        raise DataError(
            path, f"wide multi-asset file: choose an asset with '#ASSET', one of {assets}"
        )
    if asset.upper() not in assets:
        raise DataError(path, f"no asset '{asset}' in this file; it has {assets}")
    cols = {f"{asset.upper()}:{name}": name for name in OHLCV}
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise DataError(path, f"asset '{asset}' lacks column(s) {missing}", row=1)
    table = frame[[frame.columns[0], *cols]].rename(columns={**cols, frame.columns[0]: "timestamp"})
    filled = (table[list(OHLCV)].apply(lambda s: s.str.strip()) != "").any(axis=1).to_numpy()
    if not filled.any():
        raise DataError(path, f"asset '{asset}' has no bars")
    first, last = np.flatnonzero(filled)[[0, -1]]
    return raw_bars(table.iloc[first : last + 1], np.arange(first, last + 1) + 2)


_ALIASES = {
    "timestamp": (
        "timestamp",
        "time",
        "date",
        "datetime",
        "open_time",
        "open time",
        "start",
        "index",
    ),
    "open": ("open", "o"),
    "high": ("high", "h"),
    "low": ("low", "l"),
    "close": ("close", "c"),
    "volume": ("volume", "vol", "v"),
}


def _by_alias(path: Path, frame: pd.DataFrame) -> pd.DataFrame:
    """The canonical columns of a table with a header, names matched case-insensitively."""
    lower = {str(c).strip().lower(): c for c in frame.columns}
    picked: dict[str, pd.Series] = {}
    for canonical, aliases in _ALIASES.items():
        found = next((lower[a] for a in aliases if a in lower), None)
        if found is None:
            raise DataError(
                path, f"no column for '{canonical}' (looked for {list(aliases)})", row=1
            )
        picked[canonical] = frame[found]
    return pd.DataFrame(picked)


def read_generic_csv(path: Path, asset: str | None) -> pd.DataFrame:
    """Any CSV with a header naming a time column and the OHLCV columns (any case).

    Times may be text (ISO-like) or epoch numbers in s, ms or us.
    """
    frame = _read_text_csv(path)
    return raw_bars(_by_alias(path, frame), np.arange(len(frame)) + 2)


def read_parquet(path: Path, asset: str | None) -> pd.DataFrame:
    """A Parquet table with the generic columns; the time may also be its (saved) index.

    A row's number in messages is its 1-based position in the table.
    """
    try:
        frame = pd.read_parquet(path)
    except ImportError as err:
        raise DataError(path, f"reading Parquet needs pyarrow ({err})") from None
    except (OSError, ValueError) as err:
        raise DataError(path, f"not a readable Parquet file: {err}") from None
    if not isinstance(frame.index, pd.RangeIndex):
        frame = frame.reset_index()
    return raw_bars(_by_alias(path, frame), np.arange(len(frame)) + 1)


READERS: dict[str, Reader] = {
    "cryptodatadownload": read_cryptodatadownload,
    "wide-multi-asset": read_wide_multi_asset,
    "generic-csv": read_generic_csv,
    "parquet": read_parquet,
    "binance-klines-csv": exchanges.read_binance_klines_csv,
    "binance-klines-json": exchanges.read_binance_klines_json,
    "coinbase-candles-csv": exchanges.read_coinbase_candles_csv,
    "coinbase-candles-json": exchanges.read_coinbase_candles_json,
    "coinbase-advanced-json": exchanges.read_coinbase_advanced_json,
    "kraken-ohlcvt-csv": exchanges.read_kraken_ohlcvt_csv,
    "ccxt-csv": exchanges.read_ccxt_csv,
    "ccxt-json": exchanges.read_ccxt_json,
}

_HEADERLESS_BY_WIDTH = {12: "binance-klines-csv", 7: "kraken-ohlcvt-csv"}
_SECONDS_BELOW = 1e11  # epoch magnitude that tells seconds (Coinbase) from ms (CCXT)


def _is_number(text: str) -> bool:
    try:
        float(text.strip().strip('"'))
    except ValueError:
        return False
    return True


def _six_fields(first_time: str, encoding: str) -> str:
    """Coinbase candles carry seconds, CCXT rows milliseconds: same width, other order."""
    seconds = abs(float(first_time.strip().strip('"'))) < _SECONDS_BELOW
    return f"{'coinbase-candles' if seconds else 'ccxt'}-{encoding}"


def _detect_json(path: Path, text: str) -> str:
    if text.startswith("{"):
        if '"candles"' in text:
            return "coinbase-advanced-json"
        raise DataError(path, f"unknown JSON layout (starts {text[:80]!r})")
    first = re.match(r"\[\s*\[([^\[\]]*)\]", text)
    if first is None:
        raise DataError(path, f"no bars, or an unknown JSON layout (starts {text[:80]!r})")
    fields = first[1].split(",")
    if len(fields) == 12:
        return "binance-klines-json"
    if len(fields) == 6 and _is_number(fields[0]):
        return _six_fields(fields[0], "json")
    raise DataError(path, f"unknown JSON layout: arrays of {len(fields)} fields", row=1)


def _detect_csv(path: Path, lines: list[str]) -> str:
    first = lines[0].strip()
    if "cryptodatadownload" in first.lower() and len(lines) > 1 and "date" in lines[1].lower():
        return "cryptodatadownload"
    cells = [c.strip().lower() for c in next(csv.reader(io.StringIO(first)))]
    if all(_is_number(c) for c in cells):
        if len(cells) == 6:
            return _six_fields(cells[0], "csv")
        if len(cells) in _HEADERLESS_BY_WIDTH:
            return _HEADERLESS_BY_WIDTH[len(cells)]
    if any(":" in c and c.split(":")[1].strip() in OHLCV for c in cells):
        return "wide-multi-asset"
    if "open_time" in cells and "close_time" in cells:
        return "binance-klines-csv"
    if any(c in _ALIASES["close"] for c in cells):
        return "generic-csv"
    raise DataError(
        path,
        f"unknown layout; known layouts: {sorted(READERS)} (first line: {first[:80]!r})",
        row=1,
    )


def detect_format(path: Path) -> str:
    """Guess the layout from the first bytes, so users need not say what they export."""
    head = read_head(path)
    if head.startswith(b"PAR1"):
        return "parquet"
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff")
    if not text.strip():
        raise DataError(path, "file is empty")
    if text.lstrip()[0] in "[{":
        return _detect_json(path, text.lstrip())
    return _detect_csv(path, text.splitlines())


def load_ohlcv(
    path: str | Path, fmt: str = "auto", *, asset: str | None = None, policy: str = "strict"
) -> pd.DataFrame:
    """Load one instance's bars as the canonical frame.

    Parameters
    ----------
    path : str or Path
        The file; ``file.csv#ASSET`` selects one asset of a wide multi-asset file;
        ``synthetic:instance=K[:key=value]...`` generates a synthetic venue instead (see
        :mod:`sigmax_fl.data.synthetic`).
    fmt : str
        ``"auto"`` (detect from the content) or a key of :data:`READERS`.
    asset : str, optional
        Asset of a wide file, instead of the ``#ASSET`` suffix.
    policy : {"strict", "repair"}
        What to do with corrupt rows, see :func:`sigmax_fl.data.validate.validate_bars`.

    Returns
    -------
    pandas.DataFrame
        Index: tz-aware UTC ``DatetimeIndex`` named ``timestamp``, strictly ascending and
        unique. Columns: float64 ``open, high, low, close, volume``. ``frame.attrs`` holds
        ``source`` (the file), ``bar_interval`` (a Timedelta) and ``report`` (counts of gaps,
        zero-volume bars and repairs); synthetic frames also ``synthetic`` (venue parameters
        and the planted signal's true R^2).

    Raises
    ------
    DataError
        Naming the file, the row and the field, for anything that is not a clean series.
    """
    if synthetic.is_synthetic(path):
        return synthetic.load(str(path), policy=policy)
    file, suffix_asset = split_asset(path)
    asset = asset or suffix_asset
    if fmt == "auto":
        fmt = detect_format(file)
    elif fmt not in READERS:
        raise DataError(file, f"unknown format '{fmt}'; known: {['auto', *sorted(READERS)]}")
    else:
        read_head(file)  # file-not-found as a DataError, before the reader's own error
    raw = READERS[fmt](file, asset)
    label = f"{file}#{asset}" if asset else str(file)
    return validate_bars(raw, source=label, policy=policy)

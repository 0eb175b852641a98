"""Readers: one per file layout, each producing the same raw frame for :mod:`.validate`.

A reader only parses; it never judges. Every judgement (order, duplicates, OHLC sanity) lives
in :func:`sigmax_fl.data.validate.validate_bars`, so that all layouts obey one policy.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from sigmax_fl.data.errors import DataError
from sigmax_fl.data.validate import OHLCV, validate_bars

Reader = Callable[[Path, str | None], pd.DataFrame]
"""(path, asset) -> frame with a tz-aware UTC ``timestamp`` column and the OHLCV columns."""


def _read_head(path: Path, n_lines: int = 3) -> list[str]:
    try:
        with path.open("r", encoding="utf-8", errors="replace") as handle:
            return [handle.readline() for _ in range(n_lines)]
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except IsADirectoryError:
        raise DataError(path, "is a directory, expected a file of bars") from None


def _numeric(path: Path, frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Coerce columns to float64, naming the first cell that is not a number."""
    out = pd.DataFrame(index=frame.index)
    for column in columns:
        raw = frame[column]
        values = pd.to_numeric(raw, errors="coerce")
        bad = values.isna() & raw.notna() & (raw.astype(str).str.strip() != "")
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(
                path, f"'{raw.iloc[i]}' is not a number", row=_row(frame, i), field=column
            )
        out[column] = values.astype("float64")
    return out


def _row(frame: pd.DataFrame, i: int) -> int:
    """The 1-based line number in the file of the frame's i-th row."""
    return int(frame["_line"].iloc[i]) if "_line" in frame else i + 1


def _timestamps(path: Path, frame: pd.DataFrame, column: str, fmt: str | None) -> pd.Series:
    raw = frame[column].astype(str).str.strip()
    parsed = pd.to_datetime(raw, format=fmt, utc=True, errors="coerce")
    bad = parsed.isna()
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            path, f"'{raw.iloc[i]}' is not a timestamp", row=_row(frame, i), field=column
        )
    return parsed


def read_cryptodatadownload(path: Path, asset: str | None) -> pd.DataFrame:
    """CryptoDataDownload export: a banner line, then ``date,symbol,open,...``, newest first.

    The hourly files write hours as ``2019-10-17 09-AM``; daily ones as ``2019-10-17``.
    """
    frame = pd.read_csv(path, skiprows=1, dtype=str, keep_default_na=False)
    frame["_line"] = np.arange(len(frame)) + 3  # banner + header + 1-based
    frame.columns = [c.strip().lower() if c != "_line" else c for c in frame.columns]
    missing = [c for c in ("date", "open", "high", "low", "close") if c not in frame.columns]
    if missing:
        raise DataError(path, f"CryptoDataDownload layout without column(s) {missing}")
    hourly = frame["date"].str.contains(r"-(?:AM|PM)$", regex=True).any()
    stamps = _timestamps(path, frame, "date", "%Y-%m-%d %I-%p" if hourly else "%Y-%m-%d")
    # Volume in the base asset (``volume_btc``), as the other layouts give it; the file's
    # ``volume`` column is the quote-currency turnover.
    base_volume = next((c for c in frame.columns if c.startswith("volume_")), None)
    if base_volume is not None:
        frame = frame.drop(columns=["volume"], errors="ignore").rename(
            columns={base_volume: "volume"}
        )
    out = _numeric(path, frame, list(OHLCV))
    out.insert(0, "timestamp", stamps)
    out["_line"] = frame["_line"]
    return out


def read_wide_multi_asset(path: Path, asset: str | None) -> pd.DataFrame:
    """A wide file with one date column and ``ASSET:open .. ASSET:volume`` per asset.

    Rows before an asset's first bar (and after its last) are empty cells in that asset's
    columns: they are not bars, so they are dropped here. Empty cells *between* bars are kept
    as NaN for validation to reject, because a hole inside a series is corruption.
    """
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame["_line"] = np.arange(len(frame)) + 2
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
        raise DataError(path, f"asset '{asset}' lacks column(s) {missing}")
    sub = frame[[frame.columns[0], *cols, "_line"]].rename(columns=cols)
    filled = (sub[list(OHLCV)].apply(lambda s: s.str.strip()) != "").any(axis=1).to_numpy()
    if not filled.any():
        raise DataError(path, f"asset '{asset}' has no bars")
    first, last = np.flatnonzero(filled)[[0, -1]]
    sub = sub.iloc[first : last + 1].reset_index(drop=True)
    out = _numeric(path, sub, list(OHLCV))
    out.insert(0, "timestamp", _timestamps(path, sub, sub.columns[0], None))
    out["_line"] = sub["_line"]
    return out


_ALIASES = {
    "timestamp": ("timestamp", "time", "date", "datetime", "open_time", "open time", "start"),
    "open": ("open", "o"),
    "high": ("high", "h"),
    "low": ("low", "l"),
    "close": ("close", "c"),
    "volume": ("volume", "vol", "v"),
}


def read_generic_csv(path: Path, asset: str | None) -> pd.DataFrame:
    """Any CSV with a header naming a time column and the OHLCV columns (any case)."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame["_line"] = np.arange(len(frame)) + 2
    lower = {c.strip().lower(): c for c in frame.columns if c != "_line"}
    rename: dict[str, str] = {}
    for canonical, aliases in _ALIASES.items():
        found = next((lower[a] for a in aliases if a in lower), None)
        if found is None:
            raise DataError(path, f"no column for '{canonical}' (looked for {list(aliases)})")
        rename[found] = canonical
    frame = frame.rename(columns=rename)
    out = _numeric(path, frame, list(OHLCV))
    out.insert(0, "timestamp", _parse_any_time(path, frame))
    out["_line"] = frame["_line"]
    return out


def _parse_any_time(path: Path, frame: pd.DataFrame) -> pd.Series:
    """Epoch numbers by magnitude (s, ms, us), else ISO-like text."""
    raw = frame["timestamp"].astype(str).str.strip()
    numbers = pd.to_numeric(raw, errors="coerce")
    if numbers.notna().all():
        magnitude = float(numbers.abs().median())
        unit = "s" if magnitude < 1e11 else "ms" if magnitude < 1e14 else "us"
        return pd.to_datetime(numbers.astype("int64"), unit=unit, utc=True)
    return _timestamps(path, frame, "timestamp", None)


READERS: dict[str, Reader] = {
    "cryptodatadownload": read_cryptodatadownload,
    "wide-multi-asset": read_wide_multi_asset,
    "generic-csv": read_generic_csv,
}


def detect_format(path: Path) -> str:
    """Guess the layout from the first lines, so users need not say what they export."""
    head = _read_head(path)
    first = head[0].strip()
    if not first:
        raise DataError(path, "file is empty")
    if "cryptodatadownload" in first.lower() and "date" in head[1].lower():
        return "cryptodatadownload"
    header = next(csv.reader(io.StringIO(first)))
    if any(":" in cell and cell.split(":")[1].strip().lower() in OHLCV for cell in header):
        return "wide-multi-asset"
    if any(cell.strip().lower() in _ALIASES["close"] for cell in header):
        return "generic-csv"
    raise DataError(
        path, f"unknown layout; known layouts: {sorted(READERS)} (first line: {first[:80]!r})"
    )


def split_asset(spec: str | Path) -> tuple[Path, str | None]:
    """``data/file.csv#ETH`` -> (path, "ETH"): the asset selector of wide files."""
    text = str(spec)
    if "#" in text:
        path, asset = text.rsplit("#", 1)
        return Path(path), asset or None
    return Path(text), None


def load_ohlcv(
    path: str | Path, fmt: str = "auto", *, asset: str | None = None, policy: str = "strict"
) -> pd.DataFrame:
    """Load one instance's bars as the canonical frame.

    Parameters
    ----------
    path : str or Path
        The file; ``file.csv#ASSET`` selects one asset of a wide multi-asset file.
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
        zero-volume bars and repairs).

    Raises
    ------
    DataError
        Naming the file, the row and the field, for anything that is not a clean series.
    """
    file, suffix_asset = split_asset(path)
    asset = asset or suffix_asset
    if fmt == "auto":
        fmt = detect_format(file)
    elif fmt not in READERS:
        raise DataError(file, f"unknown format '{fmt}'; known: {['auto', *sorted(READERS)]}")
    else:
        _read_head(file)  # file-not-found as a DataError, before the reader's own error
    raw = READERS[fmt](file, asset)
    label = f"{file}#{asset}" if asset else str(file)
    return validate_bars(raw, source=label, policy=policy)

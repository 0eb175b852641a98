"""Cell parsing shared by every reader: text -> numbers and UTC times, problems kept per row.

A reader only parses. A cell that cannot be parsed is not raised here: it becomes NaN (or
NaT) and the row carries the problem in ``_problem`` / ``_field``, so that
:func:`sigmax_fl.data.validate.validate_bars` applies the one data policy to it (``strict``
names it, ``repair`` drops the row and counts it) like any other corrupt row.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from sigmax_fl.data.errors import DataError

OHLCV = ("open", "high", "low", "close", "volume")
CANONICAL = ("timestamp", *OHLCV)

# Epoch numbers are told apart by magnitude: seconds stay below 1e11 until the year 5138,
# milliseconds below 1e14, and anything larger is microseconds (Binance files from 2025 on).
_MS_FROM, _US_FROM = 1e11, 1e14


def read_head(path: Path, n_bytes: int = 4096) -> bytes:
    """The first bytes of a file, with a :class:`DataError` for a missing file or a folder."""
    try:
        with path.open("rb") as handle:
            return handle.read(n_bytes)
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except IsADirectoryError:
        raise DataError(path, "is a directory, expected a file of bars") from None


_MISSING = ("", "nan", "na", "n/a", "null", "none")
"""Cells that say "no value": validation reports them as empty, not as unparseable."""


def _not_a_number(cells: pd.Series, values: pd.Series) -> np.ndarray:
    """Cells that hold something, yet not a number (string work only where parsing failed)."""
    failed = values.isna().to_numpy(copy=True)
    if failed.any():
        text = cells[failed].astype(str).str.strip().str.lower()
        failed[failed] = ~(cells[failed].isna() | text.isin(_MISSING)).to_numpy()
    return failed


def _looks_numeric(raw: pd.Series) -> bool:
    """Whether a column holds numbers, judged on its first cells (to_numeric on dates is slow)."""
    head = pd.to_numeric(raw.iloc[:20], errors="coerce")
    return bool(head.notna().mean() > 0.5)


def epoch_to_utc(numbers: np.ndarray) -> pd.DatetimeIndex:
    """Epoch numbers -> UTC times, the unit (s, ms or us) chosen per value by magnitude.

    Per value rather than per file, because a file that joins Binance's monthly exports across
    2025 holds milliseconds first and microseconds after.
    """
    values = np.asarray(numbers, dtype="float64")
    magnitude = np.abs(values)
    to_micro = np.where(magnitude < _MS_FROM, 1e6, np.where(magnitude < _US_FROM, 1e3, 1.0))
    micro = np.round(values * to_micro).astype("int64")
    return pd.DatetimeIndex(pd.to_datetime(micro, unit="us", utc=True))


def _yyyymmdd(numbers: pd.Series) -> bool:
    """Dates written as 8-digit numbers (20190131), which must not pass for epoch seconds."""
    valid = numbers.dropna()
    return len(valid) == len(numbers) and bool(
        ((valid % 1 == 0) & (valid >= 1900_01_01) & (valid <= 2200_12_31)).all()
    )


def parse_times(raw: pd.Series, fmt: str | None = None) -> tuple[pd.Series, np.ndarray]:
    """Times of any common kind -> (UTC timestamps, mask of cells that are not times).

    Datetime columns (Parquet) are taken as they are, naive ones as UTC; a column of
    numbers holds epoch numbers (:func:`epoch_to_utc`) or 8-digit dates, its other cells
    are bad; text is parsed with ``fmt`` (None: ISO 8601, else inferred per cell).
    """
    if isinstance(raw.dtype, pd.DatetimeTZDtype):
        return raw.dt.tz_convert("UTC"), raw.isna().to_numpy()
    if pd.api.types.is_datetime64_dtype(raw.dtype):
        return raw.dt.tz_localize("UTC"), raw.isna().to_numpy()
    if not _looks_numeric(raw):
        return _text_times(raw, fmt)
    numbers = pd.to_numeric(raw, errors="coerce")
    if _yyyymmdd(numbers):
        stamps = pd.to_datetime(numbers.astype("Int64").astype(str), format="%Y%m%d", utc=True)
        return stamps, stamps.isna().to_numpy()
    bad = numbers.isna().to_numpy()  # an epoch column, with a few bad cells at most
    stamps = pd.Series(epoch_to_utc(numbers.fillna(0).to_numpy()), index=raw.index)
    return stamps.mask(bad), bad


def _text_times(raw: pd.Series, fmt: str | None) -> tuple[pd.Series, np.ndarray]:
    text = raw.astype(str).str.strip()
    stamps = pd.to_datetime(text, format=fmt or "ISO8601", utc=True, errors="coerce")
    if fmt is None and stamps.isna().any():  # not ISO: let pandas read each cell its way
        stamps = stamps.fillna(
            pd.to_datetime(text[stamps.isna()], format="mixed", utc=True, errors="coerce")
        )
    return stamps, stamps.isna().to_numpy()


def raw_bars(
    table: pd.DataFrame, lines: np.ndarray, *, time_format: str | None = None
) -> pd.DataFrame:
    """A table with the canonical column names (cells as text or numbers) -> the raw frame.

    Parameters
    ----------
    table : pandas.DataFrame
        Columns ``timestamp`` and ``open .. volume``, any dtype.
    lines : numpy.ndarray
        For each row, where it is in the file (line of a CSV, element of a JSON array), so
        that every message can point at it.
    time_format : str, optional
        ``strftime`` format of text times; None infers it.

    Returns
    -------
    pandas.DataFrame
        ``timestamp`` (UTC), float64 ``open .. volume``, ``_line``, and ``_problem`` /
        ``_field`` naming the first unparseable cell of a row ("" when none).
    """
    problem = np.full(len(table), "", dtype=object)
    field = np.full(len(table), "", dtype=object)

    def note(mask: np.ndarray, column: str, what: str) -> None:
        new = mask & (problem == "")
        if new.any():
            cells = table[column].astype(str).to_numpy()[new]
            problem[new] = [f"'{cell}' is not {what}" for cell in cells]
            field[new] = column

    stamps, bad_time = parse_times(table["timestamp"].reset_index(drop=True), time_format)
    note(bad_time, "timestamp", "a timestamp")
    out = pd.DataFrame({"timestamp": stamps})
    for column in OHLCV:
        cells = table[column].reset_index(drop=True)
        values = pd.to_numeric(cells, errors="coerce").astype("float64")
        note(_not_a_number(cells, values), column, "a number")
        out[column] = values.to_numpy()
    out["_line"] = np.asarray(lines)
    out["_problem"] = problem
    out["_field"] = field
    return out


def flag_rows(raw: pd.DataFrame, mask: np.ndarray, problem: str, field: str = "") -> None:
    """Record a problem of whole rows (a JSON element of the wrong shape).

    It replaces any cell-level problem of those rows: the row's shape is the cause.
    """
    raw.loc[mask, "_problem"] = problem
    raw.loc[mask, "_field"] = field


def pick_columns(rows: pd.DataFrame, positions: Mapping[str, int]) -> pd.DataFrame:
    """The canonical columns of a header-less table, picked by position."""
    return pd.DataFrame({name: rows.iloc[:, i] for name, i in positions.items()})

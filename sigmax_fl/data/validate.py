"""One policy for every layout: what counts as corrupt, and what is just real data.

Corrupt (``strict``: a :class:`DataError` naming file, row and field; ``repair``: the row is
dropped, counted in ``attrs["report"]["repairs"]`` and logged with the file name):

- a cell that is not a number or not a time; an empty or NaN cell inside the series; an
  infinite value; a non-positive price; high below open or close, low above them; negative
  volume;
- rows out of order (``repair`` sorts them), duplicate timestamps (``repair`` keeps one of
  exact copies and drops every row of a timestamp whose copies disagree, as there is no
  telling which is right);
- a *replayed block*: two or more consecutive bars that repeat, value for value, an earlier
  run of bars under later timestamps (``repair`` keeps the earlier copy). Real bars with a
  price range and a traded volume never coincide in all five numbers twice in a row, so only
  a copy does this; flat zero-volume bars are exempt because repeating them is normal;
- a step between bars that is not a whole number of bars (mixed intervals; ``repair``
  drops the off-grid bars). Daily or longer bars may be off by up to an hour, because
  daily bars stamped at a local session time move by an hour at daylight-saving changes.

Not corrupt, and never "fixed": gaps (missing bars, market closures) and flat zero-volume
bars. They are counted in ``attrs["report"]`` so the operator sees them, and
:mod:`sigmax_fl.features` decides how targets treat long gaps. A gap is never filled.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pandas as pd

from sigmax_fl.data.errors import DataError
from sigmax_fl.data.parsing import OHLCV

POLICIES = ("strict", "repair")
DST_TOLERANCE = pd.Timedelta(hours=1)
"""How far a daily (or longer) bar may sit off the grid: one daylight-saving shift."""

# A child of Flower's logger, so these lines reach `flwr log` and the run's stream.
log = logging.getLogger(f"flwr.{__name__}")

__all__ = ["OHLCV", "POLICIES", "bar_interval", "validate_bars"]


Columns = dict[str, np.ndarray]

_ROW_CHECKS: list[tuple[str, str, Callable[[Columns], np.ndarray]]] = [
    *[(k, "empty or NaN cell inside the series", lambda c, k=k: np.isnan(c[k])) for k in OHLCV],
    *[(k, "infinite value", lambda c, k=k: np.isinf(c[k])) for k in OHLCV],
    *[(k, "non-positive price", lambda c, k=k: c[k] <= 0) for k in OHLCV[:4]],
    ("high", "high below open or close", lambda c: c["high"] < np.maximum(c["open"], c["close"])),
    ("low", "low above open or close", lambda c: c["low"] > np.minimum(c["open"], c["close"])),
    ("volume", "negative volume", lambda c: c["volume"] < 0),
]
"""(field, problem, mask of offending rows), in the order problems are reported."""


def _ns(frame: pd.DataFrame) -> np.ndarray:
    """The timestamps as int64 nanoseconds, whatever resolution the reader produced."""
    return pd.DatetimeIndex(frame["timestamp"]).as_unit("ns").asi8


def _line(frame: pd.DataFrame, i: int) -> object:
    return frame["_line"].iloc[i] if "_line" in frame else i + 1


def _drop(
    frame: pd.DataFrame, mask: np.ndarray, problem: str, source: str, repairs: dict[str, int]
) -> pd.DataFrame:
    """The ``repair`` side of the policy: drop, count, and log with the file name."""
    repairs[problem] = repairs.get(problem, 0) + int(mask.sum())
    log.warning("%s: dropped %d row(s): %s", source, int(mask.sum()), problem)
    return frame.loc[~mask].reset_index(drop=True)


def _fail_or_drop(
    frame: pd.DataFrame,
    mask: np.ndarray,
    field: str,
    problem: str,
    source: str,
    policy: str,
    repairs: dict[str, int],
) -> pd.DataFrame:
    if not mask.any():
        return frame
    if policy == "strict":
        i = int(np.flatnonzero(mask)[0])
        raise DataError(
            source,
            f"{problem} at {frame['timestamp'].iloc[i]} (data-policy=strict; 'repair' drops "
            "such rows)",
            row=_line(frame, i),
            field=field,
        )
    return _drop(frame, mask, problem, source, repairs)


def _unparsed(
    frame: pd.DataFrame, source: str, policy: str, repairs: dict[str, int]
) -> pd.DataFrame:
    """Rows a reader could not parse (a cell that is not a number or a time)."""
    if "_problem" not in frame:
        return frame
    mask = (frame["_problem"] != "").to_numpy()
    if mask.any() and policy == "strict":
        i = int(np.flatnonzero(mask)[0])
        raise DataError(
            source,
            f"{frame['_problem'].iloc[i]} (data-policy=strict; 'repair' drops such rows)",
            row=_line(frame, i),
            field=frame["_field"].iloc[i] or None,
        )
    if mask.any():
        frame = _drop(frame, mask, "unparseable cell or row", source, repairs)
    return frame.drop(columns=["_problem", "_field"])


def _newest_first_reversed(frame: pd.DataFrame) -> pd.DataFrame:
    """Many exports list the newest bar first; that order is a layout, not a defect."""
    steps = np.diff(_ns(frame))
    if (steps < 0).sum() > (steps > 0).sum():
        return frame.iloc[::-1].reset_index(drop=True)
    return frame


def _sorted(frame: pd.DataFrame, source: str, policy: str, repairs: dict[str, int]) -> pd.DataFrame:
    """Rows out of (ascending) order are corrupt: strict names the first, repair sorts."""
    stamps = frame["timestamp"]
    if stamps.is_monotonic_increasing:
        return frame
    backwards = np.flatnonzero(np.diff(_ns(frame)) < 0) + 1
    if policy == "strict":
        i = int(backwards[0])
        raise DataError(
            source,
            f"rows out of order: {stamps.iloc[i]} after {stamps.iloc[i - 1]} "
            "(data-policy=strict; 'repair' sorts them)",
            row=_line(frame, i),
            field="timestamp",
        )
    problem = "rows out of order (sorted)"
    repairs[problem] = len(backwards)
    log.warning("%s: sorted %d row(s) that were out of order", source, len(backwards))
    return frame.sort_values("timestamp", kind="stable").reset_index(drop=True)


def _deduplicated(
    frame: pd.DataFrame, source: str, policy: str, repairs: dict[str, int]
) -> pd.DataFrame:
    dup = frame["timestamp"].duplicated(keep="first").to_numpy()
    if not dup.any():
        return frame
    if policy == "strict":
        i = int(np.flatnonzero(dup)[0])
        raise DataError(
            source,
            f"duplicate timestamp {frame['timestamp'].iloc[i]} (data-policy=strict; 'repair' "
            "keeps one of identical copies)",
            row=_line(frame, i),
            field="timestamp",
        )
    exact = frame.duplicated(subset=["timestamp", *OHLCV], keep="first").to_numpy()
    if exact.any():
        frame = _drop(frame, exact, "exact duplicate row", source, repairs)
    conflict = frame["timestamp"].duplicated(keep=False).to_numpy()
    if conflict.any():
        frame = _drop(frame, conflict, "same timestamp with different values", source, repairs)
    return frame


def _replayed_rows(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Rows that repeat an earlier run of bars value for value: (mask, position of original).

    A row counts when its open, high, low, close and volume equal those of an earlier row,
    the bar has a range and a volume, and its neighbour repeats the neighbour of that
    earlier row at the same distance, i.e. a run of at least two consecutive copies.
    """
    values = frame[list(OHLCV)].to_numpy(dtype="float64")
    _, first_of_kind, kind = np.unique(values, axis=0, return_index=True, return_inverse=True)
    first = first_of_kind[kind.ravel()]
    position = np.arange(len(values))
    lively = (values[:, 1] > values[:, 2]) & (values[:, 4] > 0)
    lag = np.where(lively & (first < position), position - first, 0)
    before = np.concatenate([[0], lag[:-1]])
    after = np.concatenate([lag[1:], [0]])
    return (lag > 0) & ((lag == before) | (lag == after)), first


def _replays(
    frame: pd.DataFrame, source: str, policy: str, repairs: dict[str, int]
) -> pd.DataFrame:
    mask, first = _replayed_rows(frame)
    if not mask.any():
        return frame
    if policy == "strict":
        i = int(np.flatnonzero(mask)[0])
        j = int(first[i])
        raise DataError(
            source,
            f"the bar at {frame['timestamp'].iloc[i]} repeats, value for value, the bar at "
            f"{frame['timestamp'].iloc[j]} (row {_line(frame, j)}), in a run of copied bars "
            "(data-policy=strict; 'repair' drops the later copies)",
            row=_line(frame, i),
            field="open,high,low,close,volume",
        )
    return _drop(frame, mask, "replayed block of bars (later copy)", source, repairs)


def bar_interval(stamps: pd.Series | pd.DatetimeIndex) -> pd.Timedelta:
    """The series' bar: the most common step between consecutive bars (the shortest of ties)."""
    steps = np.diff(pd.DatetimeIndex(stamps).as_unit("ns").asi8)
    if len(steps) == 0:
        return pd.Timedelta(0)
    values, counts = np.unique(steps, return_counts=True)
    return pd.Timedelta(int(values[counts.argmax()]), unit="ns")


def _tolerance(interval: pd.Timedelta) -> int:
    """Nanoseconds a step may differ from a whole number of bars."""
    return DST_TOLERANCE.value if interval >= pd.Timedelta(days=1) else 0


def _off_grid(stamps: np.ndarray, interval: int, tolerance: int) -> np.ndarray:
    """Bars whose step from the last kept bar is not a whole number of bars.

    Scanned bar by bar (only when some step is off), so that after one stray bar the next
    regular bar is measured from the last kept one and is not dropped too.
    """
    off = np.zeros(len(stamps), dtype=bool)
    last = stamps[0]
    for i in range(1, len(stamps)):
        step = stamps[i] - last
        remainder = min(step % interval, interval - step % interval)
        if step > 0 and remainder <= tolerance:
            last = stamps[i]
        else:
            off[i] = True
    return off


def _intervals(
    frame: pd.DataFrame, source: str, policy: str, repairs: dict[str, int]
) -> pd.DataFrame:
    """Every step must be a whole number of bars; a missing bar is a gap, not an error."""
    interval = bar_interval(frame["timestamp"])
    if interval <= pd.Timedelta(0):
        return frame
    stamps = _ns(frame)
    steps = np.diff(stamps)
    remainder = np.minimum(steps % interval.value, interval.value - steps % interval.value)
    if (remainder <= _tolerance(interval)).all():
        return frame
    problem = f"step is not a multiple of the {interval} bar (mixed intervals)"
    if policy == "strict":
        mask = np.concatenate([[False], remainder > _tolerance(interval)])
        return _fail_or_drop(frame, mask, "timestamp", problem, source, policy, repairs)
    return _drop(
        frame, _off_grid(stamps, interval.value, _tolerance(interval)), problem, source, repairs
    )


def _report(bars: pd.DataFrame, interval: pd.Timedelta, repairs: dict[str, int]) -> dict:
    """What the operator should know about the series: size, gaps, flat bars, repairs."""
    steps = np.diff(bars.index.asi8)
    gap_at = np.flatnonzero(steps > interval.value + _tolerance(interval)) + 1
    gaps = steps[gap_at - 1]
    longest = int(gaps.argmax()) if len(gaps) else None
    return {
        "rows": len(bars),
        "first": str(bars.index[0]),
        "last": str(bars.index[-1]),
        "gaps": len(gaps),
        "missing_bars": int((np.round(gaps / interval.value) - 1).sum()),
        "longest_gap": str(pd.Timedelta(int(gaps[longest]))) if len(gaps) else "0",
        "longest_gap_ends": str(bars.index[gap_at[longest]]) if len(gaps) else None,
        "zero_volume_bars": int((bars["volume"].to_numpy() == 0).sum()),
        "repairs": repairs,
    }


def validate_bars(raw: pd.DataFrame, *, source: str, policy: str = "strict") -> pd.DataFrame:
    """Check a reader's raw frame and return the canonical one.

    Parameters
    ----------
    raw : pandas.DataFrame
        A ``timestamp`` column (tz-aware UTC), the OHLCV columns as float64, and optionally
        ``_line`` (where the row is in the file, for messages) and ``_problem`` /
        ``_field`` (a cell the reader could not parse).
    source : str
        The file (and asset) the rows came from, named in every error and log line.
    policy : {"strict", "repair"}
        ``strict`` raises on the first corrupt row; ``repair`` drops corrupt rows and counts
        each repair in ``attrs["report"]["repairs"]``.

    Returns
    -------
    pandas.DataFrame
        The canonical frame (see :func:`sigmax_fl.data.load_ohlcv`); gaps are reported in
        ``attrs["report"]`` and logged, never filled.
    """
    if policy not in POLICIES:
        raise DataError(
            source,
            f"unknown data-policy '{policy}', expected one of {list(POLICIES)}",
            field="data-policy",
        )
    if raw.empty:
        raise DataError(source, "no bars")
    repairs: dict[str, int] = {}
    frame = _unparsed(raw.reset_index(drop=True), source, policy, repairs)
    columns = {k: frame[k].to_numpy(dtype="float64") for k in OHLCV}
    for field, problem, check in _ROW_CHECKS:
        mask = check(columns)
        if mask.any():
            frame = _fail_or_drop(frame, mask, field, problem, source, policy, repairs)
            columns = {k: frame[k].to_numpy(dtype="float64") for k in OHLCV}
    if frame.empty:
        raise DataError(source, "no valid bars left after repair")
    frame = _newest_first_reversed(frame)
    for step in (_sorted, _deduplicated, _replays, _intervals):
        frame = step(frame, source, policy, repairs)
    bars = pd.DataFrame(
        {k: frame[k].to_numpy(dtype="float64") for k in OHLCV},
        index=pd.DatetimeIndex(frame["timestamp"], name="timestamp").as_unit("ns"),
    )
    interval = bar_interval(bars.index)
    report = _report(bars, interval, repairs)
    if report["gaps"]:
        log.info(
            "%s: %d gap(s), %d missing bar(s), longest %s ending %s; kept as gaps, not filled",
            source,
            report["gaps"],
            report["missing_bars"],
            report["longest_gap"],
            report["longest_gap_ends"],
        )
    bars.attrs = {"source": source, "bar_interval": interval, "report": report}
    return bars

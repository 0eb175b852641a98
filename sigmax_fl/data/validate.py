"""One policy for every layout: what counts as corrupt, and what is just real data.

Corrupt (``strict``: a :class:`DataError`; ``repair``: the row is dropped, counted and logged):
duplicate timestamps, rows out of order, bar intervals that are not multiples of the series'
interval, OHLC violations, non-positive prices, NaN cells, negative volume.

Not corrupt, and never "fixed": gaps (missing bars, market closures) and flat zero-volume
bars. They are counted in ``frame.attrs["report"]`` so the operator sees them, and
:mod:`sigmax_fl.features` decides how targets treat long gaps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pandas as pd

from sigmax_fl.data.errors import DataError

OHLCV = ("open", "high", "low", "close", "volume")
POLICIES = ("strict", "repair")

# A child of Flower's logger, so these lines reach `flwr log` and the run's stream.
log = logging.getLogger(f"flwr.{__name__}")


def _col(frame: pd.DataFrame, name: str) -> np.ndarray:
    return frame[name].to_numpy()


_ROW_CHECKS: list[tuple[str, str, Callable[[pd.DataFrame], np.ndarray]]] = [
    *[
        (k, "empty or NaN cell inside the series", lambda f, k=k: f[k].isna().to_numpy())
        for k in OHLCV
    ],
    ("close", "infinite value", lambda f: np.isinf(f[list(OHLCV)].to_numpy()).any(axis=1)),
    (
        "close",
        "non-positive price",
        lambda f: (f[["open", "high", "low", "close"]].to_numpy() <= 0).any(axis=1),
    ),
    (
        "high",
        "high below open or close",
        lambda f: _col(f, "high") < np.maximum(_col(f, "open"), _col(f, "close")),
    ),
    (
        "low",
        "low above open or close",
        lambda f: _col(f, "low") > np.minimum(_col(f, "open"), _col(f, "close")),
    ),
    ("volume", "negative volume", lambda f: _col(f, "volume") < 0),
]
"""(field, problem, mask of offending rows), in the order problems are reported."""


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
        line = frame["_line"].iloc[i] if "_line" in frame else i + 1
        stamp = frame["timestamp"].iloc[i]
        raise DataError(
            source,
            f"{problem} at {stamp} (data-policy=strict; 'repair' drops such rows)",
            row=line,
            field=field,
        )
    repairs[problem] = repairs.get(problem, 0) + int(mask.sum())
    log.warning("%s: dropped %d row(s): %s", source, int(mask.sum()), problem)
    return frame.loc[~mask].reset_index(drop=True)


def _order(frame: pd.DataFrame, source: str, policy: str, repairs: dict[str, int]) -> pd.DataFrame:
    """Ascending, or newest first as many exports are; rows out of that order are corrupt."""
    steps = frame["timestamp"].diff().dt.total_seconds()
    if (steps < 0).sum() > (steps > 0).sum():  # a newest-first export
        frame = frame.iloc[::-1].reset_index(drop=True)
    stamps = frame["timestamp"]
    if not stamps.is_monotonic_increasing:
        if policy == "strict":
            diffs = stamps.diff().dt.total_seconds().to_numpy()
            i = int(np.flatnonzero(diffs < 0)[0])
            line = frame["_line"].iloc[i] if "_line" in frame else i + 1
            raise DataError(
                source,
                f"rows out of order: {stamps.iloc[i]} after {stamps.iloc[i - 1]}",
                row=line,
                field="timestamp",
            )
        repairs["rows out of order (sorted)"] = int((stamps.diff().dt.total_seconds() < 0).sum())
        frame = frame.sort_values("timestamp", kind="stable").reset_index(drop=True)
    dup = frame["timestamp"].duplicated(keep=False).to_numpy()
    if dup.any():
        if policy == "strict":
            i = int(np.flatnonzero(dup)[1])
            line = frame["_line"].iloc[i] if "_line" in frame else i + 1
            raise DataError(
                source,
                f"duplicate timestamp {frame['timestamp'].iloc[i]}",
                row=line,
                field="timestamp",
            )
        exact = frame.duplicated(subset=["timestamp", *OHLCV], keep="first").to_numpy()
        frame = _fail_or_drop(
            frame, exact, "timestamp", "exact duplicate row", source, policy, repairs
        )
        conflict = frame["timestamp"].duplicated(keep=False).to_numpy()
        frame = _fail_or_drop(
            frame,
            conflict,
            "timestamp",
            "same timestamp with different values",
            source,
            policy,
            repairs,
        )
    return frame


def bar_interval(stamps: pd.Series | pd.DatetimeIndex) -> pd.Timedelta:
    """The series' bar: the most common step between consecutive bars."""
    steps = pd.Series(stamps).diff().dropna()
    if steps.empty:
        return pd.Timedelta(0)
    return steps.mode().iloc[0]


def _intervals(
    frame: pd.DataFrame, source: str, policy: str, repairs: dict[str, int]
) -> pd.DataFrame:
    """Every step must be a whole number of bars; a missing bar is a gap, not an error."""
    interval = bar_interval(frame["timestamp"])
    if interval <= pd.Timedelta(0):
        return frame
    steps = frame["timestamp"].diff().to_numpy()[1:]
    ratio = steps / interval.to_timedelta64()
    mixed = np.concatenate([[False], np.abs(ratio - np.round(ratio)) > 1e-9])
    return _fail_or_drop(
        frame,
        mixed,
        "timestamp",
        f"step is not a multiple of the {interval} bar (mixed intervals)",
        source,
        policy,
        repairs,
    )


def validate_bars(raw: pd.DataFrame, *, source: str, policy: str = "strict") -> pd.DataFrame:
    """Check a reader's raw frame and return the canonical one.

    Parameters
    ----------
    raw : pandas.DataFrame
        A ``timestamp`` column (tz-aware UTC), the OHLCV columns as float64, and optionally
        ``_line`` (the line number in the file, for messages).
    source : str
        The file (and asset) the rows came from, named in every error and log line.
    policy : {"strict", "repair"}
        ``strict`` raises on the first corrupt row; ``repair`` drops corrupt rows and counts
        each repair in ``attrs["report"]["repairs"]``.

    Returns
    -------
    pandas.DataFrame
        The canonical frame (see :func:`sigmax_fl.data.load_ohlcv`).
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
    frame = raw.reset_index(drop=True)
    for field, problem, check in _ROW_CHECKS:
        frame = _fail_or_drop(frame, check(frame), field, problem, source, policy, repairs)
    frame = _order(frame, source, policy, repairs)
    frame = _intervals(frame, source, policy, repairs)
    if frame.empty:
        raise DataError(source, "no valid bars left after repair")
    interval = bar_interval(frame["timestamp"])
    steps = frame["timestamp"].diff().dropna()
    gaps = steps[steps > interval]
    bars = frame.set_index("timestamp")[list(OHLCV)].astype("float64")
    bars.index.name = "timestamp"
    bars.attrs = {
        "source": source,
        "bar_interval": interval,
        "report": {
            "rows": len(bars),
            "first": str(bars.index[0]),
            "last": str(bars.index[-1]),
            "gaps": len(gaps),
            "missing_bars": int(((gaps / interval).round() - 1).sum()) if len(gaps) else 0,
            "longest_gap": str(gaps.max()) if len(gaps) else "0",
            "zero_volume_bars": int((bars["volume"] == 0).sum()),
            "repairs": repairs,
        },
    }
    return bars

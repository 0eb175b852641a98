"""Dates and durations from run-config text, without importing pandas.

Every ClientApp message checks its run config (:class:`sigmax_fl.settings.Settings`) and its
data source (:mod:`sigmax_fl.data.synthetic`), and a deployed SuperNode runs each message in a
fresh ClientApp process: importing pandas there for two dates cost about 0.2 s a message (and
each simulated actor's first round as much), while an instance whose features are cached
never needs pandas otherwise. ISO 8601 text is read by the standard library; anything else
goes to pandas as before, so what is accepted, and what it means, is unchanged.
"""

from __future__ import annotations

import re
from datetime import datetime

_SECONDS = {"d": 86400.0, "h": 3600.0, "min": 60.0, "m": 60.0, "s": 1.0}
UNITS = {"d": "days", "h": "hours", "min": "minutes", "m": "minutes", "s": "seconds"}
"""Duration suffix -> its unit, as ``pandas.Timedelta`` names it."""
_ISO = re.compile(r"\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:\d{2})?)?")
"""The ISO 8601 forms read without pandas: pandas reads them alike (it refuses some others the
standard library takes, such as week dates)."""
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(d|h|min|m|s)\s*")
_LONGEST = (2**63 - 1) / 1e9
"""Seconds in the longest ``pandas.Timedelta`` (int64 nanoseconds)."""


def parse_date(text: str) -> datetime:
    """``text`` as a point in time, as ``pandas.Timestamp`` reads it.

    ``2018-09-30`` and ``2018-09-30T12:30[:00[.f]][Z|+hh:mm]`` by ``datetime.fromisoformat``;
    anything else by pandas.

    Raises
    ------
    ValueError
        If it is no point in time.
    """
    if _ISO.fullmatch(str(text)):
        return datetime.fromisoformat(str(text))
    import pandas as pd

    stamp = pd.Timestamp(text)
    if stamp is pd.NaT:  # "", "nat", "nan": no point in time
        raise ValueError(f"not a date: {text!r}")
    return stamp.to_pydatetime()


def duration_parts(text: str) -> tuple[float, str]:
    """``"3d"``, ``"12h"``, ``"90min"``, ``"30s"`` -> (3.0, "days"), ...: the amount and its unit.

    Raises
    ------
    ValueError
        For anything else, for a duration that is not positive, and for one longer than a
        ``pandas.Timedelta`` holds (about 292 years), where features are built.
    """
    match = _DURATION.fullmatch(str(text))
    if not match or float(match[1]) <= 0:
        raise ValueError(f"not a positive duration: {text!r} (use e.g. '3d', '12h', '90min')")
    if float(match[1]) * _SECONDS[match[2]] > _LONGEST:
        raise ValueError(f"duration {text!r} is longer than about 292 years")
    return float(match[1]), UNITS[match[2]]

"""Dates and durations from run-config text, without importing pandas.

Every ClientApp message checks its run config (:class:`sigmax_fl.settings.Settings`) and its
data source (:mod:`sigmax_fl.data.synthetic`), and a deployed SuperNode runs each message in a
fresh ClientApp process: importing pandas there for two dates cost about 0.2 s a message (and
each simulated actor's first round as much), while an instance whose features are cached
never needs pandas otherwise. Plain ISO 8601 dates and times are read by the standard library;
any other text goes to pandas as before (and imports it), so what is accepted, and what it
means, is unchanged, but for text that is no point in time (``""``, ``"nat"``, ``"nan"``, which
pandas reads as NaT, whose error used to surface only when features were built) and year 0
(which pandas reads and Python's dates cannot hold): both are refused here.
"""

from __future__ import annotations

import re
from datetime import datetime

UNITS = {"d": "days", "h": "hours", "min": "minutes", "m": "minutes", "s": "seconds"}
"""Duration suffix -> its unit, as ``pandas.Timedelta`` names it."""
_ISO = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
    r"([T ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,6})?)?(Z|[+-][0-9]{2}:[0-9]{2})?)?"
)
"""The ISO 8601 forms read without pandas, which reads them alike (it refuses some others the
standard library takes, such as week dates)."""
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(d|h|min|m|s)\s*")


def parse_date(text: str) -> datetime:
    """``text`` as a point in time, as ``pandas.Timestamp`` reads it.

    ``2018-09-30`` and ``2018-09-30T12:30[:00[.f]][Z|+hh:mm]`` by ``datetime.fromisoformat``;
    anything else (and what that refuses, such as year 0) by pandas, to microseconds.

    Raises
    ------
    ValueError
        If it is no point in time.
    """
    if _ISO.fullmatch(str(text)):
        try:
            return datetime.fromisoformat(str(text))
        except ValueError:
            pass  # pandas decides
    import pandas as pd

    stamp = pd.Timestamp(text)
    if stamp is pd.NaT:  # "", "nat", "nan": no point in time
        raise ValueError(f"not a date: {text!r}")
    return stamp.to_pydatetime(warn=False)


def duration_parts(text: str) -> tuple[float, str]:
    """``"3d"``, ``"12h"``, ``"90min"``, ``"30s"`` -> (3.0, "days"), ...: the amount and its unit.

    Raises
    ------
    ValueError
        For anything else, and for a duration that is not positive.
    """
    match = _DURATION.fullmatch(str(text))
    if not match or float(match[1]) <= 0:
        raise ValueError(f"not a positive duration: {text!r} (use e.g. '3d', '12h', '90min')")
    return float(match[1]), UNITS[match[2]]

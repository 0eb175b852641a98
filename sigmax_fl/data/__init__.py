"""Market data in: exchange files (or synthetic venues) -> one canonical OHLCV frame, validated.

Public names (other modules and users rely on them): :func:`load_ohlcv`, :class:`DataError`,
:func:`resolve_source`, :func:`parse_sources`, :func:`simulation_sources`, :func:`source_for_node`,
:func:`source_digest`, :data:`BUNDLED`.
"""

from typing import Any

from sigmax_fl.data.errors import DataError
from sigmax_fl.data.sources import (
    BUNDLED,
    DataSource,
    parse_sources,
    resolve_source,
    simulation_sources,
    source_digest,
    source_for_node,
)

__all__ = [
    "BUNDLED",
    "DataError",
    "DataSource",
    "load_ohlcv",
    "parse_sources",
    "resolve_source",
    "simulation_sources",
    "source_digest",
    "source_for_node",
]


def __getattr__(name: str) -> Any:
    # Lazy: the readers import pandas, which an instance whose features are cached never needs
    # (sigmax_fl.dates says what that import costs each ClientApp process).
    if name == "load_ohlcv":
        from sigmax_fl.data.formats import load_ohlcv

        return load_ohlcv
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

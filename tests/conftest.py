"""Shared fixtures: bundled data paths and a private feature cache per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
DEFAULT_INSTANCES = (
    "coinbase-btc-usd-1d",
    "bitstamp-btc-usd-1d",
    "bitstamp-eth-usd-1d",
    "bitstamp-ltc-usd-1d",
)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Never read or write the user's real feature cache from a test."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SIGMAX_FL_CACHE_DIR", str(tmp_path_factory.mktemp("feature-cache")))
    yield
    mp.undo()

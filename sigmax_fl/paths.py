"""Where the project's ``data/`` and ``outputs/`` folders are, and how private files are made.

Flower runs the ServerApp and ClientApps from the installed app bundle (FAB), which holds only
Python and TOML files, in the SuperLink's working directory. So the checkout is found, in this
order: the folder above this package if its ``data/`` holds bars (running from the checkout), else
the source folder of the editable install that pip recorded in ``direct_url.json``.
"""

from __future__ import annotations

import json
import os
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

DISTRIBUTION = "sigmax-fl"

PRIVATE = 0o600
"""Mode of the files an instance derives from its own data (feature cache, kept state, own
model, DP ledger): readable by their owner alone, like the market and trading data itself."""


def create_private(path: Path) -> BinaryIO:
    """Open ``path`` for writing as a new or emptied file with mode :data:`PRIVATE`.

    The mode is set as the file is created, so no other user can open it in between, and
    again on a file that was already there (a temporary file left by an older version).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0)
    handle = os.open(path, flags, PRIVATE)
    try:
        if hasattr(os, "fchmod"):  # POSIX; Windows has no such modes
            os.fchmod(handle, PRIVATE)
        return os.fdopen(handle, "wb")
    except BaseException:
        os.close(handle)
        raise


@cache
def project_root() -> Path | None:
    """The sigmax-fl checkout this code belongs to, or None for a plain wheel install."""
    here = Path(__file__).resolve().parents[1]
    if _has_data(here):
        return here
    try:
        text = metadata.distribution(DISTRIBUTION).read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        return None
    if not text:
        return None
    info = json.loads(text)
    if not info.get("dir_info", {}).get("editable"):
        return None
    root = Path(unquote(urlparse(info["url"]).path))
    return root if _has_data(root) else None


def _has_data(root: Path) -> bool:
    # The app bundle has a data/ folder too, holding only PROVENANCE.md: look for bars.
    return any((root / "data").glob("*.csv"))

"""Where the project's ``data/`` and ``outputs/`` folders are, and how files reach the disk.

Flower runs the ServerApp and ClientApps from the installed app bundle (FAB), which holds only
Python and TOML files, in the SuperLink's working directory. So the checkout is found, in this
order: the folder above this package if its ``data/`` holds bars (running from the checkout), else
the source folder of the editable install that pip recorded in ``direct_url.json``.

Every file that something later starts from (checkpoints, history, what instances keep, the
feature cache, keys) is on disk (fsynced, file and folder) before it counts, and a reader never
sees half of one: :func:`write_durably` and its parts are here, free of torch, so that modules
kept torch-free can use them too.
"""

from __future__ import annotations

import errno
import json
import os
import uuid
from collections.abc import Callable
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

DISTRIBUTION = "sigmax-fl"

PRIVATE = 0o600
"""Mode of the files an instance derives from its own data (feature cache, kept state, own
model, DP ledger): readable by their owner alone, like the market and trading data itself."""
PRIVATE_FOLDER = 0o700
"""Mode of the folders made for those files: other users cannot list them either, so they do
not learn which instances, runs and markets this machine serves."""


def temporary(path: Path) -> Path:
    """A hidden name beside ``path``, to write before renaming onto it.

    A reader never sees half a file, a crash leaves the old one whole, and two writers never
    share one.
    """
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def write_durably(path: Path, write: Callable[[BinaryIO], object], mode: int = 0o666) -> None:
    """``write`` into a temporary file, fsync it, rename it onto ``path``, fsync the folder.

    ``mode`` is the new file's permissions before the umask (:data:`PRIVATE`: its owner's). A
    temporary file left by a failure (a full disk, a rename refused) is removed.
    """
    tmp = temporary(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)  # no \r\n on Windows
    try:
        with os.fdopen(os.open(tmp, flags, mode), "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        rename_durably(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str, mode: int = 0o666) -> None:
    """UTF-8 text, written durably (:func:`write_durably`, ``mode`` as there)."""
    write_durably(path, lambda handle: handle.write(text.encode("utf-8")), mode)


def rename_durably(tmp: Path, path: Path) -> None:
    """Rename a file already on disk onto ``path`` and fsync the folder, so the name is too."""
    os.replace(tmp, path)
    sync_folder(path.parent)


def make_folders(path: Path, mode: int = 0o777) -> Path:
    """``mkdir -p`` whose new folders survive a power cut: each one's parent is fsynced.

    Syncing a folder keeps the names in it (:func:`rename_durably`), but a folder's own name
    lives in its parent: a run folder made just before a cut, with its first checkpoint synced
    inside, could otherwise be gone after it on a file system that does not order metadata
    writes itself. A folder that exists costs one ``stat`` and keeps its mode; the ones made
    get ``mode`` before the umask (:data:`PRIVATE_FOLDER`: their owner's alone).
    """
    missing = []
    folder = path
    while not folder.is_dir():
        if folder.parent == folder:  # a missing drive or share (Windows) is its own parent
            raise FileNotFoundError(errno.ENOENT, "no such drive or share", str(folder))
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        folder.mkdir(mode, exist_ok=True)  # another writer may have made it meanwhile
        sync_folder(folder.parent)
    return path


def sync_folder(folder: Path) -> None:
    """Sync a folder (``fsync``), so that the names in it are on disk.

    Windows cannot open a folder to sync it, and leaves that to its file system; so do file
    systems whose folders do not support syncing (EINVAL): their writes are as durable as
    they make them.
    """
    if os.name == "nt":
        return
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise
    finally:
        os.close(handle)


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

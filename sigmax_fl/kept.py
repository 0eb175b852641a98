"""What an instance keeps on its own disk between the rounds of a run, so a resumed run finds it.

Two things live only on an instance and carry from one round to the next: its head under
``personalisation = "local-head"`` (:mod:`sigmax_fl.personal`) and the error-feedback residual
of an ``update-encoding`` other than float32 (:mod:`sigmax_fl.client_app`). Flower's
``context.state`` would hold them for one Flower run only, and a resumed run is a new Flower
run on possibly restarted SuperNodes, so both are files here, written as each round trains:

- ``<run>/<instance>/<kind>.pt``, the newest (a hard link to its round's file);
- ``<run>/<instance>/<kind>.rNNNNN.pt``, one per round trained, the last ``keep-checkpoints`` + 1
  of them (all with 0), so a run resumed from any checkpoint the server still keeps goes back to
  the state of that round, not to a newer one the instance trained past it before it stopped.

``<run>`` is the run's key, which every train and evaluate message carries
(:data:`sigmax_fl.strategy.RUN_KEY`, :func:`sigmax_fl.runs.run_key`): the server's run folder
name and a random id kept in that folder, so the same when the run resumes, with or without a
``run-name``, and another run's never, wherever its outputs go. One folder per instance keeps
each listing of kept rounds to a few files in a simulation of thousands of instances. Writers
of one instance's state take turns (a lock file), so a late message of an earlier round never
replaces the newest state.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

import torch

from sigmax_fl import runs
from sigmax_fl.dataset import default_cache_dir
from sigmax_fl.paths import PRIVATE, PRIVATE_FOLDER, make_folders, rename_durably, temporary
from sigmax_fl.settings import Settings

Tensors = dict[str, torch.Tensor]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def instance_dir(settings: Settings, run_id: int, instance_id: str) -> Path:
    """Where an instance keeps its state for one run, next to its feature cache.

    Keyed by ``run-name``, which the ClientApp sets to the run's key
    (:data:`sigmax_fl.strategy.RUN_KEY`), else by Flower's run id.
    """
    run = settings.run_name or f"run-{run_id}"
    return default_cache_dir().parent / "personal" / _safe(run) / _safe(instance_id)


def latest_path(settings: Settings, run_id: int, instance_id: str, kind: str) -> Path:
    """The newest ``kind`` state of an instance."""
    return instance_dir(settings, run_id, instance_id) / f"{kind}.pt"


def round_path(
    settings: Settings, run_id: int, instance_id: str, kind: str, server_round: int
) -> Path:
    """The ``kind`` state as one round left it."""
    return instance_dir(settings, run_id, instance_id) / f"{kind}.r{server_round:05d}.pt"


def kept_rounds(settings: Settings, run_id: int, instance_id: str, kind: str) -> dict[int, Path]:
    """The rounds whose ``kind`` state is still kept, and their files, oldest first."""
    files = instance_dir(settings, run_id, instance_id).glob(f"{kind}.r*.pt")
    return {int(p.name.rsplit(".r", 1)[1][:-3]): p for p in sorted(files)}


def save(
    settings: Settings,
    run_id: int,
    instance_id: str,
    kind: str,
    tensors: Tensors,
    server_round: int,
) -> Path:
    """Write the state atomically, as this round's and as the newest; keep a few rounds.

    The newest is a hard link to this round's file where the file system allows it, so a
    model-sized state is written once. A crash mid-write leaves the previous round's files
    whole; two writers (a late message of a timed-out round and the next round's) never share
    a temporary file.
    """
    path = latest_path(settings, run_id, instance_id, kind)
    make_folders(path.parent, PRIVATE_FOLDER)
    payload = {
        kind: {k: v.detach().clone() for k, v in tensors.items()},
        "run_id": run_id,
        "round": server_round,
    }
    this_round = round_path(settings, run_id, instance_id, kind, server_round)
    with _turn(path.parent):
        newer = [r for r in kept_rounds(settings, run_id, instance_id, kind) if r > server_round]
        runs.save_torch(payload, this_round, PRIVATE)
        if not newer:  # a late message of an earlier round does not replace the newest state
            tmp = temporary(path)
            try:
                os.link(this_round, tmp)
            except OSError:  # no hard links here (some network or FAT file systems): a copy
                runs.save_torch(payload, path, PRIVATE)
            else:
                rename_durably(tmp, path)
        keep = settings.keep_checkpoints + 1 if settings.keep_checkpoints else 0
        kept = list(kept_rounds(settings, run_id, instance_id, kind).values())
        for old in kept[:-keep] if keep else []:
            old.unlink()
    return path


@contextlib.contextmanager
def _turn(folder: Path) -> Iterator[None]:
    """Hold the instance folder's lock while saving.

    Two messages of one instance (a late one of an earlier round, and the next round's) then
    save one after the other. Without ``fcntl`` (Windows), no lock. The lock file is
    :data:`PRIVATE` too: another user who could open it could hold it and stall every save.
    """
    if fcntl is None:
        yield
        return
    lock = os.open(folder / ".lock", os.O_WRONLY | os.O_CREAT, PRIVATE)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    finally:
        os.close(lock)


@dataclass
class Found:
    """What :func:`load` found: the state, or None and why there is none."""

    tensors: Tensors | None
    missing: str = ""
    """``absent`` (never written), ``other-run`` (the files belonged to an earlier run under the
    same key, and this run, which does not resume, deleted them) or ``not-kept`` (only rounds
    too new are kept)."""
    path: Path = field(default_factory=Path)
    detail: str = ""
    """For the log or the error: whose files they are, or which rounds are kept."""


def load(settings: Settings, run_id: int, instance_id: str, kind: str, before_round: int) -> Found:
    """The newest ``kind`` state this instance wrote before round ``before_round``.

    Files of another Flower run count only when this run resumes (``resume-from``). Otherwise
    they are deleted here: this run writes its own under the same names from now on, and a
    round file of the other run left among them could be taken for one of this run's.
    """
    path = latest_path(settings, run_id, instance_id, kind)
    if not path.is_file():
        return Found(None, "absent", path)
    stored = torch.load(path, weights_only=True)
    if stored["run_id"] != run_id and not settings.resume_from:
        for old in [*kept_rounds(settings, run_id, instance_id, kind).values(), path]:
            old.unlink(missing_ok=True)
        detail = f"from run {stored['run_id']}, not this run {run_id}"
        return Found(None, "other-run", path, detail)
    if stored["round"] < before_round:
        return Found(dict(stored[kind]), path=path)
    rounds = kept_rounds(settings, run_id, instance_id, kind)
    usable = [r for r in rounds if r < before_round]
    if usable:
        return Found(dict(torch.load(rounds[max(usable)], weights_only=True)[kind]), path=path)
    return Found(None, "not-kept", path, f"kept rounds {sorted(rounds)}")

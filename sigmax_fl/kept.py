"""What an instance keeps on its own disk between the rounds of a run, so a resumed run finds it.

Two things live only on an instance and carry from one round to the next: its head under
``personalisation = "local-head"`` (:mod:`sigmax_fl.personal`) and the error-feedback residual
of an ``update-encoding`` other than float32 (:mod:`sigmax_fl.client_app`). Flower's
``context.state`` would hold them for one Flower run only, and a resumed run is a new Flower
run on possibly restarted SuperNodes, so both are files here, written as each round trains:

- ``<instance>.<kind>.pt``, the newest, which is what an unbroken run reads;
- ``<instance>.<kind>.rNNNNN.pt``, one per round trained, the last ``keep-checkpoints`` + 1 of
  them, so a run resumed from any checkpoint the server still keeps goes back to the state of
  that round, not to a newer one the instance trained past it before the server stopped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sigmax_fl.dataset import default_cache_dir
from sigmax_fl.settings import Settings

Tensors = dict[str, torch.Tensor]


def safe_name(name: str) -> str:
    """An instance id as a file-name part."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def run_dir(settings: Settings, run_id: int) -> Path:
    """Where an instance keeps its state for one run, next to its feature cache.

    Keyed by ``run-name`` when set (so a resumed run finds it), else by Flower's run id.
    """
    run = settings.run_name or f"run-{run_id}"
    return default_cache_dir().parent / "personal" / safe_name(run)


def latest_path(settings: Settings, run_id: int, instance_id: str, kind: str) -> Path:
    """The newest ``kind`` state of an instance."""
    return run_dir(settings, run_id) / f"{safe_name(instance_id)}.{kind}.pt"


def round_path(
    settings: Settings, run_id: int, instance_id: str, kind: str, server_round: int
) -> Path:
    """The ``kind`` state as one round left it."""
    return run_dir(settings, run_id) / f"{safe_name(instance_id)}.{kind}.r{server_round:05d}.pt"


def kept_rounds(settings: Settings, run_id: int, instance_id: str, kind: str) -> dict[int, Path]:
    """The rounds whose ``kind`` state is still kept, and their files."""
    pattern = f"{safe_name(instance_id)}.{kind}.r*.pt"
    files = run_dir(settings, run_id).glob(pattern)
    return {int(p.name.rsplit(".r", 1)[1][:-3]): p for p in sorted(files)}


def save(
    settings: Settings,
    run_id: int,
    instance_id: str,
    kind: str,
    tensors: Tensors,
    server_round: int,
) -> Path:
    """Write the state atomically, as the newest and as this round's; keep a few rounds.

    A crash mid-write leaves the previous round's files whole.
    """
    path = latest_path(settings, run_id, instance_id, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        kind: {k: v.detach().clone() for k, v in tensors.items()},
        "run_id": run_id,
        "round": server_round,
    }
    for target in (round_path(settings, run_id, instance_id, kind, server_round), path):
        tmp = target.with_name(f".{target.name}.tmp")
        torch.save(payload, tmp)
        tmp.replace(target)
    keep = settings.keep_checkpoints + 1 if settings.keep_checkpoints else 0
    kept = list(kept_rounds(settings, run_id, instance_id, kind).values())
    for old in kept[:-keep] if keep else []:
        old.unlink()
    return path


@dataclass
class Found:
    """What :func:`load` found: the state, or None and why there is none."""

    tensors: Tensors | None
    missing: str = ""
    """``absent`` (never written), ``other-run`` (the files belong to an earlier run of the
    same run-name and this run does not resume) or ``not-kept`` (only rounds too new are kept)."""
    path: Path = field(default_factory=Path)
    detail: str = ""
    """For the log or the error: whose files they are, or which rounds are kept."""


def load(settings: Settings, run_id: int, instance_id: str, kind: str, before_round: int) -> Found:
    """The newest ``kind`` state this instance wrote before round ``before_round``.

    Files of another Flower run count only when this run resumes (``resume-from``).
    """
    path = latest_path(settings, run_id, instance_id, kind)
    if not path.is_file():
        return Found(None, "absent", path)
    stored = torch.load(path, weights_only=True)
    if stored["run_id"] != run_id and not settings.resume_from:
        detail = f"from run {stored['run_id']}, not this run {run_id}"
        return Found(None, "other-run", path, detail)
    if stored["round"] < before_round:
        return Found(dict(stored[kind]), path=path)
    rounds = kept_rounds(settings, run_id, instance_id, kind)
    usable = [r for r in rounds if r < before_round]
    if usable:
        return Found(dict(torch.load(rounds[max(usable)], weights_only=True)[kind]), path=path)
    return Found(None, "not-kept", path, f"kept rounds {sorted(rounds)}")

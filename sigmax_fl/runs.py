"""A run's folder: run config, per-round history and audit, checkpoints, the final model.

The ServerApp runs in the SuperLink's working directory, not the project's, so the folder is
always an absolute path: ``outputs-dir`` if set, else ``$SIGMAX_FL_OUTPUTS_DIR``, else
the checkout's ``outputs/`` (see :mod:`sigmax_fl.paths`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterable
from itertools import chain, count
from pathlib import Path
from typing import Any

import torch

from sigmax_fl.paths import make_folders, project_root, sync_folder, write_durably, write_text

OUTPUTS_DIR_ENV = "SIGMAX_FL_OUTPUTS_DIR"
HISTORY_JSONL = "history.jsonl"
HISTORY_JSON = "history.json"
SUMMARY_JSON = "summary.json"

# A child of Flower's logger, so these lines reach `flwr log` and the run's stream.
log = logging.getLogger(f"flwr.{__name__}")
FINAL_MODEL = "final_model.pt"


def outputs_root(outputs_dir: str = "") -> Path:
    """Where run folders go: the setting, else the env var, else the checkout's outputs/."""
    if outputs_dir:
        return Path(outputs_dir).expanduser().resolve()
    if env := os.environ.get(OUTPUTS_DIR_ENV):
        return Path(env).expanduser().resolve()
    root = project_root()
    return (root if root is not None else Path.home() / "sigmax-fl") / "outputs"


def create_run_dir(outputs_dir: str, run_name: str, run_id: int) -> Path:
    """A new folder per run; a name already used gets a numeric suffix, never overwritten."""
    root = outputs_root(outputs_dir)
    name = run_name or time.strftime("run-%Y%m%d-%H%M%S", time.gmtime()) + f"-{run_id}"
    make_folders(root)
    return _fresh_folder(root, chain([name], (f"{name}-{k}" for k in count(2))))


def _fresh_folder(parent: Path, names: Iterable[str]) -> Path:
    """The first of ``names`` made here, its name synced into ``parent``.

    ``mkdir``, not ``exists()`` first: two writers that want one name never share its folder.
    """
    for name in names:
        try:
            (parent / name).mkdir()
        except FileExistsError:
            continue
        sync_folder(parent)
        return parent / name
    raise FileExistsError(f"every name offered for a new folder in {parent} is taken")


RUN_KEY_FILE = "run-key"


def run_key(run_dir: Path) -> str:
    """The key instances keep this run's state under: the folder name and a random id.

    The id is written into the folder once, when the run starts, so a resumed run (the same
    folder) has the same key; two runs never share one, even under the same name in two
    outputs folders, where the folder name alone would let them delete each other's state on
    instances they share (:mod:`sigmax_fl.kept`).
    """
    path = run_dir / RUN_KEY_FILE
    if not path.is_file():  # on disk before any instance keeps state under it
        write_text(path, uuid.uuid4().hex[:12])
    return f"{run_dir.name}-{path.read_text().strip()}"


def save_torch(obj: Any, path: Path, mode: int = 0o666) -> Path:
    """``torch.save``, on disk before it counts (:func:`~sigmax_fl.paths.write_durably`).

    Checkpoints and what instances keep are what a resume starts from, and older ones are
    deleted once a new one is written: renamed but not synced, a power cut could leave the new
    file empty with the old ones already gone.
    """
    write_durably(path, lambda handle: torch.save(obj, handle), mode)
    return path


def write_json(path: Path, payload: Any) -> None:
    """JSON, written durably (:func:`~sigmax_fl.paths.write_durably`).

    A reader never sees half a file, and a finished run's summary and history survive a power
    cut as its final model does.
    """
    write_text(path, json.dumps(payload, indent=1, default=str))


def append_history(run_dir: Path, record: dict[str, Any]) -> str:
    """One JSON line per round, flushed as it happens: a crash keeps every finished round.

    Returns the line written (without its newline), for :func:`chain_digest`.
    """
    line = json.dumps(record, default=str)
    _append_lines(run_dir / HISTORY_JSONL, [line])
    return line


def chain_digest(digest: str, line: str) -> str:
    """The digest of a history after one more line: sha256 of the previous digest and it.

    A checkpoint names the history it was written after by its number of lines and this
    digest (``""`` for none), which costs one line's hash a round, where holding the history
    itself made every checkpoint grow with the run: 1.35 s a round at round 1,000 of 100
    instances.
    """
    return hashlib.sha256(f"{digest}\n{line}".encode()).hexdigest()


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """Every round recorded so far, from the JSONL that survives a crash."""
    path = run_dir / HISTORY_JSONL
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class NothingTrainedError(RuntimeError):
    """No round a run's final model comes from changed it: it is the one the run started from."""


def check_trained(run_dir: Path, history: list[dict[str, Any]], final_round: int) -> list[int]:
    """The rounds of ``history`` that were skipped (global model kept), in order, logged.

    Raises :class:`NothingTrainedError` if no round up to ``final_round`` (the final model's:
    the last, or the best under early stopping) changed the global model, or no round ran at
    all. Such a run must not end as finished with a ``final_model.pt``, which automation would
    deploy as a trained model. Its history is written; a resumed run continues from its
    checkpoints.
    """
    skipped = [int(record["round"]) for record in history if record.get("skipped")]
    if any(int(r["round"]) <= final_round and not r.get("skipped") for r in history):
        if skipped:
            log.warning(
                "sigmax-fl: %s skipped, global model kept (see %s)",
                _rounds(skipped),
                run_dir / HISTORY_JSON,
            )
        return skipped
    if not history:
        why = "no round ran (the run stopped before its first, e.g. for dp-target-epsilon)"
    elif len(skipped) == len(history):
        why = f"{_rounds(skipped)} skipped"
    else:
        up_to = [r for r in skipped if r <= final_round]
        why = (
            f"the final model is round {final_round}'s, the best by validation, and "
            f"{_rounds(up_to)} skipped up to it"
        )
    raise NothingTrainedError(
        f"no round changed the global model: {why} ({run_dir / HISTORY_JSON} gives each "
        "instance's reply and why); no final model is written"
    )


def _rounds(numbers: list[int]) -> str:
    """``round 1 was`` / ``rounds 1, 2 were``."""
    if len(numbers) == 1:
        return f"round {numbers[0]} was"
    return f"rounds {', '.join(map(str, numbers))} were"


def save_model(run_dir: Path, state_dict: dict[str, torch.Tensor], name: str = FINAL_MODEL) -> Path:
    """A state dict that ``TradingModel().load_state_dict`` takes, written atomically."""
    return save_torch(state_dict, run_dir / name)


CHECKPOINTS = "checkpoints"
AUDIT_JSONL = "audit.jsonl"
CHECKPOINT_FORMAT = 2
"""2: the run's rounds stay in ``history.jsonl``, and a checkpoint holds how many of its lines
are the run's (``history_rounds``) and their :func:`chain_digest` (``history_digest``).
1: a checkpoint held the whole history; still read."""
READABLE_FORMATS = (1, 2)


def append_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Append lines and fsync: what a crash leaves is every line written before it."""
    _append_lines(path, [json.dumps(record, default=str) for record in records])


def _append_lines(path: Path, lines: list[str]) -> None:
    with path.open("a") as handle:
        for line in lines:
            handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def write_checkpoint(run_dir: Path, server_round: int, payload: dict[str, Any], keep: int) -> Path:
    """Save one round's server state atomically and keep only the newest ``keep`` files."""
    folder = make_folders(run_dir / CHECKPOINTS)
    path = folder / f"round-{server_round:05d}.pt"
    save_torch({"format": CHECKPOINT_FORMAT, **payload}, path)
    for old in sorted(folder.glob("round-*.pt"))[: -keep or None] if keep else []:
        old.unlink()
    return path


def find_checkpoint(resume_from: str, outputs_dir: str, run_name: str) -> Path:
    """Resolve ``resume-from``: ``latest``, a run folder, or a checkpoint file.

    ``latest`` means the newest checkpoint of run ``run-name`` if one is named, else of the
    most recently written run folder under the outputs root.
    """
    if resume_from == "latest":
        root = outputs_root(outputs_dir)
        if run_name:
            candidates = [root / run_name]
        else:
            candidates = sorted(
                (d for d in root.glob("*") if (d / CHECKPOINTS).is_dir()),
                key=lambda d: max(
                    (f.stat().st_mtime for f in (d / CHECKPOINTS).glob("round-*.pt")), default=0
                ),
            )[-1:]
        if not candidates:
            raise FileNotFoundError(f"resume-from = 'latest': no run with checkpoints under {root}")
        target = candidates[0]
    else:
        target = Path(resume_from).expanduser().resolve()
    if target.is_dir():
        folder = target / CHECKPOINTS if (target / CHECKPOINTS).is_dir() else target
        files = sorted(folder.glob("round-*.pt"))
        if not files:
            raise FileNotFoundError(f"resume-from: no round-*.pt checkpoint in {folder}")
        return files[-1]
    if not target.is_file():
        raise FileNotFoundError(f"resume-from: {target} is neither a run folder nor a checkpoint")
    return target


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint with torch's safe loader (tensors and plain containers only)."""
    payload = torch.load(path, weights_only=True)
    if payload.get("format") not in READABLE_FORMATS:
        raise ValueError(
            f"{path}: checkpoint format {payload.get('format')}, expected one of "
            f"{list(READABLE_FORMATS)}"
        )
    return payload


def checkpointed_history(checkpoint: Path, payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The rounds a checkpoint was written after (read only; :func:`rewind` also cuts files)."""
    if payload["format"] == 1:
        return json.loads(payload["history"])
    found = _read_lines(checkpoint.parent.parent / HISTORY_JSONL)
    return [json.loads(line) for line in _named_lines(checkpoint, payload, found)]


def _read_lines(path: Path) -> list[bytes]:
    """A file's lines as written, newlines kept; none if there is no file."""
    return path.read_bytes().splitlines(keepends=True) if path.is_file() else []


def _text(lines: list[bytes]) -> list[str]:
    """Lines as text, without their newlines."""
    return [line.rstrip(b"\r\n").decode("utf-8", "replace") for line in lines]


def _named_lines(checkpoint: Path, payload: dict[str, Any], found: list[bytes]) -> list[str]:
    """The first ``history_rounds`` of ``found``, the run's ``history.jsonl``, checked by digest.

    Lines after them are rounds written after the checkpoint: by a crash between history
    line and checkpoint, by a closing evaluate phase, or by the run an earlier checkpoint was
    resumed from. A missing, shortened or edited file is refused with what was found: the
    run's model state is in the checkpoint, but its history would be lost or wrong.
    """
    missing = [k for k in ("history_rounds", "history_digest") if k not in payload]
    if missing:
        raise ValueError(f"{checkpoint}: checkpoint format 2 without {missing}")
    path = checkpoint.parent.parent / HISTORY_JSONL
    wanted = int(payload["history_rounds"])
    lines = _text(found[:wanted])
    if len(lines) < wanted or not all(lines):
        have = (
            "no such file"
            if not path.is_file()
            else f"line {lines.index('') + 1} is empty"
            if not all(lines)
            else f"it has {len(lines)} line(s)"
        )
        raise ValueError(
            f"resume-from {checkpoint}: {path} must hold the {wanted} round(s) the checkpoint "
            f"was written after ({have}); restore that file from a backup (a finished run's "
            "history.json holds the same records as one list)"
        )
    if _digest(lines) != payload["history_digest"]:
        raise ValueError(
            f"resume-from {checkpoint}: the first {wanted} line(s) of {path} are not the rounds "
            "the checkpoint was written after (the file was edited or replaced); restore it from a "
            "backup (a finished run's history.json holds the same records as one list)"
        )
    return lines


def _digest(lines: list[str]) -> str:
    digest = ""
    for line in lines:
        digest = chain_digest(digest, line)
    return digest


ABANDONED = "abandoned"
"""Folder of a run's folder where each resume that drops something sets it aside."""


def rewind(checkpoint: Path, payload: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """Bring a run's folder back to a checkpoint; its history and the history's digest.

    Checked before anything changes (:func:`_named_lines`, :func:`_audit_split`). What the
    resumed run no longer stands on is then set aside, never deleted (:func:`_set_aside`): the
    lines of ``history.jsonl`` and ``audit.jsonl`` after the checkpoint's rounds, checkpoints
    of later rounds (a later ``resume-from`` would otherwise pick one whose history is gone)
    and, if there are any, the final model, ``summary.json`` and ``history.json`` of the run
    they belong to. Only then are ``history.jsonl`` cut in place and ``audit.jsonl``
    rewritten, both fsynced (a format 1 checkpoint writes its own history).
    """
    run_dir = checkpoint.parent.parent
    path = run_dir / HISTORY_JSONL
    audit = _audit_split(checkpoint, run_dir / AUDIT_JSONL, int(payload["round"]))
    found = _read_lines(path)
    if payload["format"] == 1:
        records = json.loads(payload["history"])
        lines = [json.dumps(r, default=str) for r in records]
        # The checkpoint's records replace the file: unless it starts with them, all of it goes
        kept = len(lines) if _text(found[: len(lines)]) == lines else 0
        digest = _digest(lines)
    else:
        lines = _named_lines(checkpoint, payload, found)
        records = [json.loads(line) for line in lines]
        kept, digest = len(lines), payload["history_digest"]
    later = [p for p in sorted(checkpoint.parent.glob("round-*.pt")) if p.name > checkpoint.name]
    # The run later checkpoints belong to may have finished: its final model, summary and
    # history list are not this run's, and must not stand beside its history. They move
    # first and the later checkpoints last: a resume stopped in between and tried again
    # still finds a later checkpoint, so it sets aside whatever of that run is left.
    ended = [*run_dir.glob("final_*.pt"), run_dir / HISTORY_JSON, run_dir / SUMMARY_JSON]
    files = [*ended, *reversed(later)] if later else []
    _set_aside(
        checkpoint,
        [f for f in files if f.is_file()],
        {HISTORY_JSONL: b"".join(found[kept:]), AUDIT_JSONL: audit[1] if audit else b""},
    )
    if payload["format"] == 1:
        _replace_lines(path, lines)
    else:
        with path.open("ab") as handle:  # created if a run with no scored round lost it
            handle.truncate(sum(len(line) for line in found[:kept]))
            os.fsync(handle.fileno())
    if audit is not None:
        write_durably(run_dir / AUDIT_JSONL, lambda handle: handle.write(audit[0]))
    return records, digest


def _set_aside(checkpoint: Path, files: list[Path], cut: dict[str, bytes]) -> None:
    """Move ``files`` and write the ``cut`` lines into a new folder of :data:`ABANDONED`.

    One folder per resume, numbered in order and named by the checkpoint and the time, so a
    second resume from an earlier round never overwrites what the first set aside. The cut
    lines are on disk before the caller cuts them from the run's files; a crash in between
    only sets them aside twice. Nothing to set aside: no folder.
    """
    cut = {name: data for name, data in cut.items() if data}
    if not files and not cut:
        return
    run_dir = checkpoint.parent.parent
    aside = make_folders(run_dir / ABANDONED)
    numbers = [p.name.split("-", 1)[0] for p in aside.iterdir()]
    first = max((int(n) for n in numbers if n.isdigit()), default=0) + 1
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    names = (f"{n:04d}-resumed-from-{checkpoint.stem}-{stamp}" for n in count(first))
    folder = _fresh_folder(aside, names)
    for file_name, data in cut.items():
        write_durably(folder / file_name, lambda handle, data=data: handle.write(data))
    if any(f.parent != run_dir for f in files):
        make_folders(folder / checkpoint.parent.name)
    for f in files:
        os.replace(f, folder / f.relative_to(run_dir))
    for synced in {folder, folder / checkpoint.parent.name, checkpoint.parent, run_dir}:
        if synced.is_dir():
            sync_folder(synced)
    log.info("sigmax-fl: resuming from %s set aside %s", checkpoint.name, folder)


def _audit_split(checkpoint: Path, path: Path, server_round: int) -> tuple[bytes, bytes] | None:
    """The bytes of the audit lines of rounds up to ``server_round``, and of the others.

    None if every line is kept. The last line may be one a crash cut short: it goes with the
    others. Any other line that is not an audit entry is refused, as the history is: the file
    is not the server's any more.
    """
    found = _read_lines(path)
    kept, dropped = [], []
    for number, (raw, line) in enumerate(zip(found, _text(found), strict=True), 1):
        try:
            entry_round = int(json.loads(line)["round"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            if number == len(found):
                dropped.append(raw)
                continue
            raise ValueError(
                f"resume-from {checkpoint}: {path} line {number} is not an audit entry (a JSON "
                "object with a 'round'); restore that file from a backup"
            ) from None
        (kept if entry_round <= server_round else dropped).append(raw)
    return (b"".join(kept), b"".join(dropped)) if dropped else None


def _replace_lines(path: Path, lines: list[str]) -> None:
    """Write a file's lines anew, durably (:func:`~sigmax_fl.paths.write_text`)."""
    write_text(path, "".join(line + "\n" for line in lines))

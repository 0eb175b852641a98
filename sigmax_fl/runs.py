"""A run's folder: the run config used, a per-round history, and the final model.

The ServerApp runs in the SuperLink's working directory, not the project's, so the folder is
always an absolute path: ``outputs-dir`` if set, else ``$SIGMAX_FL_OUTPUTS_DIR``, else
the checkout's ``outputs/`` (see :mod:`sigmax_fl.paths`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from sigmax_fl.paths import project_root

OUTPUTS_DIR_ENV = "SIGMAX_FL_OUTPUTS_DIR"
HISTORY_JSONL = "history.jsonl"
HISTORY_JSON = "history.json"
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
    path, k = root / name, 1
    while path.exists():
        k += 1
        path = root / f"{name}-{k}"
    path.mkdir(parents=True)
    return path


def write_json(path: Path, payload: Any) -> None:
    """Write-then-rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, path)


def append_history(run_dir: Path, record: dict[str, Any]) -> None:
    """One JSON line per round, flushed as it happens: a crash keeps every finished round."""
    with (run_dir / HISTORY_JSONL).open("a") as handle:
        handle.write(json.dumps(record, default=str) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """Every round recorded so far, from the JSONL that survives a crash."""
    path = run_dir / HISTORY_JSONL
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_model(run_dir: Path, state_dict: dict[str, torch.Tensor], name: str = FINAL_MODEL) -> Path:
    """A state dict that ``TradingModel().load_state_dict`` takes, written atomically."""
    path = run_dir / name
    tmp = path.with_name(f".{name}.tmp")
    torch.save(state_dict, tmp)
    os.replace(tmp, path)
    return path

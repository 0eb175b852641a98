"""Personalisation: what of the model an instance shares, keeps to itself, or adapts.

``personalisation`` in the run config:

- ``none``: the whole model is federated and every instance evaluates the global model.
- ``local-head``: only the body is federated. The head (:func:`sigmax_fl.model.head_keys`)
  lives on the instance's disk between rounds, is trained there together with the received
  body, and is never sent: the server sends, screens, averages and saves bodies only.
- ``fine-tune``: the whole model is federated; before scoring, each instance fine-tunes a copy
  of the received global model on its own training rows. The copy is not sent anywhere, so the
  global model is the one plain FedAvg makes.

The ServerApp, the ClientApp and ``compare`` call these functions, so they all split, store
and adapt models the same way.
"""

from __future__ import annotations

import copy
import logging
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sigmax_fl import kept, runs, task
from sigmax_fl.dataset import InstanceData
from sigmax_fl.model import build_model, head_keys
from sigmax_fl.paths import PRIVATE, PRIVATE_FOLDER, make_folders
from sigmax_fl.settings import Settings

log = logging.getLogger(f"flwr.{__name__}")

State = Mapping[str, torch.Tensor]
FINAL_BODY = "final_body.pt"
"""The ServerApp's artefact under local-head: the shared body, no head."""


def shared_keys(settings: Settings, model: nn.Module | None = None) -> tuple[str, ...]:
    """The state-dict keys that cross the wire: all of them, or the body's under local-head.

    ``model``, one of ``settings.model`` already built, saves building one per message.
    """
    state = (build_model(settings.model) if model is None else model).state_dict()
    if settings.personalisation != "local-head":
        return tuple(state)
    head = set(head_keys(settings.model, state))
    return tuple(k for k in state if k not in head)


def final_artefact(settings: Settings) -> str:
    """The server's saved model: the full global model, or under local-head the body alone."""
    return FINAL_BODY if settings.personalisation == "local-head" else runs.FINAL_MODEL


def split(state: State, model_name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(body, head) of a full state dict, each in the model's key order."""
    head = set(head_keys(model_name, state))
    body = {k: v for k, v in state.items() if k not in head}
    return body, {k: v for k, v in state.items() if k in head}


def fresh_head(model_name: str, seed: int, instance_id: str) -> dict[str, torch.Tensor]:
    """An instance's first head, seeded by the run seed and the instance id.

    A rerun, or an instance restarted without its file, starts from the same weights; two
    instances start from different ones.
    """
    model = build_model(model_name, seed=seed * 1_000_003 + zlib.crc32(instance_id.encode()))
    return split(model.state_dict(), model_name)[1]


def fine_tune_seed(seed: int, instance_id: str) -> int:
    """Batch order of an instance's fine-tuning: fixed per run and instance."""
    return seed * 1_000_003 + zlib.crc32(f"fine-tune:{instance_id}".encode())


def fine_tuned(model: nn.Module, X: np.ndarray, y: np.ndarray, **train_options: Any) -> nn.Module:
    """A copy of ``model`` trained on (X, y) by :func:`sigmax_fl.task.train`; ``model`` untouched.

    ``train_options`` are ``task.train``'s keyword arguments (``epochs``, ``seed``, ...).
    """
    tuned = copy.deepcopy(model)
    task.train(tuned, X, y, **train_options)
    return tuned


# ---------------------------------------------------------------------------------------------
# On the instance: its head file and its own full model


HEAD = "head"
"""The head's :mod:`sigmax_fl.kept` kind."""


def head_path(settings: Settings, run_id: int, instance_id: str) -> Path:
    """The instance's head between rounds: on its disk only."""
    return kept.latest_path(settings, run_id, instance_id, HEAD)


def model_path(settings: Settings, run_id: int, instance_id: str) -> Path:
    """The instance's own full model (shared body + its head), as last evaluated."""
    return kept.instance_dir(settings, run_id, instance_id) / "model.pt"


def load_head(
    settings: Settings, run_id: int, instance_id: str, before_round: int
) -> dict[str, torch.Tensor]:
    """The newest head this instance trained before round ``before_round``, else a fresh one.

    Training in round r uses the head of round r-1 (or earlier, if the instance sat a round
    out); evaluating round r uses round r's. A resumed run goes back to the kept head of the
    right round (:func:`sigmax_fl.kept.load`), and it is an error, not a fresh head under a
    trained body, when that round is no longer kept. An instance with no head at all in a
    resumed run starts a fresh one, as it would in the unbroken run if it had not trained yet,
    with a warning (its disk may have lost them).
    """
    found = kept.load(settings, run_id, instance_id, HEAD, before_round)
    if found.tensors is not None:
        return found.tensors
    if found.missing == "other-run":
        log.warning(
            "%s: head file %s is %s (and resume-from is not set): starting a fresh head",
            instance_id,
            found.path,
            found.detail,
        )
    elif found.missing == "not-kept" and before_round > 1:
        raise FileNotFoundError(
            f"{instance_id}: no head from before round {before_round} in {found.path.parent} "
            f"({found.detail}): personalisation = 'local-head' resumes only with each "
            "instance's heads (a checkpoint within keep-checkpoints of the newest)"
        )
    elif found.missing == "absent" and settings.resume_from and before_round > 1:
        # As in the unbroken run if this instance had not trained yet; if its disk lost the
        # head, the operator must hear it.
        log.warning(
            "%s: no head in %s to resume with: starting a fresh head (this instance's first "
            "round in this run, or its disk lost its heads)",
            instance_id,
            found.path.parent,
        )
    return fresh_head(settings.model, settings.seed, instance_id)


def save_head(
    settings: Settings, run_id: int, instance_id: str, head: State, server_round: int
) -> Path:
    """Keep the head on the instance's disk, as the newest and as this round's."""
    return kept.save(settings, run_id, instance_id, HEAD, dict(head), server_round)


# ---------------------------------------------------------------------------------------------
# The ClientApp's three call sites


def received_model(
    settings: Settings, arrays: State, instance_id: str, run_id: int, head_before: int
) -> nn.Module:
    """The model an instance trains or evaluates: the global model, or body + its own head.

    Under local-head the head is the newest this instance trained before round ``head_before``
    (:func:`load_head`).

    Raises
    ------
    ValueError
        If the arrays are not exactly what this run's server sends (under local-head: the body
        only), naming the difference: a head from the server would overwrite the instance's.
    """
    model = build_model(settings.model)
    expected = shared_keys(settings, model)
    if tuple(arrays) != expected:
        missing = sorted(set(expected) - set(arrays))
        extra = sorted(set(arrays) - set(expected))
        raise ValueError(
            f"{instance_id}: received arrays differ from what the server sends with "
            f"personalisation = '{settings.personalisation}' (missing {missing}, extra {extra})"
        )
    state = dict(arrays)
    if settings.personalisation == "local-head":
        state.update(load_head(settings, run_id, instance_id, head_before))
    model.load_state_dict(state)
    return model


def outgoing(
    settings: Settings, model: nn.Module, instance_id: str, run_id: int, server_round: int
) -> dict[str, torch.Tensor]:
    """What a train reply carries; under local-head the head is saved here and left out."""
    state = model.state_dict()
    if settings.personalisation != "local-head":
        return state
    body, head = split(state, settings.model)
    save_head(settings, run_id, instance_id, head, server_round)
    return body


def evaluated_model(
    settings: Settings,
    model: nn.Module,
    data: InstanceData,
    instance_id: str,
    run_id: int,
) -> nn.Module:
    """The model an instance scores: fine-tuned copy, its own full model, or the global one.

    Fine-tuning uses the instance's training settings (its own ``learning-rate`` included).

    Under local-head the full model (received body + own head) is also saved on the instance,
    so that after the last round each instance holds its own complete model.
    """
    if settings.personalisation == "fine-tune":
        return fine_tuned(
            model,
            data.X("train"),
            data.y("train"),
            epochs=settings.fine_tune_epochs,
            seed=fine_tune_seed(settings.seed, instance_id),
            **settings.training_options(),
        )
    if settings.personalisation == "local-head":
        path = model_path(settings, run_id, instance_id)
        make_folders(path.parent, PRIVATE_FOLDER)
        runs.save_torch(model.state_dict(), path, PRIVATE)
        log.info("%s: own model (shared body + own head) saved to %s", instance_id, path)
    return model

"""Multi-strategy collaboration: personalised vs plain federated vs local-only vs pooled.

Each instance runs its own strategy on its own market, so one global model may serve none of
them well. Two personalisations (:mod:`sigmax_fl.personal`) are set next to
:mod:`sigmax_fl.compare`'s three kinds, trained by the same loop on the same splits and seeds:

- **local-head**: the body is federated, each instance's head is trained with it and never
  averaged (it starts from :func:`sigmax_fl.personal.fresh_head`, as in the app);
- **fine-tune**: plain FedAvg, then each instance fine-tunes a copy of the global model for
  ``fine-tune-epochs`` on its own training rows before it forecasts.

Selection is as in the app's server: the learning rate and the round kept are those of least
validation loss over all instances, each instance scored with the model it would use (its own
head; its fine-tuned copy). Everything else (markets, local-only and pooled models, scoring,
bootstrap intervals, tables) is :mod:`sigmax_fl.compare`'s.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sigmax_fl import compare, personal, task
from sigmax_fl.model import build_model
from sigmax_fl.strategy import weighted_average

KINDS = ("local-head", "fine-tune", "federated", "local", "pooled")
LABELS = {
    **compare.LABELS,
    "local-head": "personalised: shared body + own head",
    "fine-tune": "federated + local fine-tune",
}
DIFFERENCES = (
    ("local-head", "federated"),
    ("local-head", "local"),
    ("fine-tune", "federated"),
    ("fine-tune", "local"),
)
NOTE = (
    "All federated kinds are trained in-process: each round every instance trains the model "
    "it received with the same `task.train` as the other kinds, and the updates are averaged by "
    "`sigmax_fl.strategy.weighted_average` (weights n_k / n_total capped at "
    "`max-weight-share`). local-head averages the bodies only; each instance's head starts from "
    "`personal.fresh_head` and stays with it. fine-tune is plain FedAvg whose instances each "
    "fine-tune a copy of the global model on their own training rows (`personal.fine_tuned`) "
    "before forecasting validation or test rows; its global models are the federated kind's. "
    "Flower's transport and the per-reply screening are not used."
)


class Members(nn.Module):
    """One full model per instance; the local-head step keeps their bodies equal.

    Holding the whole federation in one module lets :func:`sigmax_fl.compare._select` snapshot
    the kept round's shared body and every instance's head at once.
    """

    def __init__(self, model_name: str, seed: int, instance_ids: Sequence[str]) -> None:
        super().__init__()
        self.index = {name: i for i, name in enumerate(instance_ids)}
        start = build_model(model_name, seed=seed).state_dict()
        self.members = nn.ModuleList()
        for name in instance_ids:
            member = build_model(model_name)
            member.load_state_dict({**start, **personal.fresh_head(model_name, seed, name)})
            self.members.append(member)

    def member(self, instance_id: str) -> nn.Module:
        return self.members[self.index[instance_id]]


def _local_head_step(
    training: compare.Training, seed: int, markets: Sequence[compare.Market]
) -> compare.Step:
    """One round as the app runs it under local-head: train body + own head, average bodies."""
    examples = [m.data.rows("train") for m in markets]
    local_steps = [
        compare._local_step(training, seed, m.instance_id, m.data.X("train"), m.data.y("train"))
        for m in markets
    ]

    def step(model: nn.Module, server_round: int, lr: float) -> None:
        assert isinstance(model, Members)
        bodies = []
        for member, local_step in zip(model.members, local_steps, strict=True):
            local_step(member, server_round, lr)
            body, _ = personal.split(member.state_dict(), training.model)
            bodies.append({k: v.detach().numpy().copy() for k, v in body.items()})
        average = weighted_average(bodies, examples, training.max_weight_share)
        for member in model.members:
            state = member.state_dict()
            member.load_state_dict(
                {**state, **{k: torch.from_numpy(v).to(state[k].dtype) for k, v in average.items()}}
            )

    return step


def _tuned(
    model: nn.Module,
    market: compare.Market,
    training: compare.Training,
    seed: int,
    epochs: int,
    lr: float,
) -> nn.Module:
    return personal.fine_tuned(
        model,
        market.data.X("train"),
        market.data.y("train"),
        epochs=epochs,
        batch_size=training.batch_size,
        learning_rate=lr,
        optimizer=training.optimizer,
        seed=personal.fine_tune_seed(seed, market.instance_id),
    )


def fit_seed(
    markets: Sequence[compare.Market],
    training: compare.Training,
    seed: int,
    fine_tune_epochs: int = 1,
) -> dict[str, compare.KindFit]:
    """The five kinds for one seed, each kept model predicting each test split once."""
    ids = [m.instance_id for m in markets]

    # local-head: the federation's bodies and heads in one module
    selection, state = compare._select(
        training,
        seed,
        _local_head_step(training, seed, markets),
        markets,
        build=lambda: Members(training.model, seed, ids),
        predict=lambda model, m, lr: task.predict(model.member(m.instance_id), m.data.X("val")),
    )
    members = Members(training.model, seed, ids)
    members.load_state_dict(state)
    local_head = compare.KindFit({"all": selection}, {"all": state})
    for m in markets:
        local_head.test_pred[m.instance_id] = task.predict(
            members.member(m.instance_id), m.data.X("test")
        )

    # fine-tune: FedAvg, each instance scored by its fine-tuned copy of the global model
    def tuned_val(model: nn.Module, m: compare.Market, lr: float) -> np.ndarray:
        return task.predict(_tuned(model, m, training, seed, fine_tune_epochs, lr), m.data.X("val"))

    selection, state = compare._select(
        training,
        seed,
        compare._federated_step(training, seed, markets),
        markets,
        predict=tuned_val,
    )
    fine_tune = compare.KindFit({"all": selection}, {"all": state})
    global_model = build_model(training.model)
    global_model.load_state_dict(state)
    for m in markets:
        tuned = _tuned(global_model, m, training, seed, fine_tune_epochs, selection.learning_rate)
        fine_tune.test_pred[m.instance_id] = task.predict(tuned, m.data.X("test"))

    plain = compare.fit_seed(markets, training, seed)
    fits = {"local-head": local_head, "fine-tune": fine_tune, **plain}
    return {kind: fits[kind] for kind in KINDS}


def multi_strategy(request: compare.Request) -> dict[str, Any]:
    """Personalised (local-head, fine-tune) vs plain federated vs local-only vs pooled."""
    fit = functools.partial(fit_seed, fine_tune_epochs=request.fine_tune_epochs)
    result = compare.multi_market(
        request, use_case="multi-strategy", fit=fit, differences=DIFFERENCES
    )
    result["note"] = NOTE
    result["config"]["fine_tune_epochs"] = request.fine_tune_epochs
    return result


def render_markdown(result: dict[str, Any]) -> str:
    """compare.md: :func:`sigmax_fl.compare.render_markdown`'s tables with these kinds' labels."""
    text = compare.render_markdown(result, LABELS)
    # This use case writes no plots (compare's plots know the multi-market kinds only).
    lines = [line for line in text.splitlines() if not line.startswith("![")]
    lines[0] = "# Personalised vs federated vs local-only vs pooled: multi-strategy"
    epochs = result["config"]["fine_tune_epochs"]
    lines.insert(2, f"fine-tune: {epochs} epoch(s) on each instance's training rows.\n")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict[str, Any], out_dir: Path) -> None:
    """compare.json and compare.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.json").write_text(json.dumps(compare._json_safe(result), indent=1))
    (out_dir / "compare.md").write_text(render_markdown(result))

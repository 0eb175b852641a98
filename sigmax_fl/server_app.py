"""sigmax-fl ServerApp: rounds of weighted FedAvg over the trading instances.

Each round: send the global model to the sampled instances, screen and average their
updates, have them score the new model on their validation rows, record the round.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from sigmax_fl.model import build_model
from sigmax_fl.runs import HISTORY_JSON, append_history, create_run_dir, save_model, write_json
from sigmax_fl.settings import Settings
from sigmax_fl.strategy import Screened, WeightedFedAvg

log = logging.getLogger(f"flwr.{__name__}")

app = ServerApp()


@dataclass
class ServerState:
    """Everything the next round depends on (FedJAX style): a checkpoint is this object."""

    round: int
    arrays: ArrayRecord
    history: list[dict[str, Any]] = field(default_factory=list)


def _per_instance(train: list[Screened], evaluate: list[Screened]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for phase, screened in (("train", train), ("evaluate", evaluate)):
        for s in screened:
            entry = out.setdefault(s.instance_id, {"node_id": s.node_id})
            entry[phase] = {
                **s.metrics,
                "accepted": s.ok,
                **({"reason": s.reason} if s.reason else {}),
            }
    return out


def run_round(
    state: ServerState, strategy: WeightedFedAvg, grid: Grid, settings: Settings
) -> ServerState:
    """One federated round; returns the next state, leaving the given one untouched."""
    server_round = state.round + 1
    started = time.monotonic()

    # Train: send the global model, screen and average the replies
    train_replies = grid.send_and_receive(
        strategy.configure_train(server_round, state.arrays, ConfigRecord(), grid),
        timeout=settings.round_timeout,
    )
    new_arrays, train_metrics = strategy.aggregate_train(server_round, train_replies)
    arrays = new_arrays if new_arrays is not None else state.arrays

    # Evaluate: every sampled instance scores the new global model on its validation rows
    evaluate_replies = grid.send_and_receive(
        strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid),
        timeout=settings.round_timeout,
    )
    evaluate_metrics = strategy.aggregate_evaluate(server_round, evaluate_replies)

    # Record the round
    record = {
        "round": server_round,
        "seconds": round(time.monotonic() - started, 3),
        "skipped": new_arrays is None,
        "train": dict(train_metrics or {}),
        "evaluate": dict(evaluate_metrics or {}),
        "instances": _per_instance(strategy.last_train, strategy.last_evaluate),
    }
    return ServerState(server_round, arrays, [*state.history, record])


def _progress(record: dict[str, Any], total: int) -> str:
    train, evaluate = record["train"], record["evaluate"]

    def fmt(value: object) -> str:
        return f"{value:.6g}" if isinstance(value, float) else "n/a"

    return (
        f"round {record['round']}/{total} ({record['seconds']:.1f}s): "
        f"train_loss={fmt(train.get('train_loss'))} val_loss={fmt(evaluate.get('val_loss'))} "
        f"hit_rate={fmt(evaluate.get('hit_rate'))} ic={fmt(evaluate.get('ic'))} "
        f"replies ok={train.get('replies-ok', 0)} rejected={train.get('replies-rejected', 0)}"
        + (" SKIPPED (global model kept)" if record["skipped"] else "")
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` rounds and write the model and history to the run folder."""
    settings = Settings.from_run_config(context.run_config)
    run_dir = create_run_dir(settings.outputs_dir, settings.run_name, context.run_id)
    write_json(run_dir / "run_config.json", settings.to_run_config())
    log.info("sigmax-fl: outputs of this run go to %s", run_dir)

    model = build_model(settings.model, seed=settings.seed)
    strategy = WeightedFedAvg(
        fraction_train=settings.fraction_train,
        fraction_evaluate=settings.fraction_evaluate,
        min_train_nodes=settings.min_train_nodes,
        min_evaluate_nodes=settings.min_train_nodes,
        min_available_nodes=settings.min_available_nodes,
    )
    state = ServerState(round=0, arrays=ArrayRecord(model.state_dict()))
    while state.round < settings.num_server_rounds:
        state = run_round(state, strategy, grid, settings)
        append_history(run_dir, state.history[-1])
        log.info("sigmax-fl: %s", _progress(state.history[-1], settings.num_server_rounds))

    write_json(run_dir / HISTORY_JSON, state.history)
    path = save_model(run_dir, state.arrays.to_torch_state_dict())
    log.info("sigmax-fl: final model %s, history %s", path, run_dir / HISTORY_JSON)

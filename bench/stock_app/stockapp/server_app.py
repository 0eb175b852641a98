"""Quickstart-style ServerApp: Flower's stock FedAvg; round times via ``evaluate_fn`` stamps."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from sigmax_fl.model import build_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run stock FedAvg and write the per-round seconds to ``bench-out``."""
    rc = context.run_config
    n = int(rc["num-instances"])
    strategy = FedAvg(
        fraction_evaluate=float(rc["fraction-evaluate"]),
        min_available_nodes=n,
        min_train_nodes=n,
    )
    stamps: list[float] = []

    def stamp(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        # FedAvg.start calls this before round 1 and after each round's evaluate phase.
        del server_round, arrays
        stamps.append(time.monotonic())
        return None

    model = build_model("trading-mlp", seed=int(rc["seed"]))
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=int(rc["num-server-rounds"]),
        evaluate_fn=stamp,
    )
    seconds = [round(b - a, 3) for a, b in itertools.pairwise(stamps)]
    if rc["bench-out"]:
        Path(str(rc["bench-out"])).write_text(json.dumps({"seconds": seconds}))

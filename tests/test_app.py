"""The real app through Flower's simulation engine, on a SuperLink this test starts itself."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sigmax_fl.deploy.flwr_cli import FINISHED_OK, FlwrHome
from sigmax_fl.model import TradingModel, build_model

from .conftest import DEFAULT_INSTANCES, ROOT

pytestmark = pytest.mark.integration


def test_three_instances_two_rounds(simulation: FlwrHome, tmp_path: Path) -> None:
    # Prepare
    outputs = tmp_path / "outputs"
    sources = ",".join(DEFAULT_INSTANCES[1:])  # three instances
    log = io.StringIO()

    # Execute
    run_id = simulation.run_app(
        ROOT,
        "sim",
        run_config={
            "num-server-rounds": 2,
            "local-epochs": 1,
            "data-sources": sources,
            "outputs-dir": str(outputs),
            "run-name": "it",
            "min-available-nodes": 3,
        },
        federation_config={"num-supernodes": 3},
        sink=log,
        timeout=300,
    )

    # Assert: completed (not just exit 0), model changed, history complete
    assert simulation.run_status(run_id, "sim") == FINISHED_OK
    run_dir = outputs / "it"
    history = json.loads((run_dir / "history.json").read_text())
    assert [r["round"] for r in history] == [1, 2]
    for record in history:
        assert record["train"]["replies-ok"] == 3 and record["train"]["replies-rejected"] == 0
        assert np.isfinite(record["train"]["train_loss"]) and np.isfinite(
            record["evaluate"]["val_loss"]
        )
        assert set(record["instances"]) == set(DEFAULT_INSTANCES[1:])
    jsonl = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [r["round"] for r in jsonl] == [1, 2]
    assert len((run_dir / "audit.jsonl").read_text().splitlines()) == 6
    model = TradingModel()
    model.load_state_dict(torch.load(run_dir / "final_model.pt", weights_only=True))
    initial = build_model("trading-mlp", seed=42).state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in model.state_dict().items())
    assert json.loads((run_dir / "run_config.json").read_text())["num-server-rounds"] == 2
    assert "round 2/2" in log.getvalue()

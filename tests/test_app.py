"""The real app through Flower's simulation engine, on a SuperLink this test starts itself."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sigmax_fl.deploy.flwr_cli import FINISHED_OK, FlwrHome, simulation_federation_config
from sigmax_fl.model import TradingModel, build_model

from .conftest import DEFAULT_INSTANCES, ROOT, RUN_TIMEOUT

pytestmark = pytest.mark.integration


RUN_CONFIG = {
    "num-server-rounds": 2,
    "local-epochs": 1,
    "data-sources": ",".join(DEFAULT_INSTANCES[1:]),  # three instances
    "min-available-nodes": 3,
}


def _run(home: FlwrHome, outputs: Path, name: str, federation: dict) -> tuple[int, str]:
    log = io.StringIO()
    run_config = {**RUN_CONFIG, "outputs-dir": str(outputs), "run-name": name}
    run_id = home.run_app(
        ROOT,
        "sim",
        run_config=run_config,
        federation_config=federation,
        sink=log,
        timeout=RUN_TIMEOUT,
    )
    return run_id, log.getvalue()


@pytest.fixture(scope="module")
def default_run(
    simulation: FlwrHome, tmp_path_factory: pytest.TempPathFactory
) -> tuple[int, Path, str]:
    """Three instances, two rounds, on Flower's default Ray resources (one 2-CPU actor)."""
    outputs = tmp_path_factory.mktemp("outputs")
    run_id, log = _run(simulation, outputs, "it", {"num-supernodes": 3})
    return run_id, outputs / "it", log


def test_three_instances_two_rounds(simulation: FlwrHome, default_run) -> None:
    run_id, run_dir, log = default_run

    # Assert: completed (not just exit 0), model changed, history complete
    assert simulation.run_status(run_id, "sim") == FINISHED_OK
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
    assert "round 2/2" in log


def test_parallel_actors_train_the_same_model(
    simulation: FlwrHome, default_run, tmp_path: Path
) -> None:
    # Execute: the app's own federation config, two 1-CPU actors taking messages side by side
    _, reference, _ = default_run
    federation = simulation_federation_config(3, actors=2)
    run_id, _ = _run(simulation, tmp_path, "parallel", federation)

    # Assert: arrival order and the transport change nothing; the same seeds, the same model
    assert simulation.run_status(run_id, "sim") == FINISHED_OK
    parallel = torch.load(tmp_path / "parallel" / "final_model.pt", weights_only=True)
    serial = torch.load(reference / "final_model.pt", weights_only=True)
    assert parallel.keys() == serial.keys()
    for name, tensor in serial.items():
        torch.testing.assert_close(parallel[name], tensor, rtol=0, atol=1e-6)

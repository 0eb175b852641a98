"""Differential privacy wired into the app: noise applied, epsilon accounted and reported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from sigmax_fl.deploy.flwr_cli import FlwrHome
from sigmax_fl.privacy import compute_epsilon
from sigmax_fl.settings import ConfigError, Settings
from sigmax_fl.strategy import META_KEY, Defences, WeightedFedAvg

from .conftest import ROOT, RUN_TIMEOUT

SOURCES = "bitstamp-btc-usd-1d,bitstamp-eth-usd-1d,bitstamp-ltc-usd-1d"


def _reply(node: int, arrays: dict[str, np.ndarray]) -> Message:
    sent = Message(RecordDict(), dst_node_id=node, message_type="train")
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": 100}),
            META_KEY: ConfigRecord({"instance-id": f"i{node}"}),
        }
    )
    return Message(content, reply_to=sent)


def test_central_noise_is_applied_with_the_calibrated_std() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    glob = {"w": np.zeros((200, 100), np.float32)}
    replies = [_reply(i, {"w": np.full((200, 100), 0.01 * i, np.float32)}) for i in range(4)]
    results = []
    for std in (0.0, 0.05):
        strategy = WeightedFedAvg(defences=Defences(max_update_norm=1e9), noise_std=std)
        strategy._sent = ArrayRecord({k: Array(v) for k, v in glob.items()})
        arrays, _ = strategy.aggregate_train(1, replies)
        results.append(arrays["w"].numpy().astype(np.float64))
    noise = results[1] - results[0]
    assert np.std(noise) == pytest.approx(0.05, rel=0.05)
    assert abs(np.mean(noise)) < 0.005


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"dp": "central", "aggregation": "krum"}, "'aggregation'.*weighted-fedavg"),
        ({"dp": "central", "min-train-replies": 1}, "'min-train-replies' = 1: expected >= 2"),
        ({"dp": "everywhere"}, "'dp' = 'everywhere'"),
        ({"dp": "local", "dp-delta": 1.5}, "dp-delta"),
    ],
)
def test_incompatible_dp_settings_refused(config: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_run_config(config)


def test_central_dp_clips_every_update_to_the_dp_bound() -> None:
    defences = Settings(dp="central", dp_clip_norm=0.3, min_train_replies=2).defences()
    assert defences.max_update_norm == 0.3 and defences.update_norm_policy == "clip"


def run(home: FlwrHome, outputs: Path, name: str, **config: object) -> list[dict]:
    home.run_app(
        ROOT,
        "sim",
        run_config={
            "local-epochs": 1,
            "data-sources": SOURCES,
            "outputs-dir": str(outputs),
            "run-name": name,
            "min-available-nodes": 3,
            **config,
        },
        federation_config={"num-supernodes": 3},
        stream=False,
        timeout=RUN_TIMEOUT,
    )
    return json.loads((outputs / name / "history.json").read_text())


@pytest.mark.integration
def test_central_dp_epsilon_per_round_and_budget_stop(simulation: FlwrHome, tmp_path: Path) -> None:
    z, delta = 2.0, 1e-5
    target = (compute_epsilon(z, 1.0, 2, delta) + compute_epsilon(z, 1.0, 3, delta)) / 2
    history = run(
        simulation,
        tmp_path,
        "central",
        **{
            "num-server-rounds": 5,
            "dp": "central",
            "dp-clip-norm": 0.05,
            "dp-noise-multiplier": z,
            "dp-target-epsilon": target,
            "min-train-replies": 2,
        },
    )
    # Two rounds fit under the target, the third would exceed it: the run stops before it.
    assert [r["round"] for r in history] == [1, 2]
    for r in history:
        assert r["privacy"]["epsilon"] == pytest.approx(
            compute_epsilon(z, 1.0, r["round"], delta), rel=1e-9
        )
        assert all(i["train"]["update_norm"] is not None for i in r["instances"].values())
    summary = json.loads((tmp_path / "central" / "summary.json").read_text())
    assert summary["stopped_for_privacy_budget"] and summary["privacy"]["epsilon"] <= target


@pytest.mark.integration
def test_local_dp_epsilon_grows_and_persists(simulation: FlwrHome, tmp_path: Path) -> None:
    history = run(
        simulation,
        tmp_path,
        "local",
        **{"num-server-rounds": 2, "dp": "local", "dp-noise-multiplier": 1.5, "dp-clip-norm": 1.0},
    )
    eps = [r["privacy"]["epsilon"] for r in history]
    assert eps[0] > 0 and eps[1] > eps[0]
    for r in history:
        assert r["train"]["replies-ok"] == 3
        assert "train_loss" not in r["train"]  # computed from raw rows: not released under DP

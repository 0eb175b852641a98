"""compare --use-case multi-strategy: the app's personalisation, in-process, in compare's tables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sigmax_fl import compare, compare_strategy, personal
from sigmax_fl.model import build_model
from sigmax_fl.settings import Settings

from .conftest import default_markets, on_instances, run_compare, small_training
from .test_personalisation import INSTANCES, _config, _run


@pytest.fixture(scope="module")
def markets() -> list[compare.Market]:
    return default_markets(",".join(INSTANCES))


def test_local_head_round_is_the_apps_round(markets: list[compare.Market], tmp_path: Path) -> None:
    # The real ServerApp and ClientApp, one round under local-head
    config = _config(tmp_path, "one", **{"use-case": "multi-strategy", "num-server-rounds": 1})
    grid = _run(config, run_id=8201)
    app_body = torch.load(tmp_path / "outputs" / "one" / personal.FINAL_BODY, weights_only=True)

    # compare's local-head kind, one step from the same seed
    seed = Settings().seed
    model = compare_strategy.Members("trading-mlp", seed, list(INSTANCES))
    compare_strategy._local_head_step(small_training(1), seed, markets)(model, 1, 1e-3)

    for instance in INSTANCES:
        member = model.member(instance).state_dict()
        for k, v in app_body.items():
            torch.testing.assert_close(member[k], v, rtol=0, atol=1e-7)
        path = personal.head_path(on_instances(grid.settings), grid.run.run_id, instance)
        head = torch.load(path, weights_only=True)["head"]
        for k, v in head.items():
            torch.testing.assert_close(member[k], v, rtol=0, atol=1e-7)
    heads = [model.member(i).state_dict()["net.4.weight"] for i in INSTANCES]
    assert not torch.equal(heads[0], heads[1])


def test_fine_tune_kind_tunes_a_model_of_the_federated_trajectory(
    markets: list[compare.Market],
) -> None:
    training = small_training(2)
    seed = 7
    fits = compare_strategy.fit_seed(markets, training, seed, fine_tune_epochs=1)
    assert tuple(fits) == compare_strategy.KINDS
    kept = fits["fine-tune"].selections["all"].best_round

    # The kept global model is plain FedAvg's after that many rounds
    model = build_model("trading-mlp", seed=seed)
    step = compare._federated_step(training, seed, markets)
    for server_round in range(1, kept + 1):
        step(model, server_round, training.learning_rates[0])
    for k, v in model.state_dict().items():
        assert torch.equal(fits["fine-tune"].states["all"][k], v), k

    # ... and the forecasts are not that global model's
    plain = compare._predict_test("trading-mlp", fits["fine-tune"].states["all"], markets[0])
    assert not np.allclose(plain, fits["fine-tune"].test_pred[markets[0].instance_id])


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("compare-strategy")
    return run_compare(out, "--use-case", "multi-strategy", "--data-sources", ",".join(INSTANCES))


def test_writes_every_kind_per_instance_with_intervals(run: Path) -> None:
    result = json.loads((run / "compare.json").read_text())
    markdown = (run / "compare.md").read_text()
    assert result["use_case"] == "multi-strategy"
    assert result["config"]["fine_tune_epochs"] == 1
    assert set(result["scopes"]) == {*INSTANCES, compare.POOLED_SCOPE}
    for scope in result["scopes"].values():
        assert list(scope["models"]) == [*compare_strategy.KINDS, *compare.BASELINES]
        assert set(scope["differences"]) == {f"{a} - {b}" for a, b in compare_strategy.DIFFERENCES}
        for kind in compare_strategy.KINDS:
            mse = scope["models"][kind]["mse"]
            assert mse["ci_low"] <= mse["value"] <= mse["ci_high"]
    assert set(result["selection"]) == set(compare_strategy.KINDS)
    # Personalised forecasts differ from the plain federated ones
    pooled = result["scopes"][compare.POOLED_SCOPE]["models"]
    mse = {kind: pooled[kind]["mse"]["value"] for kind in compare_strategy.KINDS}
    assert len(set(mse.values())) == len(mse)
    for kind in compare_strategy.KINDS:
        assert compare_strategy.LABELS[kind] in markdown
    assert not list(run.glob("*.png"))

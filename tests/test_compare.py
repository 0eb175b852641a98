"""compare: fair by construction, selection on validation only, outputs written (small, fast)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from sigmax_fl import compare
from sigmax_fl.settings import Settings
from sigmax_fl.strategy import weighted_average

from .conftest import default_markets, run_compare, small_training

INSTANCES = "coinbase-btc-usd-1d,bitstamp-eth-usd-1d"


@pytest.fixture(scope="module")
def markets() -> list[compare.Market]:
    return default_markets(INSTANCES)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("compare")
    return run_compare(out, "--data-sources", INSTANCES)


def test_writes_json_markdown_and_plots_with_every_model_and_baseline(run: Path) -> None:
    result = json.loads((run / "compare.json").read_text())
    markdown = (run / "compare.md").read_text()
    assert set(result["scopes"]) == {*INSTANCES.split(","), compare.POOLED_SCOPE}
    for scope in result["scopes"].values():
        assert set(scope["models"]) == {*compare.KINDS, *compare.BASELINES}
        assert set(scope["models"]["federated"]) == set(compare.METRICS)
        ic = scope["models"]["federated"]["ic"]
        assert ic["ci_low"] <= ic["value"] <= ic["ci_high"]
        assert set(scope["differences"]) == {"federated - local", "federated - pooled"}
    assert result["config"]["seeds"] == [42, 43]
    for label in compare.LABELS.values():
        assert label in markdown
    assert "weighted_average" in markdown and "in-process" in markdown
    for name in ("compare_metrics.png", "compare_pnl.png", "compare_validation.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_federated_round_is_the_apps_weighted_average_of_the_local_rounds(markets) -> None:
    # With one round, local-only models are exactly each instance's round of training from
    # the shared initial weights, so FedAvg must be their weighted average.
    fits = compare.fit_seed(markets, small_training(rounds=1), seed=3)
    local = [
        {k: v.numpy() for k, v in fits["local"].states[m.instance_id].items()} for m in markets
    ]
    expected = weighted_average(
        local, [m.data.rows("train") for m in markets], Settings().max_weight_share
    )
    for name, tensor in fits["federated"].states["all"].items():
        np.testing.assert_allclose(tensor.numpy(), expected[name], rtol=1e-6, atol=1e-7)
    for m in markets:
        assert not np.allclose(
            fits["federated"].test_pred[m.instance_id], fits["local"].test_pred[m.instance_id]
        )


def test_selection_never_sees_the_test_split_and_each_model_predicts_it_once(
    markets, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the same markets with test features and targets replaced by noise
    rng = np.random.default_rng(0)
    scrambled = []
    for m in markets:
        arrays = dict(m.data.arrays)
        arrays["X_test"] = rng.normal(size=arrays["X_test"].shape).astype(np.float32)
        arrays["y_test"] = rng.normal(size=arrays["y_test"].shape).astype(np.float32)
        scrambled.append(replace(m, data=replace(m.data, arrays=arrays)))
    calls: list[str] = []
    predict = compare._predict_test
    monkeypatch.setattr(
        compare,
        "_predict_test",
        lambda name, state, market: (
            calls.append(market.instance_id) or predict(name, state, market)
        ),
    )

    # Execute
    original = compare.fit_seed(markets, small_training(rounds=3), seed=1)
    changed = compare.fit_seed(scrambled, small_training(rounds=3), seed=1)

    # Assert: same rounds, curves and weights; one test prediction per model and instance
    for kind in compare.KINDS:
        assert original[kind].selections == changed[kind].selections
        for unit, state in original[kind].states.items():
            for name, tensor in state.items():
                assert torch.equal(tensor, changed[kind].states[unit][name])
    per_fit = len(compare.KINDS) * len(markets)
    assert sorted(calls) == sorted([m.instance_id for m in markets] * len(compare.KINDS) * 2)
    assert len(calls) == 2 * per_fit


def test_the_learning_rate_is_chosen_among_candidates_on_validation(markets) -> None:
    one = compare.fit_seed(markets[:1], small_training(rounds=2), seed=0)
    grid = replace(small_training(rounds=2), learning_rates=(1e-2, 1e-3))
    two = compare.fit_seed(markets[:1], grid, seed=0)
    for kind in compare.KINDS:
        (chosen,) = two[kind].selections.values()
        (single,) = one[kind].selections.values()
        assert chosen.learning_rate in grid.learning_rates
        assert min(chosen.val_loss) <= min(single.val_loss)


def test_the_pooled_scope_aligns_instances_on_their_union_of_bars(markets) -> None:
    fits = [compare.fit_seed(markets, small_training(rounds=1), seed=0)]
    scopes = compare.build_scopes(markets, fits)
    pooled = scopes[-1]
    assert pooled.name == compare.POOLED_SCOPE
    assert pooled.realised.shape == (len(markets), len(pooled.times))
    assert np.sum(~np.isnan(pooled.realised)) == sum(m.data.rows("test") for m in markets)
    assert pooled.preds["federated"].shape == (1, len(markets), len(pooled.times))
    # the reversal baseline is minus the last return, which is the previous bar's target
    m = markets[1]
    y = m.data.y("test")
    np.testing.assert_allclose(-m.last_return[1:], -y[:-1], rtol=1e-5, atol=1e-7)


def test_unknown_use_case_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown use case 'risky'.*multi-market"):
        compare.compare(INSTANCES, 1, None, 1, use_case="risky")


def test_a_volatility_target_is_compared_by_the_risk_use_case_only() -> None:
    settings = Settings(use_case="multi-strategy", target="volatility")
    with pytest.raises(ValueError, match="target 'volatility' is compared by use case 'risk'"):
        compare.compare(INSTANCES, 1, None, 1, use_case="multi-strategy", settings=settings)

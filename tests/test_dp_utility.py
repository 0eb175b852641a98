"""dp-utility: the app's central-DP round measured in-process (small, fast)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sigmax_fl import cli, compare, dp_utility
from sigmax_fl.model import build_model
from sigmax_fl.privacy import central_noise_std, private_aggregate
from sigmax_fl.strategy import capped_shares

from .conftest import default_markets, small_training

INSTANCES = "coinbase-btc-usd-1d,bitstamp-eth-usd-1d"


@pytest.fixture(scope="module")
def markets() -> list[compare.Market]:
    return default_markets(INSTANCES)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dp-utility")
    code = cli.main(
        [
            "dp-utility",
            "--data-sources",
            INSTANCES,
            "--synthetic",
            "synthetic:2:signal=0.2",
            "--rounds",
            "2",
            "--local-epochs",
            "1",
            "--synthetic-rounds",
            "1",
            "--noise-multipliers",
            "0,1,3",
            "--seeds",
            "1",
            "--bootstrap",
            "50",
            "--workers",
            "1",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    return out


def test_writes_one_table_per_data_set_with_every_level(run: Path) -> None:
    result = json.loads((run / "dp_utility.json").read_text())
    markdown = (run / "dp_utility.md").read_text()
    assert set(result["datasets"]) == {"real", "synthetic"}
    for d in result["datasets"].values():
        assert d["max_weight_share"] == pytest.approx(1 / d["instances"])
        assert d["clip_norm"] > 0
        assert d["sensitivity"] == pytest.approx(2 * d["max_weight_share"] * d["clip_norm"])
        names = [row["level"] for row in d["levels"]]
        assert names[:4] == [
            dp_utility.NON_PRIVATE,
            "central z=0 (clip only)",
            "central z=1",
            "central z=3",
        ]
        for row in d["levels"]:
            for metric in ("r2_oos", "ic"):
                e = row["metrics"][metric]
                assert e["ci_low"] <= e["value"] <= e["ci_high"] or e["value"] < -1e3
            if row["mode"] == "central":
                assert row["noise_std"] == pytest.approx(row["noise_multiplier"] * d["sensitivity"])
                assert set(row["vs_non_private"]) == set(dp_utility.METRICS)
    assert result["datasets"]["synthetic"]["levels"][-1]["level"] == dp_utility.ORACLE
    local = result["datasets"]["real"]["levels"][-1]  # DP-SGD, by default on the real data only
    assert (local["level"], local["mode"]) == ("local z=1", "local")
    assert 0 < local["epsilon"] == max(local["epsilon_per_instance"].values())
    assert set(local["epsilon_per_instance"]) == set(INSTANCES.split(","))
    assert not any(r["mode"] == "local" for r in result["datasets"]["synthetic"]["levels"])
    assert "central z=1" in markdown and "| ΔR² | ΔIC |" in markdown


def test_epsilon_falls_as_the_noise_rises(run: Path) -> None:
    result = json.loads((run / "dp_utility.json").read_text())
    rows = [r for r in result["datasets"]["real"]["levels"] if r["mode"] == "central"]
    epsilon = [math.inf if r["epsilon"] is None else r["epsilon"] for r in rows]
    assert epsilon[0] == math.inf  # z = 0: clipping alone protects nothing
    assert epsilon[0] > epsilon[1] > epsilon[2] > 0
    curve = rows[1]["epsilon_per_round"]
    assert len(curve) == 2 and curve[0] < curve[1]  # and grows with the rounds


def test_central_noise_is_the_apps() -> None:
    assert dp_utility.central_noise(0.7, 1.5, 0.25) == pytest.approx(1.5 * 2 * 0.25 * 0.7)
    assert dp_utility.central_noise(0.7, 1.5, 0.25) == central_noise_std(
        0.7, 1.5, 0.25, renormalised=True
    )
    assert dp_utility.central_noise(0.7, 0.0, 0.01) == 0.0


def test_clip_only_with_a_large_bound_is_the_non_private_federation(
    markets: list[compare.Market],
) -> None:
    training = small_training(rounds=2)
    private = build_model(training.model, seed=5)
    plain = build_model(training.model, seed=5)
    step = dp_utility.central_step(
        training,
        5,
        markets,
        clip_norm=1e6,
        noise_std=dp_utility.central_noise(1e6, 0.0, training.max_weight_share),
    )
    reference = compare._federated_step(training, 5, markets)
    for server_round in (1, 2):
        step(private, server_round, 1e-3)
        reference(plain, server_round, 1e-3)
    for name, value in plain.state_dict().items():
        assert torch.equal(private.state_dict()[name], value), name


def test_a_private_round_is_the_privacy_modules_mechanism(markets: list[compare.Market]) -> None:
    training = small_training(rounds=1, max_weight_share=0.5)
    model = build_model(training.model, seed=3)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    updates = []
    for m in markets:
        model.load_state_dict(start)
        compare._local_step(training, 3, m.instance_id, m.data.X("train"), m.data.y("train"))(
            model, 1, 1e-3
        )
        updates.append({k: v.numpy().copy() for k, v in model.state_dict().items()})
    shares = capped_shares([m.data.rows("train") for m in markets], 0.5)
    clip, std = 0.2, 1e-2
    expected, factors = private_aggregate(
        {k: v.numpy() for k, v in start.items()},
        updates,
        list(shares),
        clip_norm=clip,
        noise_std=std,
        rng=np.random.default_rng([11, 1]),
    )
    assert max(factors) < 1  # the bound binds: every update was clipped
    norms: list[float] = []
    model.load_state_dict(start)
    dp_utility.central_step(
        training, 3, markets, clip_norm=clip, noise_std=std, noise_seed=11, norms=norms
    )(model, 1, 1e-3)
    assert len(norms) == len(markets) and min(norms) > clip
    got = model.state_dict()
    for name, value in expected.items():
        np.testing.assert_allclose(got[name].numpy(), value, rtol=0, atol=1e-6)
    drift = np.concatenate([(got[k].numpy() - start[k].numpy()).ravel() for k in start])
    assert np.std(drift) == pytest.approx(std, rel=0.1)  # the noise dominates the clipped step

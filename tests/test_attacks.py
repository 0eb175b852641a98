"""A small, fast version of ``make attacks``: the app's own defences against one hostile instance.

Five synthetic instances, three rounds, the app's ServerApp, strategy and ClientApp over an
in-process grid (see :mod:`sigmax_fl.attacks`). At this scale losing one instance of five
already moves the test R^2 by more than 10 %, so "keeps 90 % of the clean run" would measure
the attacker's absence, not its attack. The assertion here is stronger and exact: when the
defence rejects the attacker in every round, the final model is bit-identical to the model of
the federation in which the attacker's instance does not take part at all.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sigmax_fl import attacks
from sigmax_fl.settings import Settings

SETUP = attacks.Setup(
    instances=5,
    rounds=3,
    local_epochs=1,
    attacker=1,
    start="2017-10-01",
    end="2019-01-31",
    train_end="2018-10-31",
    val_end="2018-12-15",
)
REJECTED = {
    "nan": ("non-finite", "holds NaN or Inf"),
    "scaled-1e6": ("norm-bound", "above bound"),
    "sign-flip-100": ("norm-bound", "above bound"),
    "other-architecture": ("architecture", "the global model has"),
    "renamed-architecture": ("architecture", "array names differ"),
    "num-examples-1e9": ("plausibility", "max-examples-per-node"),
}
NAMES = [name for name in attacks.DEFAULT_ATTACKS if not attacks.ATTACKS[name].adaptive]
"""The issue's attacks and the attacker-absent reference (the adaptive one needs the full
scale of ``make attacks`` to be measured)."""
POTENT = ("nan", "scaled-1e6", "sign-flip-100", "other-architecture", "renamed-architecture")
"""Attacks that wreck (or stop) plain FedAvg, so a passing defence is not a vacuous one."""


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("attacks")
    return {"out": out, **attacks.run_all(SETUP, NAMES, out, workers=1)}


def _row(result: dict, name: str) -> dict:
    return next(r for r in result["rows"] if r["attack"] == name)


def _audit(result: dict, name: str) -> list[dict]:
    path = result["out"] / "runs" / name / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_clean_run_learns_the_planted_signal(result: dict) -> None:
    assert result["clean"]["ic"] > 0.2 and result["clean"]["r2"] > 0.02
    assert result["clean_rejections"] == 0


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_attacker_rejected_every_round_and_model_unharmed(result: dict, name: str) -> None:
    # The app's own audit log names the attacker and the reason, in every round
    kind, phrase = REJECTED[name]
    audit = _audit(result, name)
    mine = [a for a in audit if a["instance_id"] == result["attacker"]]
    assert [a["round"] for a in mine] == list(range(1, SETUP.rounds + 1))
    assert all(a["decision"] == "rejected" and phrase in a["reason"] for a in mine), mine
    assert all(a["decision"] == "accepted" for a in audit if a["instance_id"] != result["attacker"])

    # The defence the table reports is the expected one
    row = _row(result, name)
    assert row["defence_acted"] and attacks.ATTACKS[name].expected == kind
    assert row["honest_rejected"] == 0

    # Exactly the model the honest instances make without the attacker
    assert row["model_sha256_16"] == result["absent_sha"] != ""


@pytest.mark.parametrize("name", POTENT)
def test_the_attack_would_have_worked_on_stock_fedavg(result: dict, name: str) -> None:
    stock = _row(result, name)["stock_fedavg_last_round"]
    broken = bool(stock["error"]) or not np.isfinite(stock["r2"]) or stock["r2"] < -1.0
    assert broken, stock


def test_weight_cap_bounds_the_inflated_instance(
    result: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cap = Settings().max_weight_share
    mine = [a for a in _audit(result, "num-examples-10x") if a["instance_id"] == result["attacker"]]
    assert len(mine) == SETUP.rounds
    # Its claim (10 x its rows) would be 10 / (10 + 4) of the round; the cap holds it at 0.5
    assert all(a["decision"] == "accepted" and a["weight"] == pytest.approx(cap) for a in mine)
    row = _row(result, "num-examples-10x")
    assert row["defence_acted"] and row["honest_rejected"] == 0

    # Claiming ten times more buys nothing: the same model, bit for bit (100 x its rows stays
    # under max-examples-per-node, so only the cap stands between it and the round)
    louder = attacks.Attack(
        "num-examples-100x", "honest weights, num-examples x 100", "weight-cap",
        attacks.claims(lambda n: 100 * n),
    )  # fmt: skip
    monkeypatch.setitem(attacks.ATTACKS, louder.name, louder)
    assert attacks.run_scenario(SETUP, louder.name, tmp_path).model_sha == row["model_sha256_16"]

    # The model still ranks next-bar returns as the clean one does. Its R^2 is not held to 90 %
    # at this scale: the cap still gives one honest instance of five half the weight instead of
    # a fifth, and R^2 (a scale-sensitive score) then kept 48 % of the clean run's on an AVX2
    # EPYC VM and 90 % or more on an earlier one; `make attacks` (10 instances, 5 rounds) keeps
    # 100.5 % (README).
    assert row["ic_kept"] >= attacks.KEPT_REQUIRED


def test_table_is_written(result: dict) -> None:
    attacks.write_outputs({k: v for k, v in result.items() if k != "out"}, result["out"])
    text = (result["out"] / "attacks.md").read_text()
    assert "| nan: NaN weights" in text and "R² kept" in text
    data = json.loads((result["out"] / "attacks.json").read_text())
    assert {r["attack"] for r in data["rows"]} == {"clean", *NAMES}

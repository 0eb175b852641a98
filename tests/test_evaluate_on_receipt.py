"""``evaluate-on-receipt``: one exchange a round (by default where it changes nothing), the same
history, model and resume.

The in-process runs drive the real ServerApp and ClientApp over :class:`LoopbackGrid` (Flower's
protobuf wire format, no network); the last test is one real Flower simulation run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, MessageType
from flwr.clientapp import ClientApp

from sigmax_fl import attacks, client_app, runs
from sigmax_fl.deploy.flwr_cli import FlwrHome
from sigmax_fl.settings import ConfigError, Settings
from sigmax_fl.strategy import EVALUATE_RECEIVED_KEY

from .conftest import simulate, small_run

INSTANCES = ("coinbase-btc-usd-1d", "bitstamp-eth-usd-1d", "bitstamp-ltc-usd-1d")
ON_RECEIPT = {"evaluate-on-receipt": True}
TWO_PHASES = {"evaluate-on-receipt": False}


def _training_fails_in(server_round: int) -> ClientApp:
    """The app, except that its training raises in ``server_round`` (a disk failing once)."""

    def app(message: Message, context: Context) -> Message:
        config = message.content["config"]
        if message.metadata.message_type == MessageType.TRAIN and (
            config["server-round"] == server_round
        ):
            raise OSError("no space left on device")
        return client_app.app(message, context)

    return app


class CountingGrid(attacks.LoopbackGrid):
    """The instances of :data:`INSTANCES` in this process; records what each message asked.

    ``broken``: instance index -> the round in which its training fails.
    """

    def __init__(self, run_config: dict, run_id: int, broken: dict[int, int] | None = None) -> None:
        apps = {k: _training_fails_in(r) for k, r in (broken or {}).items()}
        super().__init__(attacks.simulated_nodes(run_config, run_id, len(INSTANCES), apps), run_id)
        self.sent: list[tuple[str, int, bool]] = []
        """(message type, server round, whether the received model is to be scored)."""

    def _deliver(self, message: Message) -> Message:
        kind = message.metadata.message_type
        if kind in (MessageType.TRAIN, MessageType.EVALUATE):  # not the scaler's query
            config = message.content["config"]
            self.sent.append(
                (
                    kind,
                    int(config["server-round"]),
                    bool(config.get(EVALUATE_RECEIVED_KEY, False)),
                )
            )
        return super()._deliver(message)

    def exchanges(self) -> list[tuple[str, int, bool]]:
        """One entry per phase: the distinct (type, round, flag) in sending order."""
        return list(dict.fromkeys(self.sent))


def _config(tmp_path: Path, run_name: str, **extra: object) -> dict:
    return small_run(tmp_path, run_name, INSTANCES, **extra)


def _run(
    run_config: dict, run_id: int, broken: dict[int, int] | None = None
) -> tuple[CountingGrid, Path]:
    torch.set_num_threads(1)
    grid = CountingGrid(run_config, run_id, broken)
    attacks.run_server_app(grid, run_config)
    run_dir = Path(run_config["outputs-dir"]) / run_config["run-name"]
    return grid, run_dir


def _records(run_dir: Path) -> list[dict]:
    """history.json, which must agree with the lines appended round by round."""
    history = json.loads((run_dir / runs.HISTORY_JSON).read_text())
    lines = [json.loads(x) for x in (run_dir / "history.jsonl").read_text().splitlines()]
    assert lines == history
    return history


def _history(run_dir: Path) -> list[dict]:
    """The history's scores, verdicts and metrics: without wall-clock times and bytes sent."""
    drop = ("seconds", "phase_seconds", "bytes_sent")
    return [{k: v for k, v in r.items() if k not in drop} for r in _records(run_dir)]


def _model(run_dir: Path) -> dict[str, torch.Tensor]:
    summary = json.loads((run_dir / "summary.json").read_text())
    return torch.load(summary["final_model"], weights_only=True)


def _same_model(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"use-case": "multi-strategy"},  # each instance's own head
        {"use-case": "multi-strategy", "personalisation": "fine-tune"},
        {"use-case": "risk"},
        {"update-encoding": "int8", "scaler": "federated"},
    ],
    ids=["defaults", "local-head", "fine-tune", "risk", "int8-federated-scaler"],
)
def test_one_exchange_a_round_gives_the_same_history_and_model(
    tmp_path: Path, options: dict
) -> None:
    # The on-receipt run leaves the key at its default, "auto": one exchange a round
    two_phase, two_dir = _run(_config(tmp_path, "two-phase", **options, **TWO_PHASES), 7101)
    fused, fused_dir = _run(_config(tmp_path, "on-receipt", **options), 7102)

    assert two_phase.exchanges() == [
        (kind, r, False) for r in (1, 2, 3) for kind in (MessageType.TRAIN, MessageType.EVALUATE)
    ]
    # Round 1's model is scored by round 2's train replies, ...; the last by a closing phase
    assert fused.exchanges() == [
        (MessageType.TRAIN, 1, False),
        (MessageType.TRAIN, 2, True),
        (MessageType.TRAIN, 3, True),
        (MessageType.EVALUATE, 3, False),
    ]
    assert len(fused.sent) == len(INSTANCES) * 4
    # Same model scored on the same rows: every score and verdict is identical; a round sends
    # its model once instead of twice, and the last one twice (train, closing evaluate).
    assert _history(fused_dir) == _history(two_dir)
    sent, two_sent = ([r["bytes_sent"] for r in _records(d)] for d in (fused_dir, two_dir))
    assert sent == [b // 2 for b in two_sent[:-1]] + two_sent[-1:]
    assert all(r["evaluate"]["replies-ok"] == len(INSTANCES) for r in _history(fused_dir))
    _same_model(_model(fused_dir), _model(two_dir))


def test_early_stopping_trains_one_round_more_and_keeps_the_same_best_round(
    tmp_path: Path,
) -> None:
    # A step size this large makes the validation loss stop improving within a few rounds.
    stop = {"num-server-rounds": 8, "early-stopping-patience": 1, "learning-rate": 0.05}
    _, two_dir = _run(_config(tmp_path, "two-phase", **stop, **TWO_PHASES), 7103)
    fused, fused_dir = _run(_config(tmp_path, "on-receipt", **stop, **ON_RECEIPT), 7104)

    two = json.loads((two_dir / "summary.json").read_text())
    on_receipt = json.loads((fused_dir / "summary.json").read_text())
    assert two["stopped_early"] and on_receipt["stopped_early"]
    stopped = two["rounds_run"]
    assert stopped < stop["num-server-rounds"]
    # The stale round's scores arrive with the next round's replies: one more round trained,
    # and scored by the closing phase.
    assert on_receipt["rounds_run"] == stopped + 1
    assert fused.exchanges()[-1] == (MessageType.EVALUATE, stopped + 1, False)
    assert _history(fused_dir)[:stopped] == _history(two_dir)
    assert len(_history(fused_dir)) == stopped + 1
    if on_receipt["best_round"] == two["best_round"]:
        _same_model(_model(fused_dir), _model(two_dir))
    else:  # the extra round was the best one after all
        assert on_receipt["best_round"] == stopped + 1


def test_a_resumed_run_first_scores_the_checkpoint_model(tmp_path: Path) -> None:
    _, unbroken_dir = _run(_config(tmp_path, "unbroken", **ON_RECEIPT), 7105)
    # Two rounds, then resumed to three from round 2's checkpoint, whose model was scored only
    # by the closing phase: the resumed run scores it again, first thing, and rewrites it.
    config = _config(tmp_path, "resumed", **ON_RECEIPT)
    _run({**config, "num-server-rounds": 2}, 7106)
    checkpoint = torch.load(
        sorted((unbroken_dir.parent / "resumed" / runs.CHECKPOINTS).glob("round-*.pt"))[-1],
        weights_only=False,
    )
    assert json.loads(checkpoint["unscored"])["round"] == 2
    resumed, resumed_dir = _run({**config, "resume-from": "latest"}, 7107)

    assert resumed.exchanges() == [(MessageType.TRAIN, 3, True), (MessageType.EVALUATE, 3, False)]
    assert _history(resumed_dir) == _history(unbroken_dir)
    _same_model(_model(resumed_dir), _model(unbroken_dir))


def test_a_two_phase_checkpoint_resumes_under_auto_to_the_same_run(tmp_path: Path) -> None:
    # A checkpoint written in two phases (as every run was before "auto"), resumed with the
    # default, which now resolves to one exchange: the same run, not a refused key
    _, unbroken_dir = _run(_config(tmp_path, "unbroken", **TWO_PHASES), 7110)
    config = _config(tmp_path, "resumed")
    _run({**config, **TWO_PHASES, "num-server-rounds": 2}, 7111)
    resumed, resumed_dir = _run({**config, "resume-from": "latest"}, 7112)

    assert resumed.exchanges() == [(MessageType.TRAIN, 3, False), (MessageType.EVALUATE, 3, False)]
    assert _history(resumed_dir) == _history(unbroken_dir)
    _same_model(_model(resumed_dir), _model(unbroken_dir))

    # Where one exchange would change the run, switching is refused as any other key
    half = _config(tmp_path, "half", **TWO_PHASES, **{"fraction-evaluate": 0.5})
    _run({**half, "num-server-rounds": 2}, 7113)
    with pytest.raises(ValueError, match=r"keys \['evaluate-on-receipt'\] differ"):
        _run({**half, **ON_RECEIPT, "resume-from": "latest"}, 7114)


def test_an_instance_whose_training_fails_is_named_and_not_scored_that_round(
    tmp_path: Path,
) -> None:
    _, run_dir = _run(_config(tmp_path, "broken", **ON_RECEIPT), 7108, broken={0: 2})
    first, second = _history(run_dir)[:2]
    # Round 2's train messages carried round 1's model: the failing instance scored nothing.
    assert first["evaluate"]["replies-ok"] == len(INSTANCES) - 1
    assert set(first["instances"]) == set(INSTANCES)  # named, not "node-<id>"
    verdict = first["instances"][INSTANCES[0]]["evaluate"]
    assert not verdict["accepted"] and "no space left on device" in verdict["reason"]
    assert second["train"]["replies-rejected"] == 1
    assert second["evaluate"]["replies-ok"] == len(INSTANCES)


def test_fraction_evaluate_zero_still_means_no_scores(tmp_path: Path) -> None:
    grid, run_dir = _run(
        _config(tmp_path, "unscored", **ON_RECEIPT, **{"fraction-evaluate": 0.0}), 7109
    )
    assert grid.exchanges() == [(MessageType.TRAIN, r, False) for r in (1, 2, 3)]
    assert all(r["evaluate"] == {} for r in _history(run_dir))
    assert all("evaluate" not in v for r in _history(run_dir) for v in r["instances"].values())


@pytest.mark.parametrize(
    ("other", "why"),
    [
        ({"secure_aggregation": True, "max_weight_share": 1.0}, "secure-aggregation = true"),
        ({"fraction_train": 0.0}, "fraction-train = 0"),
        ({"dp": "local", "dp_target_epsilon": 8.0}, "dp = 'local' and a dp-target-epsilon"),
    ],
)
def test_refused_where_scores_would_be_lost(other: dict, why: str) -> None:
    with pytest.raises(
        ConfigError, match=f"'evaluate-on-receipt' = True: expected false with {why}"
    ):
        Settings(evaluate_on_receipt=True, **other)
    Settings(evaluate_on_receipt=False, **other)  # fine without it


@pytest.mark.parametrize(
    "other",
    [
        {"fraction_train": 0.5},
        {"fraction_evaluate": 0.5},
        {"fraction_evaluate": 0.0},
        {"early_stopping_patience": 2},
        {"secure_aggregation": True, "max_weight_share": 1.0},
        {"dp": "local", "dp_target_epsilon": 8.0},
    ],
)
def test_auto_keeps_two_phases_where_one_exchange_would_change_the_run(other: dict) -> None:
    assert Settings().evaluate_on_receipt is True
    assert Settings(**other).evaluate_on_receipt is False
    # What a run's outputs record is the choice, not "auto"
    assert Settings(**other).to_run_config()["evaluate-on-receipt"] is False


def test_evaluate_on_receipt_takes_true_false_or_auto() -> None:
    assert Settings.from_run_config({"evaluate-on-receipt": "auto"}).evaluate_on_receipt is True
    assert Settings.from_run_config({"evaluate-on-receipt": False}).evaluate_on_receipt is False
    with pytest.raises(ConfigError, match="'evaluate-on-receipt' = 'yes': expected true, false"):
        Settings.from_run_config({"evaluate-on-receipt": "yes"})
    with pytest.raises(ConfigError, match="'evaluate-on-receipt' = 1: expected bool or str, got"):
        Settings.from_run_config({"evaluate-on-receipt": 1})


def test_simulation_run_has_one_phase_a_round(simulation: FlwrHome, tmp_path: Path) -> None:
    config = {**_config(tmp_path, "sim"), **ON_RECEIPT, "num-server-rounds": 2}
    simulate(simulation, config, len(INSTANCES))
    history = json.loads((tmp_path / "outputs" / "sim" / runs.HISTORY_JSON).read_text())
    assert [r["round"] for r in history] == [1, 2]
    for record in history:
        assert record["evaluate"]["replies-ok"] == len(INSTANCES)
        assert {v["evaluate"]["accepted"] for v in record["instances"].values()} == {True}
    # Round 1 was scored inside round 2's exchange; round 2 by the closing evaluate phase.
    assert history[0]["phase_seconds"]["evaluate"] == 0.0
    assert history[1]["phase_seconds"]["evaluate"] > 0.0

"""Personalisation: the head never leaves its instance; fine-tuning never touches the global model.

The in-process runs drive the real ServerApp and ClientApp over :class:`LoopbackGrid`, which
passes every message through Flower's protobuf wire format; the last test is one real Flower
simulation run.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from sigmax_fl import attacks, kept, personal, runs, task
from sigmax_fl.data import parse_sources
from sigmax_fl.dataset import Recipe, load_instance
from sigmax_fl.deploy.flwr_cli import FlwrHome
from sigmax_fl.model import MODELS, TradingModel, build_model, head_keys, register
from sigmax_fl.settings import ConfigError, Settings
from sigmax_fl.strategy import META_KEY, RUN_KEY

from .conftest import on_instances, simulate, small_run

INSTANCES = ("bitstamp-eth-usd-1d", "bitstamp-ltc-usd-1d")
HEAD = ("net.4.weight", "net.4.bias")


def _config(tmp_path: Path, run_name: str, **extra: object) -> dict:
    return small_run(tmp_path, run_name, INSTANCES, **extra)


class RecordingGrid(attacks.LoopbackGrid):
    """Records every message and reply as decoded from Flower's wire format."""

    def __init__(self, run_config: dict, run_id: int) -> None:
        super().__init__(attacks.simulated_nodes(run_config, run_id, len(INSTANCES)), run_id)
        self.settings = Settings.from_run_config(run_config)
        self.wire: list[tuple[str, list[str], list[str]]] = []
        """(message type, array names sent, array names in the reply)."""
        self.heads: list[dict[str, dict[str, torch.Tensor]]] = []
        """After each train delivery: instance -> its head file's tensors."""

    def _deliver(self, message: Message) -> Message:
        reply = super()._deliver(message)
        assert not reply.has_error(), reply.error.reason
        kind = message.metadata.message_type
        sent = list(message.content["arrays"].keys())
        self.wire.append((kind, sent, [k for r in reply.content.array_records.values() for k in r]))
        if kind == MessageType.TRAIN and self.settings.personalisation == "local-head":
            instance = str(reply.content[META_KEY]["instance-id"])
            path = personal.head_path(on_instances(self.settings), self.run.run_id, instance)
            self.heads.append({instance: torch.load(path, weights_only=True)["head"]})
        return reply


def _run(run_config: dict, run_id: int) -> RecordingGrid:
    """The app's ServerApp for ``num-server-rounds`` over a recording in-process grid."""
    torch.set_num_threads(1)
    grid = RecordingGrid(run_config, run_id)
    attacks.run_server_app(grid, run_config)
    return grid


def _val(instance: str) -> tuple[np.ndarray, np.ndarray]:
    data = load_instance(parse_sources(instance)[0], Recipe.of(Settings()))
    return data.X("val"), data.y("val")


# ---------------------------------------------------------------------------------------------
# The split, the seeded head, the settings


def test_head_is_the_output_layer_and_registration_checks_it() -> None:
    assert head_keys("trading-mlp") == HEAD
    state = build_model("trading-mlp", seed=0).state_dict()
    body, head = personal.split(state, "trading-mlp")
    assert tuple(head) == HEAD and set(body) | set(head) == set(state)
    assert not set(body) & set(head)
    for bad in (["nope"], ["net"]):  # names nothing; names everything
        with pytest.raises(ValueError, match="some but not all"):
            register("head-test", TradingModel, head=bad)
    assert "head-test" not in MODELS
    register("headless-test", TradingModel)
    try:
        with pytest.raises(ConfigError, match="'model' = 'headless-test'.*names no output head"):
            Settings(model="headless-test", use_case="multi-strategy")
    finally:
        MODELS.pop("headless-test")


def test_fresh_head_is_seeded_by_run_seed_and_instance() -> None:
    a = personal.fresh_head("trading-mlp", 42, "venue-a")
    again = personal.fresh_head("trading-mlp", 42, "venue-a")
    other_instance = personal.fresh_head("trading-mlp", 42, "venue-b")
    other_seed = personal.fresh_head("trading-mlp", 43, "venue-a")
    assert all(torch.equal(a[k], again[k]) for k in HEAD)
    assert not torch.equal(a["net.4.weight"], other_instance["net.4.weight"])
    assert not torch.equal(a["net.4.weight"], other_seed["net.4.weight"])


def test_settings_resolve_local_head_and_refuse_what_cannot_take_effect() -> None:
    assert Settings(use_case="multi-strategy").personalisation == "local-head"
    assert personal.shared_keys(Settings()) == tuple(TradingModel().state_dict())
    body = personal.shared_keys(Settings(use_case="multi-strategy"))
    assert body and not set(body) & set(HEAD)
    with pytest.raises(ConfigError, match="'secure-aggregation' = True.*local-head"):
        Settings(use_case="multi-strategy", secure_aggregation=True)
    # fine-tune is whole-model FedAvg, so SecAgg+ can carry it
    Settings(
        use_case="multi-strategy",
        personalisation="fine-tune",
        secure_aggregation=True,
        max_weight_share=1.0,
    )
    with pytest.raises(ConfigError, match="'personalisation' = 'fine-tune'.*dp = 'local'"):
        Settings(use_case="multi-strategy", personalisation="fine-tune", dp="local")


# ---------------------------------------------------------------------------------------------
# local-head: what crosses the wire, the head file across rounds, the artefacts


@pytest.fixture(scope="module")
def local_head(tmp_path_factory: pytest.TempPathFactory) -> tuple[RecordingGrid, Path]:
    tmp = tmp_path_factory.mktemp("local-head")
    config = _config(tmp, "local-head", **{"use-case": "multi-strategy"})
    umask = os.umask(0o022)  # new files readable by every user unless the app says otherwise
    try:
        return _run(config, run_id=8101), tmp / "outputs" / "local-head"
    finally:
        os.umask(umask)


def test_local_head_sends_and_receives_the_body_only(
    local_head: tuple[RecordingGrid, Path],
) -> None:
    grid, run_dir = local_head
    body = list(personal.shared_keys(grid.settings))
    train = [w for w in grid.wire if w[0] == MessageType.TRAIN]
    evaluate = [w for w in grid.wire if w[0] == MessageType.EVALUATE]
    # One exchange a round (evaluate-on-receipt, "auto"), and a closing evaluate phase
    assert len(train) == 3 * len(INSTANCES) and len(evaluate) == len(INSTANCES)
    assert all(sent == body and reply == body for _, sent, reply in train), train[0]
    assert all(sent == body and reply == [] for _, sent, reply in evaluate)

    # Every update passed screening against the body the server sent
    history = json.loads((run_dir / runs.HISTORY_JSON).read_text())
    assert all(
        r["train"]["replies-ok"] == 2 and r["train"]["replies-rejected"] == 0 for r in history
    )

    # The server's artefacts hold the body, no head, and no full "final model"
    assert list(torch.load(run_dir / personal.FINAL_BODY, weights_only=True)) == body
    assert not (run_dir / runs.FINAL_MODEL).exists()
    for checkpoint in (run_dir / runs.CHECKPOINTS).glob("round-*.pt"):
        payload = runs.read_checkpoint(checkpoint)
        assert list(payload["arrays"]) == body
    assert "final_body.pt" in json.loads((run_dir / "summary.json").read_text())["final_model"]


def test_head_file_changes_every_round_and_the_instance_evaluates_with_it(
    local_head: tuple[RecordingGrid, Path],
) -> None:
    grid, run_dir = local_head
    for instance in INSTANCES:
        heads = [h[instance] for h in grid.heads if instance in h]
        assert len(heads) == 3
        for before, after in itertools.pairwise(heads):
            assert not torch.equal(before["net.4.weight"], after["net.4.weight"])

        # The instance's own full model: the server's final body plus its last head
        own = torch.load(
            personal.model_path(on_instances(grid.settings), grid.run.run_id, instance),
            weights_only=True,
        )
        final_body = torch.load(run_dir / personal.FINAL_BODY, weights_only=True)
        assert all(torch.equal(own[k], v) for k, v in final_body.items())
        assert all(torch.equal(own[k], heads[-1][k]) for k in HEAD)

        # The validation loss it reported is that model's, not the body with a fresh head
        history = json.loads((run_dir / runs.HISTORY_JSON).read_text())
        reported = history[-1]["instances"][instance]["evaluate"]["val_loss"]
        model = TradingModel()
        model.load_state_dict(own)
        X, y = _val(instance)
        assert task.evaluate(model, X, y)["loss"] == pytest.approx(reported, rel=1e-9)
        model.load_state_dict({**own, **personal.fresh_head("trading-mlp", 42, instance)})
        assert task.evaluate(model, X, y)["loss"] != pytest.approx(reported, rel=1e-3)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_heads_and_own_models_are_readable_by_their_instance_owner_alone(
    local_head: tuple[RecordingGrid, Path],
) -> None:
    grid, _ = local_head
    for instance in INSTANCES:
        folder = kept.instance_dir(on_instances(grid.settings), grid.run.run_id, instance)
        modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in folder.iterdir()}
        assert {"head.pt", "model.pt"} <= modes.keys()
        assert modes == dict.fromkeys(modes, oct(0o600))
        # ... in a folder other users cannot list, as is the run's folder above it
        for made in (folder, folder.parent):
            assert oct(stat.S_IMODE(made.stat().st_mode)) == oct(0o700), made


def test_a_stored_head_is_reloaded_and_used_by_the_next_round(
    local_head: tuple[RecordingGrid, Path],
) -> None:
    grid, _ = local_head
    node_id = next(iter(grid.nodes))
    instance = INSTANCES[0]
    held = on_instances(grid.settings)
    path = personal.head_path(held, grid.run.run_id, instance)
    body = {
        k: v for k, v in build_model("trading-mlp", seed=1).state_dict().items() if k not in HEAD
    }

    def train_round(server_round: int) -> dict[str, torch.Tensor]:
        content = RecordDict(
            {
                "arrays": ArrayRecord(body),
                "config": ConfigRecord({"server-round": server_round, RUN_KEY: held.run_name}),
            }
        )
        message = Message(content, node_id, MessageType.TRAIN)
        [reply] = grid.pull_messages(grid.push_messages([message]))
        return reply.content["arrays"].to_torch_state_dict()

    stored = torch.load(path, weights_only=True)
    with_stored = train_round(4)
    after = torch.load(path, weights_only=True)["head"]
    assert not torch.equal(after["net.4.weight"], stored["head"]["net.4.weight"])
    torch.save(stored, path)  # the same head again: the same update, bit for bit
    assert all(torch.equal(with_stored[k], v) for k, v in train_round(4).items())
    path.unlink()  # no head file: a fresh head, so another update
    without = train_round(4)
    assert any(not torch.equal(with_stored[k], v) for k, v in without.items())


# ---------------------------------------------------------------------------------------------
# fine-tune


def test_a_resumed_run_goes_back_to_the_head_of_its_checkpoint_round(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: an instance trained rounds 1..4 of run 7; the server's newest checkpoint is
    # round 2 (it stopped before checkpointing 3 and 4), so round 3 must start from head 2.
    settings = Settings(use_case="multi-strategy", run_name=f"resume-{tmp_path.name}")
    heads = {r: personal.fresh_head("trading-mlp", r, "inst") for r in range(1, 5)}
    for r, head in heads.items():
        personal.save_head(settings, 7, "inst", head, r)
    resumed = Settings(**{**vars(settings), "resume_from": "resume", "keep_checkpoints": 2})

    # Execute / Assert: training round 3 gets round 2's head, evaluating round 4 round 4's
    got = personal.load_head(resumed, 8, "inst", before_round=3)
    assert all(torch.equal(got[k], heads[2][k]) for k in HEAD)
    got = personal.load_head(resumed, 8, "inst", before_round=5)
    assert all(torch.equal(got[k], heads[4][k]) for k in HEAD)

    # A kept window that no longer reaches back that far is an error, not a fresh head
    for r in (5, 6, 7):
        personal.save_head(resumed, 8, "inst", heads[1], r)  # keeps rounds 5..7 only
    with pytest.raises(FileNotFoundError, match="no head from before round 3"):
        personal.load_head(resumed, 8, "inst", before_round=3)

    # No head at all (the instance never trained in this run, or its disk lost them): a fresh
    # head, as the unbroken run would give an instance training for the first time, and a word
    personal.head_path(resumed, 8, "inst").unlink()
    for path in kept.kept_rounds(resumed, 8, "inst", personal.HEAD).values():
        path.unlink()
    with caplog.at_level(logging.WARNING, logger="flwr.sigmax_fl.personal"):
        got = personal.load_head(resumed, 8, "inst", before_round=3)
    fresh = personal.fresh_head("trading-mlp", settings.seed, "inst")
    assert all(torch.equal(got[k], fresh[k]) for k in HEAD)
    assert "inst: no head in" in caplog.text and "starting a fresh head" in caplog.text


def test_a_head_file_of_another_run_is_not_reused_unless_resuming(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: run 7 of this run folder name left a trained head behind
    settings = Settings(use_case="multi-strategy", run_name=f"reused-{tmp_path.name}")
    trained = personal.fresh_head("trading-mlp", 99, "inst")
    personal.save_head(settings, 7, "inst", trained, 3)
    fresh = personal.fresh_head("trading-mlp", settings.seed, "inst")

    # Execute / Assert: a resumed run (id 8) goes on from it
    resumed = Settings(**{**vars(settings), "resume_from": "latest"})
    got = personal.load_head(resumed, 8, "inst", before_round=4)
    assert all(torch.equal(got[k], trained[k]) for k in HEAD)

    # ... a new run (id 9) starts a fresh head, says why, and drops run 7's files
    with caplog.at_level(logging.WARNING, logger="flwr.sigmax_fl.personal"):
        got = personal.load_head(settings, 9, "inst", before_round=1)
    assert all(torch.equal(got[k], fresh[k]) for k in HEAD)
    assert "is from run 7, not this run 9" in caplog.text
    assert not list(kept.instance_dir(settings, 9, "inst").glob("head*"))


def test_fine_tuned_copy_differs_and_the_original_is_untouched() -> None:
    X, y = _val(INSTANCES[0])
    model = build_model("trading-mlp", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = personal.fine_tuned(
        model, X, y, epochs=1, batch_size=32, learning_rate=1e-3, optimizer="adam", seed=1
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in tuned.state_dict().items())


def test_fine_tune_changes_what_is_evaluated_but_not_the_global_model(tmp_path: Path) -> None:
    plain = _config(tmp_path, "plain", **{"num-server-rounds": 2})
    tuned = {**plain, "run-name": "tuned", "use-case": "multi-strategy"}
    tuned["personalisation"] = "fine-tune"
    _run(plain, run_id=8102)
    grid = _run(tuned, run_id=8103)
    assert all(sent == reply for kind, sent, reply in grid.wire if kind == MessageType.TRAIN)

    outputs = tmp_path / "outputs"
    a = torch.load(outputs / "plain" / runs.FINAL_MODEL, weights_only=True)
    b = torch.load(outputs / "tuned" / runs.FINAL_MODEL, weights_only=True)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    history = {
        name: json.loads((outputs / name / runs.HISTORY_JSON).read_text())
        for name in ("plain", "tuned")
    }
    for r_plain, r_tuned in zip(history["plain"], history["tuned"], strict=True):
        assert r_plain["train"]["train_loss"] == r_tuned["train"]["train_loss"]
        assert r_plain["evaluate"]["val_loss"] != r_tuned["evaluate"]["val_loss"]


# ---------------------------------------------------------------------------------------------
# One real Flower simulation run


@pytest.mark.integration
def test_simulation_run_keeps_heads_on_the_instances(simulation: FlwrHome, tmp_path: Path) -> None:
    config = {**_config(tmp_path, "sim-local-head", **{"use-case": "multi-strategy"})}
    config["num-server-rounds"] = 2
    run_id = simulate(simulation, config, len(INSTANCES))

    settings = Settings.from_run_config(config)
    body = personal.shared_keys(settings)
    full = build_model("trading-mlp").state_dict()
    run_dir = tmp_path / "outputs" / "sim-local-head"
    for record in json.loads((run_dir / runs.HISTORY_JSON).read_text()):
        # A reply with any other array names would have been rejected by screening
        assert record["train"]["replies-ok"] == 2 and record["train"]["replies-rejected"] == 0
        for instance in INSTANCES:
            received = record["instances"][instance]["train"]["bytes"]
            assert received == ArrayRecord({k: full[k] for k in body}).count_bytes()
            assert received < ArrayRecord(full).count_bytes()
    assert tuple(torch.load(run_dir / personal.FINAL_BODY, weights_only=True)) == body
    assert not (run_dir / runs.FINAL_MODEL).exists()
    for checkpoint in (run_dir / runs.CHECKPOINTS).glob("round-*.pt"):
        assert tuple(runs.read_checkpoint(checkpoint)["arrays"]) == body
    for instance in INSTANCES:
        held = on_instances(settings)
        stored = torch.load(personal.head_path(held, run_id, instance), weights_only=True)
        assert tuple(stored["head"]) == HEAD and stored["round"] == 2
        assert personal.model_path(held, run_id, instance).is_file()

"""Secure aggregation (SecAgg+): refusals, the instance's own check, the quantisation bound, and a
real Flower simulation whose masked aggregate matches plain weighted FedAvg within that bound."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.app.message import make_message
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_combine,
    factor_extract,
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.task_identity import TaskIdentity

from sigmax_fl import secagg
from sigmax_fl.deploy.flwr_cli import FINISHED_OK, FlwrHome
from sigmax_fl.model import build_model
from sigmax_fl.settings import ConfigError, Settings
from sigmax_fl.strategy import Screened, WeightedFedAvg, as_numpy

from .conftest import DEFAULT_INSTANCES, ROOT, RUN_TIMEOUT

SECAGG = {"secure-aggregation": True, "max-weight-share": 1.0}


# ------------------------------------------------------------------------------------------
# (3) Options that need individual updates are refused, saying why (no Flower needed)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ({"aggregation": "median"}, ["aggregation = 'median'", "needs every update"]),
        ({"aggregation": "krum"}, ["aggregation = 'krum'"]),
        ({"dp": "central"}, ["dp = 'central'", "dp = 'local'"]),
        ({"max-update-norm": 5.0}, ["max-update-norm = 5", "secagg-clip-norm"]),
        ({"update-norm-policy": "clip"}, ["update-norm-policy = 'clip'", "server-side screen"]),
        ({"max-update-norm-ratio": 2.0}, ["max-update-norm-ratio = 2.0"]),
        ({"max-weight-share": 0.5}, ["max-weight-share = 0.5", "max-weight-share = 1.0"]),
        ({"resume-from": "latest"}, ["resume-from", "no per-round checkpoint"]),
    ],
)
def test_incompatible_options_are_refused_with_the_reason(
    override: dict[str, object], words: list[str]
) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_run_config({**SECAGG, **override})
    message = str(err.value)
    assert "secure-aggregation" in message
    for word in words:
        assert word in message


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_run_config({**SECAGG, "aggregation": "median", "max-update-norm": 1.0})
    assert "aggregation" in str(err.value) and "max-update-norm" in str(err.value)


def test_the_same_options_are_fine_without_secure_aggregation() -> None:
    settings = Settings.from_run_config({"aggregation": "median", "max-update-norm": 5.0})
    assert not settings.secure_aggregation


@pytest.mark.parametrize(
    "override",
    [
        {"secagg-num-shares": 2},
        {"secagg-num-shares": 0.0},
        {"secagg-num-shares": 3.5},
        {"secagg-reconstruction-threshold": 1.5},
        {"secagg-num-shares": 5, "secagg-reconstruction-threshold": 5},
        {"secagg-clip-norm": 0.0},
    ],
)
def test_bad_secagg_values_are_refused(override: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="secagg-"):
        Settings.from_run_config({**SECAGG, **override})


def test_a_compatible_configuration_is_accepted() -> None:
    settings = Settings.from_run_config(
        {**SECAGG, "dp": "local", "secagg-num-shares": 5, "secagg-reconstruction-threshold": 3}
    )
    assert settings.secure_aggregation and settings.secagg_num_shares == 5


# ------------------------------------------------------------------------------------------
# (4) The instance checks its own update before masking
# ------------------------------------------------------------------------------------------

GLOBAL = [np.zeros((3, 2), np.float32), np.zeros(2, np.float32)]


def _check(local: list[np.ndarray], **kw: object) -> secagg.CheckedUpdate:
    args = {"clip_norm": 1.0, "num_examples": 10, "max_examples": 100, **kw}
    return secagg.check_update(local, GLOBAL, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_update_is_not_sent(bad: float) -> None:
    local = [np.full((3, 2), 0.1, np.float32), np.array([0.0, bad], np.float32)]
    with pytest.raises(secagg.UpdateRefusedError, match="NaN or Inf"):
        _check(local)


def test_an_overflowing_norm_is_not_sent() -> None:
    local = [np.full((3, 2), 1e200), np.zeros(2)]  # finite, but its square is not
    with pytest.raises(secagg.UpdateRefusedError, match="overflows"):
        _check(local)


@pytest.mark.parametrize("n", [0, 101])
def test_an_implausible_weight_is_not_sent(n: int) -> None:
    with pytest.raises(secagg.UpdateRefusedError, match="max-examples-per-node"):
        _check([g + 0.1 for g in GLOBAL], num_examples=n)


def test_a_large_update_is_clipped_to_the_bound_and_a_small_one_kept() -> None:
    big = _check([g + 1.0 for g in GLOBAL], clip_norm=2.0)  # norm sqrt(8)
    assert big.norm == pytest.approx(np.sqrt(8)) and big.factor < 1
    norm = np.sqrt(sum(float((u**2).sum()) for u in big.arrays))
    assert norm == pytest.approx(2.0, rel=1e-12)
    small = _check([g + 0.1 for g in GLOBAL], clip_norm=2.0)
    assert small.factor == 1.0
    np.testing.assert_allclose(small.arrays[0], np.float32(0.1), rtol=0)


def _legacy_train_message(arrays: list[np.ndarray]) -> Message:
    content = compat.fitins_to_recorddict(
        FitIns(ndarrays_to_parameters(arrays), {"server-round": 1}), keep_input=True
    )
    meta = Metadata(1, "m1", 0, 7, "", "1", time.time(), 600.0, "train")
    return make_message(meta, content)


def _context(**run_config: object) -> Context:
    return Context(
        run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config=dict(run_config)
    )


def test_the_adapter_refuses_nan_weights_from_training() -> None:
    # The app's train function returns NaN weights: nothing may reach the masking step.
    initial = [v.numpy() for v in build_model("trading-mlp", seed=1).state_dict().values()]
    message = _legacy_train_message(initial)

    def train(msg: Message, ctx: Context) -> Message:
        state = build_model("trading-mlp", seed=1).state_dict()
        state = {k: torch.full_like(v, float("nan")) for k, v in state.items()}
        content = RecordDict(
            {
                "arrays": ArrayRecord(state),
                "metrics": MetricRecord({"num-examples": 10, "train_loss": 0.1}),
                "meta": ConfigRecord({"instance-id": "x"}),
            }
        )
        return Message(content, reply_to=msg)

    with pytest.raises(secagg.UpdateRefusedError, match="NaN or Inf"):
        secagg._masked_fit(message, _context(**SECAGG), train)
    # The legacy content is restored for Flower's mod, whatever happened.
    assert "fitins.parameters" in message.content.array_records


def test_the_adapter_sends_the_clipped_update_and_no_norm() -> None:
    model = build_model("trading-mlp", seed=1)
    initial = [v.numpy().copy() for v in model.state_dict().values()]
    message = _legacy_train_message(initial)

    def train(msg: Message, ctx: Context) -> Message:
        # The app's train function sees a Message-API train message with named arrays.
        received = msg.content["arrays"].to_torch_state_dict()
        assert list(received) == list(model.state_dict())
        assert msg.content["config"]["server-round"] == 1
        moved = {k: v + 1.0 for k, v in received.items()}
        content = RecordDict(
            {
                "arrays": ArrayRecord(moved),
                "metrics": MetricRecord({"num-examples": 10, "train_loss": 0.1}),
                "meta": ConfigRecord({"instance-id": "x"}),
            }
        )
        return Message(content, reply_to=msg)

    reply = secagg._masked_fit(message, _context(**SECAGG, **{"secagg-clip-norm": 3.0}), train)
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    update = parameters_to_ndarrays(fitres.parameters)
    assert np.sqrt(sum(float((u**2).sum()) for u in update)) == pytest.approx(3.0)
    assert fitres.num_examples == 10
    assert fitres.metrics == {"train_loss": 0.1, "instance-id": "x", "clipped": 1}


def test_the_mod_passes_plain_messages_unless_the_instance_requires_masking() -> None:
    meta = Metadata(1, "m1", 0, 7, "", "1", time.time(), 600.0, "train")
    plain = make_message(meta, RecordDict({"config": ConfigRecord({"server-round": 1})}))
    seen: list[Message] = []

    def call_next(msg: Message, ctx: Context) -> Message:
        seen.append(msg)
        return msg

    assert secagg.secagg_mod(plain, _context(), call_next) is plain and seen == [plain]
    strict = _context()
    strict.node_config[secagg.REQUIRE_KEY] = True
    with pytest.raises(secagg.UpdateRefusedError, match="only through secure aggregation"):
        secagg.secagg_mod(plain, strict, call_next)
    masked = _legacy_train_message(GLOBAL)
    masked.content.config_records["secaggplus_configs"] = ConfigRecord({"stage": "setup"})
    with pytest.raises(secagg.UpdateRefusedError, match="secure-aggregation = false"):
        secagg.secagg_mod(masked, _context(), call_next)


# ------------------------------------------------------------------------------------------
# The quantisation bound, on Flower's own arithmetic (fast, no processes)
# ------------------------------------------------------------------------------------------


def _secaggplus_mean(
    updates: list[list[np.ndarray]], counts: list[int], max_weight: float, clip: float, t: int
) -> list[np.ndarray]:
    """The SecAgg+ client and server arithmetic of Flower 1.42, masks included."""
    rng = np.random.default_rng(0)
    modulus = secagg.MODULUS_RANGE
    shapes = [(1,), *(u.shape for u in updates[0])]

    def random_mask() -> list[np.ndarray]:
        return [rng.integers(0, modulus, s, dtype=np.int64) for s in shapes]

    pairwise, private = random_mask(), [random_mask() for _ in updates]
    total = None
    for k, (update, n) in enumerate(zip(updates, counts, strict=True)):
        q = round(n / max_weight * t)  # secaggplus_mod._collect_masked_vectors
        vec = factor_combine(q, quantize([u * (q / t) for u in update], clip, t))
        vec = parameters_addition(vec, private[k])
        if k == 0:  # a pairwise mask between instances 0 and 1 cancels in the sum
            vec = parameters_addition(vec, pairwise)
        elif k == 1:
            vec = parameters_subtraction(vec, pairwise)
        vec = parameters_mod(vec, modulus)
        total = vec if total is None else parameters_addition(total, vec)
    assert total is not None
    for mask in private:  # the server removes the private masks it reconstructed
        total = parameters_subtraction(total, mask)
    total = parameters_mod(total, modulus)
    q_total, summed = factor_extract(total)  # SecAggPlusWorkflow.unmask_stage
    out = dequantize(summed, clip, t)
    for v in out:
        v += -(len(updates) - 1) * clip
        v *= t / q_total
    return out


@pytest.mark.parametrize("num_nodes", [2, 3, 4, 9])
def test_the_derived_bound_holds_on_flowers_arithmetic(num_nodes: int) -> None:
    # Extreme cases: single-coordinate arrays at +-B (the largest value an update of norm <= B
    # can hold), the largest and smallest admissible weights.
    rng = np.random.default_rng(num_nodes)
    clip, max_weight = 2.0, 5000.0
    t = secagg.quantization_range(num_nodes)
    worst = 0.0
    for trial in range(30):
        counts = [int(rng.choice([1, 17, 1339, 5000])) for _ in range(num_nodes)]
        updates = []
        for _ in range(num_nodes):
            edge = np.array([clip * rng.choice([-1.0, 1.0])])
            dense = rng.normal(size=40)
            dense *= clip * rng.uniform(0, 1) / np.linalg.norm(dense)
            updates.append([edge if trial % 2 else dense[:1].copy(), dense])
        exact = [
            sum(n * u[i] for n, u in zip(counts, updates, strict=True)) / sum(counts)
            for i in range(2)
        ]
        got = _secaggplus_mean(updates, counts, max_weight, clip, t)
        bound = secagg.error_bound(
            counts, max_weight=max_weight, clip_norm=clip, clipping_range=clip,
            quantization_range=t,
        )  # fmt: skip
        err = max(float(np.abs(g - e).max()) for g, e in zip(got, exact, strict=True))
        assert err <= bound, (trial, err, bound)
        worst = max(worst, err / bound)
    assert worst > 0.1  # and it is tight: errors reach a good fraction of it (~0.3-0.6)


def test_the_quantisation_range_never_wraps_the_modulus() -> None:
    for n in (2, 3, 4, 10, 100, 1000):
        t = secagg.quantization_range(n)
        assert n * t < secagg.MODULUS_RANGE and t <= 2**31 - 1


# ------------------------------------------------------------------------------------------
# (1) + (2) A real Flower simulation: completes; equals plain weighted FedAvg within the bound
# ------------------------------------------------------------------------------------------

MAX_EXAMPLES = 1340
"""Between the bundled instances' 1339 and 1342 training rows: bitstamp-btc-usd-1d is over it.

Plain weighted FedAvg rejects that instance's reply as implausible on the server; under secure
aggregation the instance refuses to send it, drops out of SecAgg+, and the server removes the
others' masks of it. Both paths then average the same three updates.
"""
DROPPED = "bitstamp-btc-usd-1d"
RUN_CONFIG = {
    "num-server-rounds": 1,
    "local-epochs": 1,
    "data-sources": ",".join(DEFAULT_INSTANCES),
    "min-available-nodes": 4,
    "min-train-nodes": 4,
    "max-weight-share": 1.0,
    "max-examples-per-node": MAX_EXAMPLES,
    "secagg-clip-norm": 2.0,
}


class _Nodes:
    """Just enough of a Grid for WeightedFedAvg.configure_train."""

    def get_node_ids(self) -> list[int]:
        return [11, 12, 13, 14]


def _plain_weighted_fedavg(
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[dict[str, np.ndarray], list[Screened]]:
    """Round 1 of the normal path in this process: the app's own train function and strategy.

    Same messages, instances, seeds and aggregation as a Flower run of the app with
    secure-aggregation = false (bit-identical to one, checked when this test was written), in
    seconds instead of a second simulation run.
    """
    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)  # what a ServerApp process has
    threads = torch.get_num_threads()
    from sigmax_fl import client_app  # sets torch to one thread, as on an instance

    try:
        settings = Settings.from_run_config(RUN_CONFIG)
        strategy = WeightedFedAvg(
            defences=settings.defences(), min_train_nodes=4, min_available_nodes=4, seed=42
        )
        sent = ArrayRecord(build_model(settings.model, seed=settings.seed).state_dict())
        messages = strategy.configure_train(1, sent, ConfigRecord(), _Nodes())  # type: ignore[arg-type]
        replies = [
            client_app.train(
                message,
                Context(
                    run_id=1,
                    node_id=message.metadata.dst_node_id,
                    node_config={"partition-id": i, "num-partitions": 4},
                    state=RecordDict(),
                    run_config=RUN_CONFIG,
                ),
            )
            for i, message in enumerate(messages)
        ]
        new, _ = strategy.aggregate_train(1, replies)
    finally:
        torch.set_num_threads(threads)
    assert new is not None
    return {k: as_numpy(a).copy() for k, a in new.items()}, strategy.last_train


@pytest.mark.integration
def test_secure_aggregation_matches_weighted_fedavg_within_the_bound(
    simulation: FlwrHome, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    outputs = tmp_path / "outputs"
    log = io.StringIO()

    # Execute: round 1 with secure aggregation in a real Flower simulation, and without it
    run_id = simulation.run_app(
        ROOT,
        "sim",
        run_config={
            **RUN_CONFIG,
            "secure-aggregation": True,
            "outputs-dir": str(outputs),
            "run-name": "secagg",
        },
        federation_config={"num-supernodes": 4},
        sink=log,
        timeout=RUN_TIMEOUT,
    )
    plain, plain_verdicts = _plain_weighted_fedavg(monkeypatch)

    # Assert (1): completed; SecAgg+ went through all its stages with one dropout
    assert simulation.run_status(run_id, "sim") == FINISHED_OK
    assert "Secure aggregation completed" in log.getvalue()
    assert "round 1/1 (SecAgg+)" in log.getvalue()
    record = json.loads((outputs / "secagg" / "history.json").read_text())[0]
    sa = record["secure_aggregation"]
    assert not record["skipped"] and (sa["sampled"], sa["masked"]) == (4, 3)
    assert set(record["instances"]) == set(DEFAULT_INSTANCES)
    assert record["instances"][DROPPED]["train"]["masked"] is False
    assert record["train"]["clipped"] == 0
    assert sa["quantization_range"] == secagg.quantization_range(4)
    assert np.isfinite(record["evaluate"]["val_loss"]) and record["evaluate"]["replies-ok"] == 4
    lines = (outputs / "secagg" / "audit.jsonl").read_text().splitlines()
    audit = [json.loads(line) for line in lines]
    assert sorted(a["decision"] for a in audit) == ["dropped", "masked", "masked", "masked"]
    assert all(a["update_norm"] is None for a in audit)

    # The plain round averaged the same three instances, with updates under the clip norm
    accepted = [v for v in plain_verdicts if v.ok]
    assert {v.instance_id for v in accepted} == set(DEFAULT_INSTANCES) - {DROPPED}
    assert max(v.update_norm for v in accepted) < 2.0
    counts = sorted(v.num_examples for v in accepted)
    masked = [v["train"] for v in record["instances"].values() if v["train"]["masked"]]
    assert sorted(t["num-examples"] for t in masked) == counts

    # Assert (2): |secure - plain| <= the derived bound (+ the float32 rounding of the weights)
    bound = secagg.error_bound(
        counts,
        max_weight=MAX_EXAMPLES,
        clip_norm=2.0,
        clipping_range=2.0,
        quantization_range=sa["quantization_range"],
    )
    assert sa["error_bound"] == pytest.approx(bound) and bound < 1e-7
    secure = torch.load(outputs / "secagg" / "final_model.pt", weights_only=True)
    initial = build_model("trading-mlp", seed=42).state_dict()
    moved = 0.0
    for name, p in plain.items():
        s = secure[name].numpy()
        ulp = np.spacing(np.maximum(np.abs(p), np.abs(s)))
        assert (np.abs(s.astype(np.float64) - p) <= bound + ulp).all(), name
        moved = max(moved, float(np.abs(p - initial[name].numpy()).max()))
    assert moved > 1e4 * bound  # the round moved the model far beyond the tolerance

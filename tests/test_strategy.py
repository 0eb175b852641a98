"""WeightedFedAvg: the weighted mean by hand, equality with stock FedAvg, every rejection."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from sigmax_fl import fused
from sigmax_fl.strategy import (
    META_KEY,
    Defences,
    WeightedFedAvg,
    as_numpy,
    capped_shares,
    weighted_average,
)

SHAPES = {"w": (3, 2), "b": (2,)}


@pytest.fixture(params=["torch", "fused"])
def one_pass(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The one pass of a round, in torch or in the C kernel (as for a large model)."""
    if request.param == "fused":
        if shutil.which("cc") is None:
            pytest.skip("no C compiler here: the kernel is not built")
        assert fused.library() is not None, "cc is present but the kernel did not build"
        monkeypatch.setattr(fused, "MIN_PARAMS", 0)
    else:
        monkeypatch.setattr(fused, "MIN_PARAMS", 1 << 40)
    return request.param


@pytest.fixture(autouse=True)
def _identity() -> None:
    # Messages outside a running Flower process need a task identity to be built.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def arrays(seed: int, dtype: str = "float32") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(dtype) for k, s in SHAPES.items()}


def record(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in values.items()})


def reply(
    node: int, values: dict[str, np.ndarray] | ArrayRecord, metrics: dict, name: str = ""
) -> Message:
    sent = Message(RecordDict(), dst_node_id=node, message_type="train")
    content = RecordDict(
        {
            "arrays": values if isinstance(values, ArrayRecord) else record(values),
            "metrics": MetricRecord(metrics),
            META_KEY: ConfigRecord({"instance-id": name or f"inst-{node}"}),
        }
    )
    return Message(content, reply_to=sent)


def error_reply(node: int) -> Message:
    sent = Message(RecordDict(), dst_node_id=node, message_type="train")
    return Message(Error(code=0, reason="ClientApp raised"), reply_to=sent)


def aggregate(replies: list[Message], glob: ArrayRecord | None = None, **defences: object) -> tuple:
    # The pure SIGMAX formula: no weight cap unless a test asks for one.
    strategy = WeightedFedAvg(defences=Defences(**{"max_weight_share": 1.0, **defences}))
    strategy._sent = glob if glob is not None else record(arrays(0))
    return strategy.aggregate_train(1, replies), strategy


def test_weighted_average_equals_hand_computation() -> None:
    # Prepare
    parts = [(arrays(1), 100), (arrays(2), 300), (arrays(3), 600)]
    replies = [
        reply(i, a, {"num-examples": n, "train_loss": float(i)}) for i, (a, n) in enumerate(parts)
    ]

    # Execute
    (result, metrics), _ = aggregate(replies)

    # Assert
    for name in SHAPES:
        expected = sum(a[name].astype(np.float64) * n for a, n in parts) / 1000
        np.testing.assert_allclose(result[name].numpy(), expected, rtol=1e-6, atol=1e-7)
        assert result[name].numpy().dtype == np.float32
    assert metrics["replies-ok"] == 3 and metrics["replies-rejected"] == 0
    assert metrics["train_loss"] == pytest.approx((0 * 100 + 1 * 300 + 2 * 600) / 1000)


def test_equals_stock_fedavg_on_good_replies() -> None:
    parts = [(arrays(s), n) for s, n in ((4, 17), (5, 1200), (6, 333), (7, 50))]
    replies = [
        reply(i, a, {"num-examples": n, "train_loss": 0.5}) for i, (a, n) in enumerate(parts)
    ]
    (ours, _), _ = aggregate(replies)
    stock, _ = FedAvg().aggregate_train(1, replies)
    for name in SHAPES:
        np.testing.assert_allclose(ours[name].numpy(), stock[name].numpy(), atol=1e-6)


def _npy_lying_about_shape() -> ArrayRecord:
    good = arrays(9)
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((4, 4), np.float32))
    fake = Array(dtype="float32", shape=(3, 2), stype="numpy.ndarray", data=buffer.getvalue())
    return ArrayRecord({"w": fake, "b": Array(good["b"])})


def _nan() -> dict[str, np.ndarray]:
    bad = arrays(8)
    bad["w"][0, 0] = np.nan
    return bad


def _inf() -> dict[str, np.ndarray]:
    bad = arrays(8)
    bad["b"][1] = -np.inf
    return bad


BAD_REPLIES = {
    "error reply": lambda node: error_reply(node),
    "no num-examples": lambda node: reply(node, arrays(8), {"train_loss": 1.0}),
    "zero num-examples": lambda node: reply(node, arrays(8), {"num-examples": 0}),
    "negative num-examples": lambda node: reply(node, arrays(8), {"num-examples": -5}),
    "fractional num-examples": lambda node: reply(node, arrays(8), {"num-examples": 2.5}),
    "missing array": lambda node: reply(node, {"w": arrays(8)["w"]}, {"num-examples": 10}),
    "renamed array": lambda node: reply(
        node, {"w": arrays(8)["w"], "bias": arrays(8)["b"]}, {"num-examples": 10}
    ),
    "wrong shape": lambda node: reply(
        node, {"w": np.zeros((2, 3), np.float32), "b": arrays(8)["b"]}, {"num-examples": 10}
    ),
    "wrong dtype": lambda node: reply(node, arrays(8, "float64"), {"num-examples": 10}),
    "NaN": lambda node: reply(node, _nan(), {"num-examples": 10}),
    "Inf": lambda node: reply(node, _inf(), {"num-examples": 10}),
    "npy disagrees with header": lambda node: reply(
        node, _npy_lying_about_shape(), {"num-examples": 10}
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_REPLIES))
def test_bad_reply_is_left_out_and_counted(case: str) -> None:
    # Prepare: two good replies and one bad one
    good = [(arrays(1), 100), (arrays(2), 300)]
    replies = [reply(i, a, {"num-examples": n}) for i, (a, n) in enumerate(good)]
    replies.append(BAD_REPLIES[case](99))

    # Execute
    (result, metrics), strategy = aggregate(replies)

    # Assert: the average is that of the good replies alone, the bad one is named
    for name in SHAPES:
        expected = (good[0][0][name] * 100.0 + good[1][0][name] * 300.0) / 400
        np.testing.assert_allclose(result[name].numpy(), expected, rtol=1e-6, atol=1e-7)
    assert metrics["replies-ok"] == 2 and metrics["replies-rejected"] == 1
    rejected = [s for s in strategy.last_train if not s.ok]
    assert len(rejected) == 1 and rejected[0].reason
    assert rejected[0].instance_id in {"inst-99", "node-99"}


def test_no_usable_reply_keeps_the_model() -> None:
    (result, metrics), _ = aggregate([error_reply(1), BAD_REPLIES["NaN"](2)])
    assert result is None
    assert metrics["replies-ok"] == 0 and metrics["replies-rejected"] == 2


def test_as_numpy_reads_without_copy() -> None:
    value = np.arange(12, dtype=np.float32).reshape(3, 4)
    array = Array(value)
    view = as_numpy(array)
    np.testing.assert_array_equal(view, value)
    assert not view.flags.owndata and not view.flags.writeable


def test_evaluate_metrics_weighted_and_nan_tolerant() -> None:
    sent = [Message(RecordDict(), dst_node_id=n, message_type="evaluate") for n in (1, 2, 3)]
    replies = [
        Message(
            RecordDict(
                {"metrics": MetricRecord({"val_loss": 1.0, "ic": 0.2, "num-examples": 100})}
            ),
            reply_to=sent[0],
        ),
        Message(
            RecordDict(
                {
                    "metrics": MetricRecord(
                        {"val_loss": 3.0, "ic": float("nan"), "num-examples": 300}
                    )
                }
            ),
            reply_to=sent[1],
        ),
        Message(Error(code=0, reason="boom"), reply_to=sent[2]),
    ]
    strategy = WeightedFedAvg()
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics["val_loss"] == pytest.approx(2.5)
    assert metrics["ic"] == pytest.approx(0.2)  # the NaN instance is left out of IC only
    assert metrics["replies-ok"] == 2
    assert [s.ok for s in strategy.last_evaluate] == [True, True, False]


def scaled(
    base: dict[str, np.ndarray], glob: dict[str, np.ndarray], factor: float
) -> dict[str, np.ndarray]:
    """glob + factor * (base - glob): an update blown up (or flipped) by ``factor``."""
    return {k: (glob[k] + factor * (base[k] - glob[k])).astype(np.float32) for k in base}


def near(glob: dict[str, np.ndarray], seed: int, scale: float = 0.01) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (v + scale * rng.normal(size=v.shape)).astype(np.float32) for k, v in glob.items()}


@pytest.mark.parametrize("factor", [1e6, -100.0])
def test_adaptive_norm_bound_rejects_scaled_and_flipped_updates(factor: float) -> None:
    glob = arrays(0)
    honest = [near(glob, s) for s in range(1, 5)]
    attacker = scaled(near(glob, 9), glob, factor)
    replies = [reply(i, a, {"num-examples": 100}) for i, a in enumerate([*honest, attacker])]
    (result, metrics), strategy = aggregate(replies, record(glob))
    assert metrics["replies-rejected"] == 1
    bad = next(s for s in strategy.last_train if not s.ok)
    assert bad.instance_id == "inst-4" and "update norm" in bad.reason
    expected = {k: np.mean([h[k].astype(np.float64) for h in honest], axis=0) for k in glob}
    for k in glob:
        np.testing.assert_allclose(result[k].numpy(), expected[k], atol=1e-6)


def test_two_replies_lower_median_still_catches_the_attacker() -> None:
    glob = arrays(0)
    replies = [
        reply(0, near(glob, 1), {"num-examples": 100}),
        reply(1, scaled(near(glob, 2), glob, 1e6), {"num-examples": 100}),
    ]
    (_, metrics), strategy = aggregate(replies, record(glob))
    assert metrics["replies-ok"] == 1 and [s.ok for s in strategy.last_train] == [True, False]


def test_clip_policy_bounds_influence() -> None:
    glob = arrays(0)
    big = scaled(near(glob, 5), glob, 50.0)
    replies = [reply(i, near(glob, i + 1), {"num-examples": 100}) for i in range(3)]
    replies.append(reply(3, big, {"num-examples": 100}))
    (result, metrics), strategy = aggregate(
        replies, record(glob), update_norm_policy="clip", max_update_norm=0.05
    )
    assert metrics["replies-rejected"] == 0
    for s in strategy.last_train:
        assert s.clip * s.update_norm <= 0.05 + 1e-9
    delta = np.sqrt(
        sum(np.sum((result[k].numpy().astype(np.float64) - glob[k]) ** 2) for k in glob)
    )
    assert delta <= 0.05 + 1e-6  # a mean of clipped updates cannot move further than the bound


def test_implausible_num_examples_rejected() -> None:
    glob = arrays(0)
    replies = [
        reply(0, near(glob, 1), {"num-examples": 100}),
        reply(1, near(glob, 2), {"num-examples": 10**9}),
    ]
    (_, metrics), strategy = aggregate(replies, record(glob), max_examples_per_node=1_000_000)
    assert (
        metrics["replies-rejected"] == 1
        and "max-examples-per-node" in strategy.last_train[1].reason
    )


def test_weight_cap_redistributes_excess() -> None:
    shares = capped_shares([100, 100, 800], 0.5)
    np.testing.assert_allclose(shares, [0.25, 0.25, 0.5])
    np.testing.assert_allclose(capped_shares([10, 20, 30, 40], 0.5), [0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(capped_shares([1, 99], 0.4), [0.5, 0.5])  # infeasible -> equal
    cascade = capped_shares([1, 1, 50, 60], 0.3)
    assert cascade.max() <= 0.3 + 1e-12 and cascade.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(5))
def test_uncapped_shares_are_n_over_the_total_to_the_bit(seed: int) -> None:
    # The common round (nobody at the cap) skips the water-filling: its numbers must not move
    examples = list(np.random.default_rng(seed).integers(1, 10**7, size=12))
    n = np.asarray(examples, dtype=np.float64)
    assert capped_shares(examples, 0.5).tobytes() == (n / n.sum()).tobytes()
    assert capped_shares([int(k) for k in examples], 1.0).tobytes() == (n / n.sum()).tobytes()


def test_default_cap_applies_inside_the_strategy() -> None:
    glob = arrays(0)
    models = [near(glob, 1), near(glob, 2)]
    replies = [
        reply(0, models[0], {"num-examples": 100}),
        reply(1, models[1], {"num-examples": 900}),
    ]
    strategy = WeightedFedAvg()  # default max-weight-share 0.5
    strategy._sent = record(glob)
    result, _ = strategy.aggregate_train(1, replies)
    for k in glob:
        expected = 0.5 * models[0][k].astype(np.float64) + 0.5 * models[1][k]
        np.testing.assert_allclose(result[k].numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("method", ["median", "trimmed-mean", "krum"])
def test_robust_aggregations_ignore_one_outlier(method: str) -> None:
    glob = arrays(0)
    honest = [near(glob, s) for s in range(1, 6)]
    outlier = scaled(near(glob, 9), glob, 20.0)
    replies = [reply(i, a, {"num-examples": 100}) for i, a in enumerate([*honest, outlier])]
    # An absolute bound loose enough to let the outlier through: only the rule protects.
    (result, _), _ = aggregate(
        replies, record(glob), aggregation=method, max_update_norm=1e9, trim_fraction=0.2
    )
    for k in glob:
        lo = np.min([h[k] for h in honest], axis=0) - 1e-6
        hi = np.max([h[k] for h in honest], axis=0) + 1e-6
        assert ((result[k].numpy() >= lo) & (result[k].numpy() <= hi)).all()


def test_quorum_skips_round() -> None:
    glob = arrays(0)
    replies = [reply(0, near(glob, 1), {"num-examples": 100}), error_reply(1)]
    (result, metrics), _ = aggregate(replies, record(glob), min_train_replies=2)
    assert result is None and metrics["replies-ok"] == 1


def test_audit_lines_name_instance_norm_and_decision() -> None:
    glob = arrays(0)
    replies = [reply(i, near(glob, i + 1), {"num-examples": 100}) for i in range(3)]
    replies.append(BAD_REPLIES["NaN"](7))
    _, strategy = aggregate(replies, record(glob))
    audit = [s.audit(3) for s in strategy.last_train]
    assert [a["decision"] for a in audit] == ["accepted"] * 3 + ["rejected"]
    assert all(a["round"] == 3 and a["update_norm"] > 0 for a in audit[:3])
    assert audit[3]["instance_id"] == "inst-7" and "NaN" in audit[3]["reason"]


def test_reply_order_does_not_change_the_model() -> None:
    glob = arrays(0)
    replies = [reply(i, near(glob, i + 1), {"num-examples": 37 * (i + 1)}) for i in range(5)]
    (first, _), _ = aggregate(replies, record(glob))
    (second, _), _ = aggregate(replies[::-1], record(glob))
    for k in glob:
        assert first[k].numpy().tobytes() == second[k].numpy().tobytes()


def test_pure_weighted_average_matches_formula() -> None:
    models = [arrays(1), arrays(2)]
    out = weighted_average(models, [1, 3])
    for k in SHAPES:
        expected = 0.25 * models[0][k].astype(np.float64) + 0.75 * models[1][k].astype(np.float64)
        np.testing.assert_allclose(out[k], expected, rtol=1e-12)


def test_as_numpy_reads_the_reply_in_place() -> None:
    array = Array(np.arange(1000, dtype=np.float32).reshape(10, 100))
    view = as_numpy(array)
    start = np.frombuffer(array.data, dtype=np.uint8).__array_interface__["data"][0]
    assert not view.flags.owndata and not view.flags.writeable
    assert view.__array_interface__["data"][0] == start + len(array.data) - view.nbytes
    np.testing.assert_array_equal(view, array.numpy())


def _big_round(replies: int, sizes: dict[str, tuple[int, ...]], bad: int | None = None) -> list:
    rng = np.random.default_rng(11)
    glob = {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in sizes.items()}
    out = []
    for node in range(replies):
        values = {k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in glob.items()}
        if node == bad:
            values["w"][3, 3] = np.nan
        out.append(reply(node, values, {"num-examples": int(rng.integers(100, 5000))}))
    return [glob, out]


def test_one_pass_average_equals_float64_reference(one_pass: str) -> None:
    # Prepare: several blocks of the one pass per array, ragged last block, 10 replies
    glob, replies = _big_round(10, {"w": (300, 701), "b": (5,)})

    # Execute
    (result, _), strategy = aggregate(replies, record(glob))

    # Assert: within float32 rounding of the float64 weighted mean; norms to 1e-5
    shares = [s.weight for s in strategy.last_train]
    models = [
        {k: a.numpy().astype(np.float64) for k, a in m.content["arrays"].items()} for m in replies
    ]
    for name in glob:
        expected = sum(w * m[name] for w, m in zip(shares, models, strict=True))
        np.testing.assert_allclose(result[name].numpy(), expected, rtol=2**-23, atol=2e-9)
    for s, m in zip(strategy.last_train, models, strict=True):
        exact = np.sqrt(sum(((m[k] - glob[k]) ** 2).sum() for k in glob))
        assert s.update_norm == pytest.approx(exact, rel=1e-5)


def test_long_way_round_gives_the_same_model_bit_for_bit(one_pass: str) -> None:
    # A NaN reply makes the round take the exact path; the others must average as if it
    # had never been sent (the attack test's bit-identity rests on this)
    glob, replies = _big_round(6, {"w": (200, 400), "b": (7,)}, bad=2)
    (with_bad, metrics), _ = aggregate(replies, record(glob))
    (without, _), _ = aggregate(replies[:2] + replies[3:], record(glob))
    assert metrics["replies-rejected"] == 1
    for name in glob:
        assert with_bad[name].data == without[name].data

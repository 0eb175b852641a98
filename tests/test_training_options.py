"""The guide's training options: per-instance learning rate, gradient accumulation, bf16.

The learning-rate tests call the real ClientApp train function in-process on bundled data, so
an option the call site drops (a node config that is read but not used) fails them.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.app.message import make_message

from sigmax_fl import client_app, simulate, task
from sigmax_fl.model import build_model
from sigmax_fl.settings import ConfigError, Settings

from .conftest import DEFAULT_INSTANCES

RUN_CONFIG = {"local-epochs": 1, "data-sources": ",".join(DEFAULT_INSTANCES[:2])}
INITIAL = build_model("trading-mlp", seed=7).state_dict()


def _regression(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A learnable problem: a linear signal in the 50 features plus noise."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((rows, 50)).astype(np.float32)
    y = (X @ rng.standard_normal(50) * 0.1 + 0.05 * rng.standard_normal(rows)).astype(np.float32)
    return X, y


def _trained(X: np.ndarray, y: np.ndarray, **options: object) -> dict[str, torch.Tensor]:
    model = build_model("trading-mlp", seed=1)
    kwargs = {"epochs": 1, "learning_rate": 0.01, "optimizer": "sgd", "seed": 3, **options}
    task.train(model, X, y, **kwargs)  # type: ignore[arg-type]
    return model.state_dict()


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# -- gradient accumulation ---------------------------------------------------------------------


def test_two_accumulated_micro_batches_make_the_step_of_one_double_batch() -> None:
    # 40 rows: steps of 32 and 8 rows, so the uneven last step's weighting is covered too.
    # SGD (not Adam, whose first step hardly depends on the gradient's scale) exposes a wrong
    # weighting of the micro-batch losses.
    X, y = _regression(40)
    start = build_model("trading-mlp", seed=1).state_dict()
    accumulated = _trained(X, y, batch_size=16, grad_accumulation_steps=2)
    double = _trained(X, y, batch_size=32)
    small_steps = _trained(X, y, batch_size=16)
    moved = _max_diff(double, start)
    assert _max_diff(accumulated, double) < 1e-6 * max(moved, 1.0)
    # Not a no-op: four steps of 16 rows land elsewhere.
    assert _max_diff(small_steps, double) > 100 * _max_diff(accumulated, double)


# -- mixed precision ---------------------------------------------------------------------------


def test_mixed_precision_runs_the_forward_pass_in_bfloat16_and_still_learns() -> None:
    X, y = _regression(512)
    seen: dict[bool, set[torch.dtype]] = {}
    losses: dict[bool, list[float]] = {}
    states = {}
    for mixed in (False, True):
        model = build_model("trading-mlp", seed=1)
        dtypes: set[torch.dtype] = set()
        model.net[0].register_forward_hook(lambda _m, _i, out, d=dtypes: d.add(out.dtype))
        losses[mixed] = [
            task.train(
                model,
                X,
                y,
                epochs=1,
                batch_size=32,
                learning_rate=1e-3,
                seed=epoch,
                mixed_precision=mixed,
            )
            for epoch in range(4)
        ]
        seen[mixed], states[mixed] = dtypes, model.state_dict()
    assert seen == {False: {torch.float32}, True: {torch.bfloat16}}
    # The weights stay float32; bf16 rounding makes them differ, a little
    assert all(v.dtype == torch.float32 for v in states[True].values())
    assert 0 < _max_diff(states[True], states[False]) < 0.05
    for mixed in (False, True):
        assert losses[mixed][-1] < 0.5 * losses[mixed][0], (mixed, losses[mixed])
    assert losses[True][-1] == pytest.approx(losses[False][-1], rel=0.1)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"dp": "local", "mixed-precision": True}, "'mixed-precision' = True.*dp = 'local'"),
        (
            {"dp": "local", "grad-accumulation-steps": 2},
            "'grad-accumulation-steps' = 2.*dp = 'local'",
        ),
        ({"grad-accumulation-steps": 0}, "'grad-accumulation-steps' = 0"),
        ({"instance-learning-rates": "a=0.1,b=-1"}, "'instance-learning-rates'"),
    ],
)
def test_options_that_cannot_take_effect_are_config_errors(config: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_run_config(config)


# -- the ClientApp call site -------------------------------------------------------------------


def _train_message() -> Message:
    meta = Metadata(1, "m1", 0, 5, "", "1", time.time(), 600.0, "train")
    content = RecordDict(
        {"arrays": ArrayRecord(INITIAL), "config": ConfigRecord({"server-round": 1})}
    )
    return make_message(meta, content)


def _client_update(partition: int, run_config: dict | None = None, **node: object) -> float:
    """Norm of the update the real ClientApp sends for simulation partition ``partition``."""
    context = Context(
        run_id=1,
        node_id=5,
        node_config={"partition-id": partition, "num-partitions": 2, **node},
        state=RecordDict(),
        run_config={**RUN_CONFIG, **(run_config or {})},
    )
    reply = client_app.train(_train_message(), context)
    sent = reply.content["arrays"].to_torch_state_dict()
    return float(torch.sqrt(sum(((sent[k] - INITIAL[k]) ** 2).sum() for k in INITIAL)))


def test_a_node_config_learning_rate_is_the_rate_the_instance_trains_with() -> None:
    default = _client_update(0)
    tiny = _client_update(0, **{"learning-rate": 1e-9})
    larger = _client_update(0, **{"learning-rate": 1e-2})
    assert default > 0.05
    assert 0 < tiny < 1e-5 * default  # Adam's steps scale with the rate
    assert larger > 2 * default


def test_instance_learning_rates_apply_to_the_named_instance_only() -> None:
    rates = {"instance-learning-rates": f"{DEFAULT_INSTANCES[0]}=1e-9"}
    assert _client_update(0, rates) < 1e-5
    # The other instance keeps the global rate: exactly the update it sends without the map.
    assert _client_update(1, rates) == _client_update(1)


@pytest.mark.parametrize("value", ["fast", -0.1, 0, True, float("nan")])
def test_a_bad_node_config_learning_rate_names_the_key_and_the_node(value: object) -> None:
    with pytest.raises(ConfigError, match=f"node config 'learning-rate'.*'{DEFAULT_INSTANCES[0]}'"):
        _client_update(0, **{"learning-rate": value})


def test_learning_rates_that_would_be_ignored_are_errors() -> None:
    with pytest.raises(ConfigError, match=r"'instance-learning-rates' names \['coinbase-btc'\]"):
        _client_update(0, {"instance-learning-rates": "coinbase-btc=0.01"})
    with pytest.raises(ConfigError, match="contradicts run-config 'instance-learning-rates'"):
        _client_update(
            0, {"instance-learning-rates": f"{DEFAULT_INSTANCES[0]}=0.01"}, **{"learning-rate": 0.1}
        )


def test_the_client_trains_with_accumulation_and_mixed_precision_when_asked() -> None:
    # batch 16 x 2 accumulated = batch 32: the call site really passes the key through
    accumulated = _client_update(0, {"batch-size": 16, "grad-accumulation-steps": 2})
    plain16, plain32 = _client_update(0, {"batch-size": 16}), _client_update(0)
    assert accumulated == pytest.approx(plain32, rel=1e-4)
    assert abs(plain16 - plain32) > 1e-3 * plain32
    mixed = _client_update(0, {"mixed-precision": True})
    assert mixed != plain32 and mixed == pytest.approx(plain32, rel=0.2)


def test_make_run_refuses_a_learning_rate_for_no_instance_before_starting_anything(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Every instance would refuse every round; the runner says so before any process starts
    code = simulate.main(
        ["--run-config", 'instance-learning-rates="coinbase-btc-usd-1d=0.01,nope=0.1"']
    )

    assert code == 2
    assert "'instance-learning-rates' names ['nope']" in capsys.readouterr().err

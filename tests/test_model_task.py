"""TradingModel's architecture and registry; task.train really learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sigmax_fl import task
from sigmax_fl.model import MODELS, TradingModel, build_model, register


def test_architecture_is_50_128_64_1_relu() -> None:
    layers = list(TradingModel().net)
    kinds = [type(layer).__name__ for layer in layers]
    assert kinds == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert [(m.in_features, m.out_features) for m in layers if isinstance(m, torch.nn.Linear)] == [
        (50, 128),
        (128, 64),
        (64, 1),
    ]
    assert TradingModel()(torch.zeros(7, 50)).shape == (7,)


def test_registry_builds_by_name_and_seed_fixes_weights() -> None:
    a, b = build_model("trading-mlp", seed=3), build_model("trading-mlp", seed=3)
    c = build_model("trading-mlp", seed=4)
    for (name, pa), pb, pc in zip(
        a.state_dict().items(), b.state_dict().values(), c.state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pb), name
        assert not torch.equal(pa, pc), name
    with pytest.raises(ValueError, match="unknown model 'nope'.*trading-mlp"):
        build_model("nope")


def test_register_adds_an_architecture() -> None:
    register(
        "tiny-linear-test", lambda: torch.nn.Sequential(torch.nn.Linear(50, 1), torch.nn.Flatten(0))
    )
    try:
        assert build_model("tiny-linear-test")(torch.zeros(2, 50)).shape == (2,)
        with pytest.raises(ValueError, match="already registered"):
            register("tiny-linear-test", TradingModel)
    finally:
        MODELS.pop("tiny-linear-test")


def test_training_lowers_loss_on_learnable_target() -> None:
    # Prepare: y is a noisy linear function of two features
    rng = np.random.default_rng(0)
    X = rng.normal(size=(2000, 50)).astype(np.float32)
    y = (0.5 * X[:, 0] - 0.3 * X[:, 1] + 0.05 * rng.normal(size=2000)).astype(np.float32)
    model = build_model("trading-mlp", seed=0)
    before = task.evaluate(model, X, y)

    # Execute
    task.train(model, X, y, epochs=5, batch_size=32, learning_rate=1e-3, seed=0)
    after = task.evaluate(model, X, y)

    # Assert
    assert after["loss"] < 0.2 * before["loss"]
    assert after["ic"] > 0.9 and after["hit_rate"] > 0.8


def test_training_is_reproducible_with_a_seed() -> None:
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(300, 50)).astype(np.float32), rng.normal(size=300).astype(np.float32)
    models = [build_model("trading-mlp", seed=0) for _ in range(2)]
    losses = [
        task.train(m, X, y, epochs=2, batch_size=32, learning_rate=1e-3, seed=5) for m in models
    ]
    assert losses[0] == losses[1]
    for pa, pb in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(pa, pb)

"""The shared trading model and the name -> architecture registry.

The run config names the architecture (``model = "trading-mlp"``), so another one can be
added with :func:`register` without touching the ServerApp or the ClientApp.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sigmax_fl.features import FEATURE_NAMES

NUM_FEATURES = len(FEATURE_NAMES)


class TradingModel(nn.Module):
    """MLP 50 -> 128 -> 64 -> 1 with ReLU: the next-bar return from one row of features."""

    def __init__(self, num_features: int = NUM_FEATURES, hidden: tuple[int, int] = (128, 64)):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(num_features, hidden[0]),
            nn.ReLU(),
            nn.Linear(hidden[0], hidden[1]),
            nn.ReLU(),
            nn.Linear(hidden[1], 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


MODELS: dict[str, Callable[[], nn.Module]] = {"trading-mlp": TradingModel}


def register(name: str, factory: Callable[[], nn.Module]) -> None:
    """Make an architecture selectable by ``model = "<name>"`` in the run config."""
    if name in MODELS:
        raise ValueError(f"model '{name}' is already registered")
    MODELS[name] = factory


def build_model(name: str, seed: int | None = None) -> nn.Module:
    """A fresh model; with ``seed``, the same initial weights on every machine."""
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; registered: {sorted(MODELS)}")
    if seed is None:
        return MODELS[name]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name]()

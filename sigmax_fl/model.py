"""The shared trading model and the name -> architecture registry.

The run config names the architecture (``model = "trading-mlp"``), so another one can be
added with :func:`register` without touching the ServerApp or the ClientApp. An architecture
may name its output *head*: with ``personalisation = "local-head"`` only the rest (the body) is
federated and each instance keeps its own head (:mod:`sigmax_fl.personal`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

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
HEADS: dict[str, tuple[str, ...]] = {"trading-mlp": ("net.4",)}
"""Model name -> the submodules that form its output head (TradingModel: the 64 -> 1 layer)."""


def register(
    name: str, factory: Callable[[], nn.Module], head: Sequence[str] | None = None
) -> None:
    """Make an architecture selectable by ``model = "<name>"`` in the run config.

    ``head`` names the submodules (as in ``named_modules``) an instance keeps to itself under
    ``personalisation = "local-head"``; without it that option is refused for this model.
    """
    if name in MODELS:
        raise ValueError(f"model '{name}' is already registered")
    if head is not None:
        state = factory().state_dict()
        keys = _keys_under(state, tuple(head))
        if not keys or len(keys) == len(state):
            raise ValueError(
                f"model '{name}': head {list(head)} must name some but not all of its parameters"
            )
        HEADS[name] = tuple(head)
    MODELS[name] = factory


def _keys_under(keys: Iterable[str], modules: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(k for k in keys if any(k == m or k.startswith(m + ".") for m in modules))


def head_keys(name: str, state: Mapping[str, torch.Tensor] | None = None) -> tuple[str, ...]:
    """The state-dict keys of model ``name``'s head: what never leaves an instance.

    ``state``, a state dict of model ``name`` already at hand, saves building a model to read
    its keys.

    Raises
    ------
    ValueError
        If ``name`` is unknown or was registered without a head.
    """
    if name not in HEADS:
        raise ValueError(
            f"model '{name}' names no output head, so personalisation = 'local-head' cannot "
            f"split it: register it with register(name, factory, head=[...]) "
            f"(models with a head: {sorted(HEADS)})"
        )
    return _keys_under(build_model(name).state_dict() if state is None else state, HEADS[name])


def build_model(name: str, seed: int | None = None) -> nn.Module:
    """A fresh model; with ``seed``, the same initial weights on every machine."""
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; registered: {sorted(MODELS)}")
    if seed is None:
        return MODELS[name]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name]()

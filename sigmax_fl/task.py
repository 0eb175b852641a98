"""Local training and evaluation in plain torch: no Flower here.

``compare`` and the tests call these directly, so a federated model, a local-only model and a
pooled model are trained by the very same loop.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from sigmax_fl import metrics


def make_optimizer(name: str, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """A fresh optimiser by run-config name; every training loop builds it here."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise ValueError(f"unknown optimizer '{name}', expected 'adam' or 'sgd'")


def train(
    model: nn.Module,
    X: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    optimizer: str = "adam",
    seed: int = 0,
) -> float:
    """Train in place with MSE; return the mean loss over the last epoch.

    Batches are shuffled by a generator seeded with ``seed``, so a round is reproducible; a
    fresh optimiser each call matches FedAvg, where local optimiser state does not outlive a
    round.
    """
    if len(X) == 0:
        raise ValueError("no training rows")
    features = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    targets = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))
    generator = torch.Generator().manual_seed(seed)
    opt = make_optimizer(optimizer, list(model.parameters()), learning_rate)
    loss_fn = nn.MSELoss()
    model.train()
    epoch_loss = float("nan")
    for _ in range(epochs):
        order = torch.randperm(len(features), generator=generator)
        total = 0.0
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(features[batch]), targets[batch])
            loss.backward()
            opt.step()
            total += loss.item() * len(batch)
        epoch_loss = total / len(features)
    return epoch_loss


@torch.no_grad()
def predict(model: nn.Module, X: np.ndarray) -> np.ndarray:
    """Forecasts for every row, as float64 for the metrics."""
    model.eval()
    return model(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))).double().numpy()


def evaluate(model: nn.Module, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Loss (MSE) and the forecast metrics quants read: hit rate, IC, rank IC, R^2 vs zero."""
    if len(X) == 0:
        raise ValueError("no evaluation rows")
    pred = predict(model, X)
    return {
        "loss": metrics.mse(pred, y),
        "hit_rate": metrics.hit_rate(pred, y),
        "ic": metrics.ic(pred, y),
        "rank_ic": metrics.rank_ic(pred, y),
        "r2_oos": metrics.r2_oos(pred, y),
    }

"""Local training and evaluation in plain torch: no Flower here.

``compare`` and the tests call these directly, so a federated model, a local-only model and a
pooled model are trained by the very same loop.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch
from torch import nn

from sigmax_fl import metrics, optim


def make_optimizer(name: str, params: list[nn.Parameter], lr: float) -> optim.Adam | optim.SGD:
    """A fresh optimiser by run-config name; every training loop builds it here.

    :mod:`sigmax_fl.optim`'s, not ``torch.optim``'s: the same updates, without the ``torch._dynamo``
    import (about a second) that ``torch.optim`` costs each fresh ClientApp process.
    """
    if name == "adam":
        return optim.Adam(params, lr=lr)
    if name == "sgd":
        return optim.SGD(params, lr=lr, momentum=0.9)
    raise ValueError(f"unknown optimizer '{name}', expected 'adam' or 'sgd'")


class MixedPrecisionError(RuntimeError):
    """``mixed-precision = true`` on a CPU or torch build without bfloat16 autocast."""


@functools.cache
def _check_bf16_autocast() -> None:
    """Raise unless a forward pass under CPU autocast really computes in bfloat16."""
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = nn.Linear(2, 1)(torch.ones(1, 2))
    except (RuntimeError, TypeError) as err:
        raise MixedPrecisionError(
            f"run-config 'mixed-precision' = true: bfloat16 autocast fails on this CPU / torch "
            f"{torch.__version__}: {err}; set mixed-precision = false"
        ) from None
    if out.dtype != torch.bfloat16:
        raise MixedPrecisionError(
            f"run-config 'mixed-precision' = true: CPU autocast on torch {torch.__version__} "
            f"computes in {out.dtype}, not bfloat16; set mixed-precision = false"
        )


def precision(mixed_precision: bool) -> contextlib.AbstractContextManager:
    """The forward pass's context: bfloat16 CPU autocast, or plain float32."""
    if not mixed_precision:
        return contextlib.nullcontext()
    _check_bf16_autocast()
    return torch.autocast("cpu", dtype=torch.bfloat16)


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
    grad_accumulation_steps: int = 1,
    mixed_precision: bool = False,
) -> float:
    """Train in place with MSE; return the mean loss over the last epoch.

    Batches are shuffled by a generator seeded with ``seed``, so a round is reproducible; a
    fresh optimiser each call matches FedAvg, where local optimiser state does not outlive a
    round.

    For an instance short of memory: ``grad_accumulation_steps`` k sums the gradients of k
    micro-batches of ``batch_size`` rows, each loss weighted by its share of the step's rows,
    into one optimiser step, which is the step of one batch of k x ``batch_size`` rows (up to
    float rounding) at the memory of one micro-batch. ``mixed_precision`` runs the forward
    pass under bfloat16 CPU autocast (half the activation memory); the weights, the loss and
    the optimiser stay float32.
    """
    if len(X) == 0:
        raise ValueError("no training rows")
    if grad_accumulation_steps < 1:
        raise ValueError(f"grad_accumulation_steps must be >= 1, got {grad_accumulation_steps}")
    features = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    targets = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))
    generator = torch.Generator().manual_seed(seed)
    opt = make_optimizer(optimizer, list(model.parameters()), learning_rate)
    loss_fn = nn.MSELoss()
    model.train()
    step_rows = batch_size * grad_accumulation_steps
    epoch_loss = float("nan")
    for _ in range(epochs):
        order = torch.randperm(len(features), generator=generator)
        total = 0.0
        for start in range(0, len(order), step_rows):
            rows = order[start : start + step_rows]
            opt.zero_grad(set_to_none=True)
            for batch in rows.split(batch_size):
                with precision(mixed_precision):
                    pred = model(features[batch])
                loss = loss_fn(pred.float(), targets[batch])
                (loss * (len(batch) / len(rows))).backward()
                total += loss.item() * len(batch)
            opt.step()
        epoch_loss = total / len(features)
    return epoch_loss


@torch.no_grad()
def predict(model: nn.Module, X: np.ndarray) -> np.ndarray:
    """Forecasts for every row, as float64 for the metrics."""
    model.eval()
    return model(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))).double().numpy()


def evaluate(
    model: nn.Module, X: np.ndarray, y: np.ndarray, *, target: str = "return"
) -> dict[str, float]:
    """Loss (MSE) and the forecast metrics quants read for the ``target``.

    A return forecast: hit rate, IC, rank IC, R^2 vs zero. A log-volatility forecast has no
    sign to hit and no zero to beat, so it reports QLIKE and the correlation of predicted and
    realised volatility instead.
    """
    if len(X) == 0:
        raise ValueError("no evaluation rows")
    pred = predict(model, X)
    if target == "volatility":
        return {
            "loss": metrics.mse(pred, y),
            "qlike": metrics.qlike(pred, y),
            "vol_corr": metrics.vol_correlation(pred, y),
        }
    return {
        "loss": metrics.mse(pred, y),
        "hit_rate": metrics.hit_rate(pred, y),
        "ic": metrics.ic(pred, y),
        "rank_ic": metrics.rank_ic(pred, y),
        "r2_oos": metrics.r2_oos(pred, y),
    }

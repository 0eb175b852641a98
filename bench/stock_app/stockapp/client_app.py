"""Quickstart-style ClientApp: train and evaluate the sigmax-fl MLP on one synthetic instance."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from sigmax_fl import task
from sigmax_fl.data import parse_sources
from sigmax_fl.dataset import InstanceData, Recipe, load_instance
from sigmax_fl.model import build_model

app = ClientApp()

# The defaults of sigmax-fl's pyproject: the same rows as the sigmax-fl runs of the bench.
RECIPE = Recipe(1, "3d", "2018-09-30", "2019-03-31", "strict")


def _data(context: Context) -> InstanceData:
    n = int(context.run_config["num-instances"])
    source = parse_sources(f"synthetic:{n}")[int(context.node_config["partition-id"])]
    return load_instance(source, RECIPE)


def _model(message: Message):
    model = build_model("trading-mlp")
    model.load_state_dict(message.content["arrays"].to_torch_state_dict())
    return model


def _train(model: torch.nn.Module, X: np.ndarray, y: np.ndarray, config: dict) -> float:
    """The quickstart's loop: torch.optim.Adam and MSE over shuffled minibatches."""
    features, targets = torch.from_numpy(X), torch.from_numpy(y)
    batch_size = int(config["batch-size"])
    optimizer = torch.optim.Adam(model.parameters(), lr=float(config["learning-rate"]))
    generator = torch.Generator().manual_seed(int(config["seed"]))
    model.train()
    total = 0.0
    for _ in range(int(config["local-epochs"])):
        total = 0.0
        for rows in torch.randperm(len(features), generator=generator).split(batch_size):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(features[rows]), targets[rows])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
    return total / len(features)


@app.train()
def train(message: Message, context: Context) -> Message:
    """Train the received model for ``local-epochs`` and send it back."""
    data = _data(context)
    model = _model(message)
    loss = _train(model, data.X("train"), data.y("train"), dict(context.run_config))
    metrics = MetricRecord({"train_loss": loss, "num-examples": data.rows("train")})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Score the received model on the validation rows."""
    data = _data(context)
    scores = task.evaluate(_model(message), data.X("val"), data.y("val"))
    metrics = MetricRecord({"val_loss": scores["loss"], "num-examples": data.rows("val")})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=message)

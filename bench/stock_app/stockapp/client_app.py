"""Quickstart-style ClientApp: train and evaluate the sigmax-fl MLP on one synthetic instance."""

from __future__ import annotations

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


@app.train()
def train(message: Message, context: Context) -> Message:
    """Train the received model for ``local-epochs`` and send it back."""
    data = _data(context)
    model = _model(message)
    loss = task.train(
        model,
        data.X("train"),
        data.y("train"),
        epochs=int(context.run_config["local-epochs"]),
        batch_size=int(context.run_config["batch-size"]),
        learning_rate=float(context.run_config["learning-rate"]),
        seed=int(context.run_config["seed"]),
    )
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

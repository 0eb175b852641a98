"""sigmax-fl ClientApp: one trading instance trains on its own bars and sends only weights.

Raw bars, features, the scaler and trading metrics never leave the instance; a train reply
carries the updated weights, ``train_loss`` and ``num-examples``; an evaluate reply carries the
validation loss, hit rate, IC and rank IC.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from sigmax_fl import secagg, task
from sigmax_fl.data import source_for_node
from sigmax_fl.dataset import InstanceData, Recipe, default_cache_dir, load_instance
from sigmax_fl.model import build_model
from sigmax_fl.privacy import (
    dp_sgd_schedule,
    load_local_accountant,
    save_local_accountant,
    train_dp_sgd,
)
from sigmax_fl.settings import Settings
from sigmax_fl.strategy import EPSILON_KEY, META_KEY, WEIGHT_KEY

# A 15k-parameter MLP gains nothing from intra-op threads, and simulated instances share
# the machine's cores: one thread each avoids oversubscription.
torch.set_num_threads(1)

app = ClientApp()


def _instance(context: Context) -> tuple[Settings, str, InstanceData]:
    settings = Settings.from_run_config(context.run_config)
    source = source_for_node(dict(context.node_config), settings.data_sources, settings.data_dir)
    recipe = Recipe.of(settings)
    return settings, source.instance_id, load_instance(source, recipe)


def _model(settings: Settings, message: Message) -> torch.nn.Module:
    model = build_model(settings.model)
    model.load_state_dict(message.content["arrays"].to_torch_state_dict())
    return model


def _reply(
    message: Message, instance_id: str, metrics: dict, arrays: ArrayRecord | None = None
) -> Message:
    content = RecordDict(
        {"metrics": MetricRecord(metrics), META_KEY: ConfigRecord({"instance-id": instance_id})}
    )
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=message)


@app.train(mods=[secagg.secagg_mod])
def train(message: Message, context: Context) -> Message:
    """Train the received global model for ``local-epochs`` on this instance's training rows."""
    # Load this instance's data (cached) and the global model
    settings, instance_id, data = _instance(context)
    model = _model(settings, message)
    server_round = int(message.content["config"].get("server-round", 0))

    if settings.dp == "local":
        return _train_dp(message, settings, instance_id, data, model)

    # Train locally, seeded by run seed, round and instance, so a rerun is identical
    seed = settings.seed * 1_000_003 + server_round * 7919 + zlib.crc32(instance_id.encode())
    train_loss = task.train(
        model,
        data.X("train"),
        data.y("train"),
        epochs=settings.local_epochs,
        batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        optimizer=settings.optimizer,
        seed=seed,
    )

    # Reply with the weights and the example count the server weighs them by
    metrics = {"train_loss": train_loss, WEIGHT_KEY: data.rows("train")}
    return _reply(message, instance_id, metrics, ArrayRecord(model.state_dict()))


def ledger_path(instance_id: str) -> Path:
    """The instance's DP ledger, on its own disk, kept across rounds and runs."""
    return default_cache_dir().parent / "privacy-ledger" / f"{instance_id}.json"


def _train_dp(
    message: Message,
    settings: Settings,
    instance_id: str,
    data: InstanceData,
    model: torch.nn.Module,
) -> Message:
    """Local DP: DP-SGD on this instance's rows; epsilon per training row, kept on its disk.

    The budget is checked before training, so an instance never spends past
    ``dp-target-epsilon``; it refuses (an error reply) instead. The ledger is saved before the
    reply leaves. No training loss is sent: it is computed from the raw rows, outside epsilon.
    The noise is not seeded from the (public) run seed, so it cannot be regenerated.
    """
    path = ledger_path(instance_id)
    accountant = load_local_accountant(path)
    rows = data.rows("train")
    q, steps = dp_sgd_schedule(rows, settings.batch_size, settings.local_epochs)
    z, delta = settings.dp_noise_multiplier, settings.dp_delta
    target = settings.dp_target_epsilon
    if target and accountant.would_exceed(
        target, delta, steps, noise_multiplier=z, sampling_rate=q
    ):
        raise PrivacyBudgetError(
            f"{instance_id}: this round would take per-row epsilon past dp-target-epsilon "
            f"{target} (now {accountant.epsilon(delta):.4g} at delta {delta}); ledger {path}"
        )
    _, steps, q = train_dp_sgd(
        model,
        data.X("train"),
        data.y("train"),
        epochs=settings.local_epochs,
        batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        clip_norm=settings.dp_clip_norm,
        noise_multiplier=z,
        optimizer=settings.optimizer,
    )
    accountant.step(z, q, steps)
    save_local_accountant(path, accountant)
    metrics = {WEIGHT_KEY: rows, EPSILON_KEY: accountant.epsilon(delta)}
    return _reply(message, instance_id, metrics, ArrayRecord(model.state_dict()))


class PrivacyBudgetError(RuntimeError):
    """The instance's DP budget would be exceeded by one more round."""


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Score the received global model on this instance's validation rows."""
    settings, instance_id, data = _instance(context)
    model = _model(settings, message)
    scores = task.evaluate(model, data.X("val"), data.y("val"))
    metrics = {"val_loss": scores["loss"], WEIGHT_KEY: data.rows("val")}
    # The instance's own trading metrics leave it only if the operator allows it.
    if settings.share_instance_metrics:
        metrics.update(hit_rate=scores["hit_rate"], ic=scores["ic"], rank_ic=scores["rank_ic"])
    return _reply(message, instance_id, metrics)

"""sigmax-fl ClientApp: one trading instance trains on its own bars and sends only weights.

Raw bars, features, the scaler and trading metrics never leave the instance; a train reply
carries the updated weights, ``train_loss`` and ``num-examples``; an evaluate reply carries the
validation loss, hit rate, IC and rank IC (for a volatility target: QLIKE and the correlation of
predicted and realised volatility). With ``scaler = "federated"`` (an opt-in) the instance also
answers one statistics request before round 1: count, sums and centred sums of squares of its
training features (:mod:`sigmax_fl.scaling`).
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from sigmax_fl import codec, kept, personal, scaling, secagg, task
from sigmax_fl.codec import as_numpy
from sigmax_fl.data import simulation_sources, source_for_node
from sigmax_fl.dataset import InstanceData, Recipe, default_cache_dir, load_instance
from sigmax_fl.privacy import (
    dp_sgd_schedule,
    load_local_accountant,
    save_local_accountant,
    train_dp_sgd,
)
from sigmax_fl.settings import ConfigError, Settings
from sigmax_fl.strategy import (
    EPSILON_KEY,
    EVALUATE_RECEIVED_KEY,
    EVALUATION_KEY,
    META_KEY,
    RUN_KEY,
    WEIGHT_KEY,
)
from sigmax_fl.targets import VALIDATION_METRICS

# A 15k-parameter MLP gains nothing from intra-op threads, and simulated instances share
# the machine's cores: one thread each avoids oversubscription.
torch.set_num_threads(1)

app = ClientApp()

log = logging.getLogger(f"flwr.{__name__}")


def _instance(context: Context, message: Message) -> tuple[Settings, str, InstanceData]:
    settings = Settings.from_run_config(context.run_config)
    if key := message.content.config_records.get("config", {}).get(RUN_KEY):
        # What this instance keeps between rounds goes under the run's key, which a resumed
        # run keeps (sigmax_fl.kept)
        settings = replace(settings, run_name=str(key))
    source = source_for_node(dict(context.node_config), settings.data_sources, settings.data_dir)
    recipe = Recipe.of(settings)
    # This instance's own rate, for every training path (plain, DP-SGD, fine-tuning)
    rate = learning_rate(settings, context, source.instance_id)
    settings = replace(settings, learning_rate=rate)
    return settings, source.instance_id, load_instance(source, recipe)


def _federated(settings: Settings, message: Message, data: InstanceData) -> InstanceData:
    """With ``scaler = "federated"``: the data normalised by the pooled statistics sent along."""
    if settings.scaler != "federated":
        return data
    scaler = scaling.from_config(message.content["config"])
    if scaler is None:
        raise ConfigError(
            f"{data.instance_id}: scaler = 'federated' but this {message.metadata.message_type} "
            "message carries no pooled scaler statistics"
        )
    return data.rescaled(scaler)


def learning_rate(settings: Settings, context: Context, instance_id: str) -> float:
    """The instance's step size, the first of three that is set.

    Node config ``learning-rate``, else the instance's entry in run config
    ``instance-learning-rates``, else ``learning-rate``. Instances differ in volatility and
    size, so one rate need not suit all. A value that would be silently ignored is an error:
    a node config that is not a positive number, one that contradicts
    ``instance-learning-rates``, and (in simulation, where the instances are the entries of
    ``data-sources``) a name in ``instance-learning-rates`` that is no instance.
    """
    node_config = context.node_config
    rates = settings.instance_learning_rate_map()
    if rates and "partition-id" in node_config:
        sources = simulation_sources(settings.data_sources, settings.data_dir)
        known = {s.instance_id for s in sources}
        if unknown := sorted(set(rates) - known - {instance_id}):
            raise ConfigError(
                f"run-config 'instance-learning-rates' names {unknown}, which are not instances "
                f"of data-sources {sorted(known)}"
            )
    if "learning-rate" not in node_config:
        return rates.get(instance_id, settings.learning_rate)
    value = node_config["learning-rate"]
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value > 0)
    ):
        raise ConfigError(
            f"node config 'learning-rate' = {value!r} on instance '{instance_id}' (node "
            f"{context.node_id}): expected a positive number"
        )
    if instance_id in rates and rates[instance_id] != value:
        raise ConfigError(
            f"instance '{instance_id}' (node {context.node_id}): node config 'learning-rate' = "
            f"{value!r} contradicts run-config 'instance-learning-rates' = "
            f"{rates[instance_id]!r}; set one of them"
        )
    return float(value)


def _model(
    settings: Settings, message: Message, instance_id: str, context: Context
) -> torch.nn.Module:
    # Copied once out of the message's npy bytes (Flower's to_torch_state_dict parses each
    # header and copies twice)
    arrays = {k: torch.tensor(as_numpy(a)) for k, a in message.content["arrays"].items()}
    # A local head: training round r starts from round r-1's, evaluating r scores round r's
    server_round = int(message.content["config"].get("server-round", 0))
    head_before = server_round + (message.metadata.message_type == MessageType.EVALUATE)
    return personal.received_model(settings, arrays, instance_id, context.run_id, head_before)


def _arrays(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """A state dict as a reply's ArrayRecord: Flower's npy bytes, each written in one copy."""
    return ArrayRecord({k: codec.npy_array(v.detach().cpu().numpy()) for k, v in state.items()})


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
    """Train the received global model for ``local-epochs`` on this instance's training rows.

    With ``evaluate-on-receipt`` the server asks for the received model's validation scores
    too; they are taken before training changes the model.
    """
    # Load this instance's data (cached) and the global model
    settings, instance_id, data = _instance(context, message)
    data = _federated(settings, message, data)
    model = _model(settings, message, instance_id, context)
    server_round = int(message.content["config"].get("server-round", 0))
    scores = None
    if message.content["config"].get(EVALUATE_RECEIVED_KEY, False):
        scores = _scores(settings, model, data, instance_id, context.run_id)

    if settings.dp == "local":
        reply = _train_dp(message, settings, instance_id, data, model, context.run_id)
    else:
        # Train locally, seeded by run seed, round and instance, so a rerun is identical
        seed = settings.seed * 1_000_003 + server_round * 7919 + zlib.crc32(instance_id.encode())
        train_loss = task.train(
            model,
            data.X("train"),
            data.y("train"),
            epochs=settings.local_epochs,
            seed=seed,
            **settings.training_options(),
        )
        # Reply with the weights and the example count the server weighs them by
        metrics = {"train_loss": train_loss, WEIGHT_KEY: data.rows("train")}
        sent = personal.outgoing(settings, model, instance_id, context.run_id, server_round)
        reply = _reply(message, instance_id, metrics, _arrays(sent))
    if scores is not None:
        reply.content[EVALUATION_KEY] = MetricRecord(scores)
    return encoded(reply, message, settings, instance_id, context.run_id)


RESIDUAL = "residual"
"""The error-feedback residual's :mod:`sigmax_fl.kept` kind."""


def encoded(
    reply: Message, message: Message, settings: Settings, instance_id: str, run_id: int
) -> Message:
    """The train reply with its weights as the ``update-encoding`` delta (float32: unchanged).

    The residual the encoding drops is added to this instance's next delta. It is kept on the
    instance's disk, per round (:mod:`sigmax_fl.kept`), not in Flower's ``context.state``:
    a resumed run is a new Flower run, and an unbroken run's instance carries its residual
    into the round after the checkpoint, so a resumed one must too to end with the same model.
    """
    encoding = settings.update_encoding
    if encoding == "float32":
        return reply
    server_round = int(message.content["config"].get("server-round", 0))
    local = {k: as_numpy(a) for k, a in reply.content["arrays"].items()}
    received = {k: as_numpy(a) for k, a in message.content["arrays"].items()}
    found = kept.load(settings, run_id, instance_id, RESIDUAL, before_round=server_round)
    lost = found.missing == "not-kept" or (found.missing == "absent" and settings.resume_from)
    if lost and server_round > 1:
        # not-kept: this instance trained past the checkpoint and no longer has its round.
        # absent in a resumed run: its first round of the run, or its disk lost the folder.
        (log.warning if found.missing == "not-kept" else log.info)(
            "%s: no update-encoding residual from before round %d in %s%s: its error "
            "feedback starts from zero",
            instance_id,
            server_round,
            found.path.parent,
            f" ({found.detail})" if found.detail else "",
        )
    residual = {k: v.numpy() for k, v in (found.tensors or {}).items()} or None
    arrays, left = codec.encode_update(local, received, encoding, residual)
    tensors = {k: torch.from_numpy(v) for k, v in left.items()}
    kept.save(settings, run_id, instance_id, RESIDUAL, tensors, server_round)
    reply.content["arrays"] = arrays
    reply.content[META_KEY][codec.ENCODING_KEY] = encoding
    return reply


def ledger_path(instance_id: str) -> Path:
    """The instance's DP ledger, on its own disk, kept across rounds and runs."""
    return default_cache_dir().parent / "privacy-ledger" / f"{instance_id}.json"


def _train_dp(
    message: Message,
    settings: Settings,
    instance_id: str,
    data: InstanceData,
    model: torch.nn.Module,
    run_id: int,
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
    server_round = int(message.content["config"].get("server-round", 0))
    sent = personal.outgoing(settings, model, instance_id, run_id, server_round)
    return _reply(message, instance_id, metrics, _arrays(sent))


class PrivacyBudgetError(RuntimeError):
    """The instance's DP budget would be exceeded by one more round."""


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Score the received global model (or this instance's personalised one) on its val rows."""
    settings, instance_id, data = _instance(context, message)
    data = _federated(settings, message, data)
    model = _model(settings, message, instance_id, context)
    return _reply(message, instance_id, _scores(settings, model, data, instance_id, context.run_id))


def _scores(
    settings: Settings, model: torch.nn.Module, data: InstanceData, instance_id: str, run_id: int
) -> dict[str, float | int]:
    """The validation scores an instance sends for a received model; ``model`` is unchanged."""
    model = personal.evaluated_model(settings, model, data, instance_id, run_id)
    scores = task.evaluate(model, data.X("val"), data.y("val"), target=settings.target)
    metrics = {"val_loss": scores["loss"], WEIGHT_KEY: data.rows("val")}
    # The instance's own trading metrics leave it only if the operator allows it.
    if settings.share_instance_metrics:
        metrics.update({name: scores[name] for name in VALIDATION_METRICS[settings.target]})
    return metrics


@app.query("instance_id")
def which_instance(message: Message, context: Context) -> Message:
    """Which instance this SuperNode serves, so that the server samples over instances.

    Node ids change when a SuperLink restarts; instance ids do not. Nothing is loaded.
    """
    settings = Settings.from_run_config(context.run_config)
    source = source_for_node(dict(context.node_config), settings.data_sources, settings.data_dir)
    meta = ConfigRecord({"instance-id": source.instance_id})
    return Message(content=RecordDict({META_KEY: meta}), reply_to=message)


@app.query("scaler_statistics")
def scaler_statistics(message: Message, context: Context) -> Message:
    """``scaler = "federated"``, before round 1: this instance's training-row moments.

    Count, per-feature sum and per-feature sum of squared deviations of the training rows'
    unscaled features; no rows, no other split. Refused unless the run opted in.
    """
    settings, instance_id, data = _instance(context, message)
    if settings.scaler != "federated":
        raise ConfigError(
            f"{instance_id}: scaler statistics requested, but run-config 'scaler' = "
            f"'{settings.scaler}'; an instance shares them only with scaler = 'federated'"
        )
    return scaling.reply(message, instance_id, scaling.Moments.of(data.raw("train")))

"""Attacks, measured: one hostile instance against the app's default defences.

A federation of synthetic instances with a planted signal of known R^2 learns for a few
rounds; in each scenario one instance (always the same one) tampers with every train reply:
NaN weights, weights scaled by 1e6, a sign-flipped update scaled by 100, weights of another
architecture, or an inflated ``num-examples``. The final global model is scored on the honest
instances' test splits (pooled) and compared with the clean run's model on the same rows, and
with a run in which the attacker's instance is absent altogether. One more attacker goes
beyond that list: it flips its update but scales it only 2.5 x (under the adaptive norm
bound) and claims 10 x its rows (under ``max-examples-per-node``); ``--with-fixes`` also runs
it against candidate settings and measures what those settings cost a clean federation.

What runs is the app itself, minus the network. :func:`sigmax_fl.server_app.main` (the real
round loop, :class:`~sigmax_fl.strategy.WeightedFedAvg` with ``Settings().defences()``, the
history, checkpoints and ``audit.jsonl``) drives an in-process :class:`LoopbackGrid`, which
hands each message, serialised to Flower's wire format and back, to the real
``sigmax_fl.client_app.app`` of that node (its data loading and ``task.train``). The attacker
is a ``ClientApp`` that runs the same handlers and then rewrites its train reply. Nothing in
the app knows it is being attacked, and no setting differs from the defaults except the data,
the number of rounds and local epochs.

``python -m sigmax_fl.attacks`` (``make attacks``) prints the table and writes
``outputs/attacks/attacks.md`` and ``attacks.json``; each scenario's run folder (history,
audit log, final model) and its Flower log are kept under ``outputs/attacks/runs``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from sigmax_fl import client_app, metrics, runs, server_app, task
from sigmax_fl.data import parse_sources, synthetic
from sigmax_fl.dataset import Recipe, load_instance
from sigmax_fl.model import NUM_FEATURES, TradingModel, build_model
from sigmax_fl.settings import Settings
from sigmax_fl.strategy import META_KEY, WEIGHT_KEY

log = logging.getLogger(__name__)

KEPT_REQUIRED = 0.90
"""The criterion: the attacked model keeps at least this share of the clean R^2 and IC."""

# ---------------------------------------------------------------------------------------------
# The attacks: each rewrites an honest train reply


BOOST = 2.5
"""Scale of the adaptive attacker's flipped update: inside the default norm bound (3 x)."""

Tamper = Callable[[dict[str, np.ndarray], dict[str, np.ndarray], int], tuple[dict, int]]
"""(honest weights w_k, global weights w_g, honest num-examples) -> (weights sent, claimed)."""


def _nan(w: dict, g: dict, n: int) -> tuple[dict, int]:
    del g
    return {k: np.full_like(v, np.nan) for k, v in w.items()}, n


def _scaled(w: dict, g: dict, n: int) -> tuple[dict, int]:
    del g
    return {k: v * np.float32(1e6) for k, v in w.items()}, n


def _sign_flip(w: dict, g: dict, n: int) -> tuple[dict, int]:
    return {k: (g[k] - np.float32(100) * (v - g[k])).astype(v.dtype) for k, v in w.items()}, n


def _other_architecture(w: dict, g: dict, n: int) -> tuple[dict, int]:
    del w, g
    # A wider MLP (50-256-128-1): the same array names, other shapes, e.g. an instance
    # still running another model version.
    wider = TradingModel(hidden=(256, 128))
    return {k: v.detach().numpy().copy() for k, v in wider.state_dict().items()}, n


def _renamed_architecture(w: dict, g: dict, n: int) -> tuple[dict, int]:
    del w, g
    linear = torch.nn.Linear(NUM_FEATURES, 1)
    return {f"linear.{k}": v.detach().numpy().copy() for k, v in linear.state_dict().items()}, n


def _boosted_flip(w: dict, g: dict, n: int) -> tuple[dict, int]:
    # Flipped and scaled by 2.5, under the adaptive bound of 3 x the median norm, and a
    # claimed 10 x the rows, under max-examples-per-node: every default lets it through.
    flipped = {k: (g[k] - np.float32(BOOST) * (v - g[k])).astype(v.dtype) for k, v in w.items()}
    return flipped, n * 10


def claims(claim: Callable[[int], int]) -> Tamper:
    """Honest weights, with ``num-examples`` replaced by ``claim(true count)``."""

    def tamper(w: dict, g: dict, n: int) -> tuple[dict, int]:
        del g
        return w, claim(n)

    return tamper


@dataclass(frozen=True)
class Attack:
    """One hostile behaviour and the defence expected to stop or bound it."""

    name: str
    description: str
    expected: str
    """Key of :data:`DEFENCES` that should act on every one of the attacker's replies."""
    tamper: Tamper | None
    absent: bool = False
    """The attacker's node is left out of the federation altogether (a reference)."""
    adaptive: bool = False
    """Beyond the issue's list: an attacker that stays just inside the default bounds."""
    settings: dict[str, Any] = field(default_factory=dict)
    """Run-config keys set differently from the defaults (a candidate fix), else none."""


DEFENCES = {
    "none": "none needed",
    "non-finite": "screening: NaN/Inf weights",
    "norm-bound": "adaptive update-norm bound (3 x median)",
    "architecture": "screening: array names/shapes",
    "plausibility": "max-examples-per-node (1e7)",
    "weight-cap": "max-weight-share",
    "robust-aggregation": "aggregation rule",
}

ATTACKS: dict[str, Attack] = {
    a.name: a
    for a in (
        Attack("clean", "no attacker (reference)", "none", None),
        Attack(
            "absent",
            "the attacker's instance not in the federation (reference)",
            "none",
            None,
            absent=True,
        ),
        Attack("nan", "NaN weights (every value)", "non-finite", _nan),
        Attack("scaled-1e6", "weights scaled by 1e6", "norm-bound", _scaled),
        Attack(
            "sign-flip-100",
            "sign-flipped update x100: w_g - 100 (w_k - w_g)",
            "norm-bound",
            _sign_flip,
        ),
        Attack(
            "other-architecture",
            "weights of a 50-256-128-1 MLP (same names, other shapes)",
            "architecture",
            _other_architecture,
        ),
        Attack(
            "renamed-architecture",
            "weights of a linear model (other names)",
            "architecture",
            _renamed_architecture,
        ),
        Attack(
            "num-examples-1e9",
            "honest weights, num-examples = 1e9",
            "plausibility",
            claims(lambda n: 10**9),
        ),
        Attack(
            "num-examples-10x",
            "honest weights, num-examples x 10",
            "weight-cap",
            claims(lambda n: 10 * n),
        ),
        Attack(
            "boosted-flip",
            f"sign-flipped update x{BOOST} (under the norm bound) and num-examples x 10",
            "weight-cap",
            _boosted_flip,
            adaptive=True,
        ),
        Attack(
            "boosted-flip-cap-0.2",
            "the same, against max-weight-share = 0.2",
            "weight-cap",
            _boosted_flip,
            adaptive=True,
            settings={"max-weight-share": 0.2},
        ),
        Attack(
            "boosted-flip-trimmed-mean",
            "the same, against aggregation = trimmed-mean",
            "robust-aggregation",
            _boosted_flip,
            adaptive=True,
            settings={"aggregation": "trimmed-mean"},
        ),
        Attack(
            "boosted-flip-median",
            "the same, against aggregation = median",
            "robust-aggregation",
            _boosted_flip,
            adaptive=True,
            settings={"aggregation": "median"},
        ),
        Attack(
            "clean-cap-0.2",
            "no attacker, max-weight-share = 0.2 (what the fix costs)",
            "none",
            None,
            adaptive=True,
            settings={"max-weight-share": 0.2},
        ),
        Attack(
            "clean-trimmed-mean",
            "no attacker, aggregation = trimmed-mean (what the fix costs)",
            "none",
            None,
            adaptive=True,
            settings={"aggregation": "trimmed-mean"},
        ),
        Attack(
            "clean-median",
            "no attacker, aggregation = median (what the fix costs)",
            "none",
            None,
            adaptive=True,
            settings={"aggregation": "median"},
        ),
    )
}
DEFAULT_ATTACKS = tuple(
    name for name, a in ATTACKS.items() if name != "clean" and (not a.adaptive or not a.settings)
)
"""What ``make attacks`` runs: every attack on the default settings (the candidate fixes
of the adaptive attack are opt-in: ``--attacks boosted-flip-trimmed-mean,...``)."""


# ---------------------------------------------------------------------------------------------
# An in-process Grid: Flower's messages and ClientApps, no network


def _over_the_wire(message: Message) -> Message:
    """The message as the other side decodes it from Flower's protobuf bytes."""
    return message_from_proto(
        ProtoMessage.FromString(message_to_proto(message).SerializeToString())
    )


class LoopbackGrid(Grid):
    """A Grid whose nodes are ClientApps called in this process, one message at a time.

    Each node has its own :class:`Context` (node config, persistent state) as a SuperNode
    would. A ClientApp that raises becomes an error reply, as Flower's runtime makes it.
    """

    def __init__(self, nodes: dict[int, tuple[ClientApp, Context]], run_id: int) -> None:
        self.nodes = nodes
        self._run = Run.create_empty(run_id)
        self._pending: dict[str, Message] = {}
        self.last_train_replies: list[Message] = []
        """The replies of the latest train round, as the server received them."""

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self._pending[message.metadata.message_id] = _over_the_wire(message)
            ids.append(message.metadata.message_id)
        return ids

    def _deliver(self, message: Message) -> Message:
        app, context = self.nodes[message.metadata.dst_node_id]
        try:
            reply = app(message, context)
        except Exception as err:  # as Flower's ClientApp runtime does
            reason = f"{type(err)}:<'{err}'>"
            reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=message)
        return _over_the_wire(reply)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._deliver(self._pending.pop(i)) for i in message_ids if i in self._pending]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        del timeout  # every node answers at once here
        messages = list(messages)
        replies = list(self.pull_messages(self.push_messages(messages)))
        if messages and messages[0].metadata.message_type == MessageType.TRAIN:
            self.last_train_replies = replies
        return replies


def attacker_app(attack: Attack) -> ClientApp:
    """A ClientApp that trains and evaluates like the app, then rewrites its train reply."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        honest = client_app.app(message, context)
        if attack.tamper is None:
            return honest
        sent = {k: a.numpy() for k, a in message.content["arrays"].items()}
        weights = {k: a.numpy() for k, a in honest.content["arrays"].items()}
        reply_metrics = dict(honest.content["metrics"])
        arrays, claimed = attack.tamper(weights, sent, int(reply_metrics[WEIGHT_KEY]))
        content = RecordDict(
            {
                "metrics": MetricRecord({**reply_metrics, WEIGHT_KEY: claimed}),
                META_KEY: honest.content[META_KEY],
                "arrays": ArrayRecord(
                    {k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}
                ),
            }
        )
        return Message(content=content, reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return client_app.app(message, context)

    return app


# ---------------------------------------------------------------------------------------------
# One scenario


@dataclass(frozen=True)
class Setup:
    """The federation every scenario trains; defences are always ``Settings()``'s."""

    instances: int = 10
    signal: float = 0.2
    bar: str = "1h"
    seed: int = 1
    start: str = "2017-01-01"
    end: str = "2019-12-31"
    train_end: str = "2018-09-30"
    val_end: str = "2019-03-31"
    rounds: int = 5
    local_epochs: int = 1
    attacker: int = 3
    """Index of the instance that turns hostile."""

    @property
    def data_sources(self) -> str:
        return (
            f"synthetic:{self.instances}:seed={self.seed}:signal={self.signal}:bar={self.bar}"
            f":start={self.start}:end={self.end}"
        )

    def run_config(self, outputs_dir: Path, run_name: str) -> dict[str, Any]:
        """Run-config overrides: data, rounds, epochs, outputs; everything else default."""
        return {
            "data-sources": self.data_sources,
            "train-end": self.train_end,
            "val-end": self.val_end,
            "num-server-rounds": self.rounds,
            "local-epochs": self.local_epochs,
            "min-available-nodes": self.instances,
            "outputs-dir": str(outputs_dir),
            "run-name": run_name,
        }


@dataclass
class Scenario:
    """What one run produced: the final model's test predictions and the audit log."""

    attack: str
    seconds: float
    model_sha: str
    instance_ids: list[str]
    test_pred: dict[str, np.ndarray] = field(repr=False)
    test_y: dict[str, np.ndarray] = field(repr=False)
    audit: list[dict[str, Any]] = field(repr=False)
    undefended_pred: dict[str, np.ndarray] = field(repr=False)
    """Test predictions of stock Flower FedAvg's average of the last round's replies."""
    undefended_error: str = ""
    """Why stock FedAvg could not average them (then ``undefended_pred`` is empty)."""
    run_dir: str = ""


@contextlib.contextmanager
def _flower_log_to(path: Path) -> Iterator[None]:
    """Flower's log (the app's rejections included) into ``path`` instead of the console."""
    flwr_log = logging.getLogger("flwr")
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    consoles = [h for h in flwr_log.handlers if isinstance(h, logging.StreamHandler)]
    levels = [h.level for h in consoles]
    for h in consoles:
        h.setLevel(logging.ERROR)
    previous = flwr_log.level, flwr_log.propagate
    flwr_log.setLevel(logging.INFO)
    flwr_log.propagate = False
    flwr_log.addHandler(handler)
    try:
        yield
    finally:
        flwr_log.removeHandler(handler)
        handler.close()
        flwr_log.level, flwr_log.propagate = previous
        for h, level in zip(consoles, levels, strict=True):
            h.setLevel(level)


def node_ids(count: int) -> list[int]:
    """Node ids like a SuperLink's: random 63-bit integers, not in partition order."""
    rng = np.random.default_rng(20240601)
    return [int(x) for x in rng.integers(2**32, 2**63 - 1, size=count)]


def simulated_nodes(
    run_config: Mapping[str, Any],
    run_id: int,
    instances: int,
    apps: Mapping[int, ClientApp | None] | None = None,
) -> dict[int, tuple[ClientApp, Context]]:
    """The nodes of a :class:`LoopbackGrid` federation, each as Flower's simulation makes it.

    Node k (in :func:`node_ids` order) holds simulation partition k of ``instances``, its own
    persistent state and a copy of the run config. It runs the app's ClientApp unless ``apps``
    gives partition k another one, or None: that node is absent.
    """
    nodes: dict[int, tuple[ClientApp, Context]] = {}
    for partition, node_id in enumerate(node_ids(instances)):
        app = (apps or {}).get(partition, client_app.app)
        if app is None:
            continue
        context = Context(
            run_id=run_id,
            node_id=node_id,
            node_config={"partition-id": partition, "num-partitions": instances},
            state=RecordDict(),
            run_config=dict(run_config),
        )
        nodes[node_id] = (app, context)
    return nodes


def run_server_app(grid: LoopbackGrid, run_config: Mapping[str, Any]) -> None:
    """The app's ServerApp over ``grid``, started as Flower's runtime starts it for the run."""
    run_id = grid.run.run_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SUPERLINK_NODE_ID, 1
    server_app.main(grid, Context(run_id, SUPERLINK_NODE_ID, {}, RecordDict(), dict(run_config)))


def run_scenario(setup: Setup, attack_name: str, out_dir: Path) -> Scenario:
    """Run the app's ServerApp over a loopback grid with one hostile node; score the model."""
    attack = ATTACKS[attack_name]
    torch.set_num_threads(1)
    run_id = 1000 + list(ATTACKS).index(attack_name)
    runs_dir = out_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(runs_dir / attack_name, ignore_errors=True)
    run_config = {**setup.run_config(runs_dir, attack_name), **attack.settings}
    if attack.absent:
        run_config["min-available-nodes"] = setup.instances - 1

    apps: dict[int, ClientApp | None] = {}
    if attack.absent:
        apps[setup.attacker] = None
    elif attack.tamper is not None:
        apps[setup.attacker] = attacker_app(attack)
    grid = LoopbackGrid(simulated_nodes(run_config, run_id, setup.instances, apps), run_id)

    started = time.monotonic()
    with _flower_log_to(runs_dir / f"{attack_name}.log"):
        run_server_app(grid, run_config)
        seconds = time.monotonic() - started
        undefended = stock_fedavg(setup.rounds, grid.last_train_replies)

    run_dir = runs_dir / attack_name
    state = torch.load(run_dir / runs.FINAL_MODEL, weights_only=True)
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode() + state[name].numpy().tobytes())
    settings = Settings.from_run_config(run_config)
    model = build_model(settings.model)
    model.load_state_dict(state)
    undefended_model = None
    if isinstance(undefended, dict):
        undefended_model = build_model(settings.model)
        try:
            undefended_model.load_state_dict(
                {k: torch.from_numpy(np.array(v)) for k, v in undefended.items()}
            )
        except RuntimeError as err:
            undefended, undefended_model = f"unusable average: {err}".splitlines()[0], None
    recipe = Recipe.of(settings)
    preds, ys, ids, undefended_pred = {}, {}, [], {}
    for source in parse_sources(settings.data_sources, settings.data_dir):
        data = load_instance(source, recipe)
        ids.append(source.instance_id)
        preds[source.instance_id] = task.predict(model, data.X("test"))
        ys[source.instance_id] = data.y("test").astype(np.float64)
        if undefended_model is not None:
            undefended_pred[source.instance_id] = task.predict(undefended_model, data.X("test"))
    audit = [json.loads(line) for line in (run_dir / runs.AUDIT_JSONL).read_text().splitlines()]
    return Scenario(
        attack_name,
        seconds,
        digest.hexdigest()[:16],
        ids,
        preds,
        ys,
        audit,
        undefended_pred,
        "" if isinstance(undefended, dict) else undefended,
        str(run_dir),
    )


def stock_fedavg(server_round: int, replies: list[Message]) -> dict[str, np.ndarray] | str:
    """What Flower's stock FedAvg makes of the same replies: the model, or its error."""
    try:
        arrays, _ = FedAvg().aggregate_train(server_round, replies)
    except Exception as err:  # the failure is the measurement
        return f"round fails: {type(err).__name__}"
    if arrays is None:
        return "round fails: no replies"
    return {k: a.numpy() for k, a in arrays.items()}


# ---------------------------------------------------------------------------------------------
# Scoring and the table


def pooled(
    scenario: Scenario, instance_ids: Sequence[str], undefended: bool = False
) -> dict[str, float]:
    """Test R^2 (vs predicting zero) and IC over the given instances' test rows, pooled."""
    source = scenario.undefended_pred if undefended else scenario.test_pred
    pred = np.concatenate([source[i] for i in instance_ids])
    y = np.concatenate([scenario.test_y[i] for i in instance_ids])
    return {"r2": metrics.r2_oos(pred, y), "ic": metrics.ic(pred, y)}


def caught_by(audit: Sequence[dict[str, Any]], instance_id: str) -> dict[str, Any]:
    """What the audit log says happened to one instance's replies, round by round."""
    lines = [a for a in audit if a["instance_id"] == instance_id]
    reasons = [a["reason"] for a in lines if a["decision"] == "rejected"]
    kinds = set()
    for reason in reasons:
        if "NaN or Inf" in reason:
            kinds.add("non-finite")
        elif "update norm" in reason:
            kinds.add("norm-bound")
        elif "array names differ" in reason or reason.startswith("array '"):
            kinds.add("architecture")
        elif "max-examples-per-node" in reason:
            kinds.add("plausibility")
        else:
            kinds.add(reason)
    return {
        "rounds": len(lines),
        "rejected": len(reasons),
        "kinds": sorted(kinds),
        "first_reason": reasons[0] if reasons else "",
        "weights": [a["weight"] for a in lines],
        "num_examples": [a["num_examples"] for a in lines],
    }


def score(setup: Setup, scenarios: dict[str, Scenario]) -> dict[str, Any]:
    """The table's rows: each attack next to the clean run on the same honest rows."""
    clean = scenarios["clean"]
    ids = clean.instance_ids
    attacker = ids[setup.attacker]
    honest = [i for i in ids if i != attacker]
    reference = pooled(clean, honest)
    clean_rejections = sum(a["decision"] == "rejected" for a in clean.audit)
    rows = []
    for name, scenario in scenarios.items():
        attack = ATTACKS[name]
        got = pooled(scenario, honest)
        verdict = caught_by(scenario.audit, attacker)
        honest_rejected = sum(
            a["decision"] == "rejected" for a in scenario.audit if a["instance_id"] != attacker
        )
        if attack.expected == "weight-cap":
            n = verdict["num_examples"]
            honest_n = [a["num_examples"] for a in scenario.audit if a["instance_id"] != attacker]
            per_round = len(honest_n) // max(verdict["rounds"], 1)
            raw_share = n[0] / (n[0] + sum(honest_n[:per_round])) if n and per_round else math.nan
            acted = (
                verdict["rejected"] == 0
                and bool(verdict["weights"])
                and all(w < raw_share - 1e-9 for w in verdict["weights"])
            )
            defence = (
                f"{DEFENCES['weight-cap']} "
                f"({attack.settings.get('max-weight-share', Settings().max_weight_share)}): "
                f"share {raw_share:.3f} -> "
                f"{max(verdict['weights'], default=math.nan):.3f}"
                if acted
                else f"NOT bounded (share {raw_share:.3f})"
            )
        elif attack.expected == "none":
            acted = honest_rejected == 0 and (verdict["rounds"] == 0) == attack.absent
            defence = DEFENCES["none"]
        elif attack.expected == "robust-aggregation":
            # Nothing in the audit shows it: the rule outvotes the attacker or it does not.
            acted = True
            accepted = verdict["rounds"] - verdict["rejected"]
            defence = (
                f"aggregation = {attack.settings.get('aggregation')} (attacker accepted "
                f"{accepted}/{verdict['rounds']})"
            )
        else:
            acted = verdict["rejected"] == verdict["rounds"] == setup.rounds and verdict[
                "kinds"
            ] == [attack.expected]
            defence = (
                f"{DEFENCES[attack.expected]}: rejected {verdict['rejected']}/{verdict['rounds']}"
                if acted
                else f"NOT caught as expected ({verdict['kinds']}, "
                f"{verdict['rejected']}/{verdict['rounds']} rejected)"
            )
        kept_r2 = got["r2"] / reference["r2"] if reference["r2"] > 0 else math.nan
        kept_ic = got["ic"] / reference["ic"] if reference["ic"] > 0 else math.nan
        if scenario.undefended_error:
            stock = {"r2": math.nan, "ic": math.nan, "error": scenario.undefended_error}
        else:
            stock = {**pooled(scenario, honest, undefended=True), "error": ""}
        rows.append(
            {
                "attack": name,
                "description": attack.description,
                "adaptive": attack.adaptive,
                "settings": attack.settings,
                "expected_defence": attack.expected,
                "defence": defence,
                "defence_acted": acted,
                "attacker_rejected": verdict["rejected"],
                "attacker_rounds": verdict["rounds"],
                "first_reason": verdict["first_reason"],
                "attacker_weights": verdict["weights"],
                "honest_rejected": honest_rejected,
                "r2": got["r2"],
                "ic": got["ic"],
                "r2_kept": kept_r2,
                "ic_kept": kept_ic,
                "passed": bool(
                    acted
                    and honest_rejected == 0
                    and kept_r2 >= KEPT_REQUIRED
                    and kept_ic >= KEPT_REQUIRED
                ),
                "stock_fedavg_last_round": stock,
                "model_sha256_16": scenario.model_sha,
                "seconds": round(scenario.seconds, 1),
            }
        )
    absent = [r["model_sha256_16"] for r in rows if r["attack"] == "absent"]
    spec, _ = synthetic.parse_spec(setup.data_sources)
    true_r2 = [synthetic.generate(spec, i).true_r2 for i in range(setup.instances)]
    return {
        "setup": asdict(setup),
        "data_sources": setup.data_sources,
        "attacker": attacker,
        "honest_instances": honest,
        "clean": {**reference, "planted_true_r2_mean": float(np.mean(true_r2))},
        "clean_rejections": clean_rejections,
        "criterion": f"R^2 and IC kept >= {KEPT_REQUIRED:.0%} of the clean run's",
        "defaults": Settings().defences().__dict__,
        "rows": rows,
        "absent_sha": absent[0] if absent else "",
        "all_passed": all(r["passed"] for r in rows if not r["adaptive"]),
    }


def _table_rows(rows: Sequence[dict[str, Any]], with_settings: bool) -> list[str]:
    out = []
    for r in rows:
        stock = r["stock_fedavg_last_round"]
        undefended = stock["error"] or f"{_num(stock['r2'])} / {_num(stock['ic'])}"
        settings = ", ".join(f"{k} = {v}" for k, v in r["settings"].items()) or "defaults"
        out.append(
            f"| {r['attack']}: {r['description']} | "
            + (f"{settings} | " if with_settings else "")
            + f"{r['defence']} | {_num(r['r2'])} | {_pct(r['r2_kept'])} | {_num(r['ic'])} | "
            f"{_pct(r['ic_kept'])} | {'yes' if r['passed'] else '**NO**'} | {undefended} |"
        )
    return out


def render_markdown(result: dict[str, Any]) -> str:
    """The table (attack, defence that caught it, R^2 kept, IC kept) and the set-up."""
    clean = result["clean"]
    header = "test R² | R² kept | test IC | IC kept | pass | stock FedAvg, last round: R² / IC |"
    lines = [
        f"| attack | defence that caught it | {header}",
        "|---|---|---:|---:|---:|---:|:---:|---|",
        *_table_rows([r for r in result["rows"] if not r["adaptive"]], with_settings=False),
    ]
    same = [
        r["attack"]
        for r in result["rows"]
        if r["model_sha256_16"] == result["absent_sha"] and r["attack"] != "absent"
    ]
    s = result["setup"]
    lines += [
        "",
        f"Data: `{result['data_sources']}` (train to {s['train_end']}, validation to "
        f"{s['val_end']}, test after), {s['rounds']} rounds x {s['local_epochs']} local "
        f"epoch(s); the attacker is `{result['attacker']}` in every scenario. Test R² and IC "
        f"are pooled over the {len(result['honest_instances'])} honest instances' test rows; "
        f"the clean run reaches R² {clean['r2']:.4f} and IC {clean['ic']:.4f} there (planted "
        f"R² {clean['planted_true_r2_mean']:.4f}). Defences: `Settings()` defaults "
        f"({', '.join(f'{k}={v}' for k, v in result['defaults'].items())}).",
        "",
        f"Criterion: {result['criterion']}, the attacker's replies stopped (or bounded) by the "
        "expected defence in every round, and no honest reply rejected. "
        f"All passed: **{'yes' if result['all_passed'] else 'NO'}**.",
        "",
        (
            f"Final model bit-identical to the `absent` run's (sha256 {result['absent_sha']}), "
            f"i.e. exactly what the honest instances make without the attacker: "
            f"{', '.join(same) or 'none'}."
            if result["absent_sha"]
            else ""
        ),
        "",
        "Last column: Flower's stock `FedAvg.aggregate_train` on the same last-round replies "
        "(what one round without screening, caps or bounds would have made of them).",
    ]
    adaptive = [r for r in result["rows"] if r["adaptive"]]
    if adaptive:
        lines += [
            "",
            "Beyond the list: an adaptive attacker that stays inside every default bound "
            "(not part of the pass/fail above).",
            "",
            f"| attack | settings | defence that acted | {header}",
            "|---|---|---|---:|---:|---:|---:|:---:|---|",
            *_table_rows(adaptive, with_settings=True),
        ]
    return "\n".join(lines) + "\n"


def _pct(x: float) -> str:
    if not math.isfinite(x):
        return "n/a"
    return f"{x:.1%}" if x > -10 else "< -1000%"


def _num(x: float) -> str:
    if not math.isfinite(x):
        return "NaN" if math.isnan(x) else str(x)
    return f"{x:.4f}" if abs(x) < 1e4 else f"{x:.3g}"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _worker_init() -> None:
    torch.set_num_threads(1)


def run_all(
    setup: Setup, attacks: Sequence[str], out_dir: Path, workers: int = 1
) -> dict[str, Any]:
    """Run the clean reference and every attack (``workers`` processes), then score."""
    names = ["clean", *[a for a in attacks if a != "clean"]]
    unknown = sorted(set(names) - set(ATTACKS))
    if unknown:
        raise ValueError(f"unknown attack(s) {unknown}; known: {sorted(ATTACKS)}")
    # Build every instance's features once, before the workers read the cache.
    settings = Settings.from_run_config(setup.run_config(out_dir, "warm-up"))
    recipe = Recipe.of(settings)
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    with _flower_log_to(out_dir / "runs" / "data.log"):
        for source in parse_sources(settings.data_sources):
            load_instance(source, recipe)
    if workers <= 1:
        scenarios = {name: run_scenario(setup, name, out_dir) for name in names}
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=context, initializer=_worker_init
        ) as pool:
            futures = {name: pool.submit(run_scenario, setup, name, out_dir) for name in names}
            scenarios = {name: future.result() for name, future in futures.items()}
    return score(setup, scenarios)


def write_outputs(result: dict[str, Any], out_dir: Path) -> None:
    """``attacks.md`` (the table) and ``attacks.json`` (every figure) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "attacks.md").write_text(render_markdown(result))
    (out_dir / "attacks.json").write_text(json.dumps(_json_safe(result), indent=1))


def main(argv: list[str] | None = None) -> int:
    """Run the attacks, print and write the table; exit 1 if any criterion failed."""
    defaults = Setup()
    parser = argparse.ArgumentParser(prog="python -m sigmax_fl.attacks", description=__doc__)
    parser.add_argument("--instances", type=int, default=defaults.instances)
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--local-epochs", type=int, default=defaults.local_epochs)
    parser.add_argument("--signal", type=float, default=defaults.signal)
    parser.add_argument("--bar", default=defaults.bar, choices=sorted(synthetic.PRESETS))
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--attacker", type=int, default=defaults.attacker)
    parser.add_argument(
        "--attacks",
        default=",".join(DEFAULT_ATTACKS),
        help=f"comma-separated, from {', '.join(ATTACKS)}",
    )
    parser.add_argument(
        "--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes"
    )
    parser.add_argument(
        "--out", type=Path, default=runs.outputs_root() / "attacks", help="output folder"
    )
    parser.add_argument(
        "--with-fixes",
        action="store_true",
        help="also run the adaptive attack against candidate fixes, and their clean cost",
    )
    args = parser.parse_args(argv)
    names = [a for a in args.attacks.split(",") if a]
    if args.with_fixes:
        names += [n for n, a in ATTACKS.items() if a.adaptive and n not in names]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    setup = replace(
        defaults,
        instances=args.instances,
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        signal=args.signal,
        bar=args.bar,
        seed=args.seed,
        attacker=args.attacker,
    )
    started = time.monotonic()
    result = run_all(setup, names, args.out, args.workers)
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    write_outputs(result, args.out)
    print(render_markdown(result))
    print(f"wall time {result['wall_seconds']} s; written to {args.out}/attacks.md and .json")
    return 0 if result["all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Secure aggregation (SecAgg+) for sigmax-fl: the server learns the weighted mean, not the updates.

With ``secure-aggregation = true`` the ServerApp runs Flower's legacy path, the only one that has
SecAgg+ in Flower 1.42: :class:`flwr.server.LegacyContext` +
``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))``. One round:

1. The server samples the instances and sends the global model ``g`` (legacy FitIns).
2. Each instance trains with the app's own ``@app.train`` function (reached through
   :func:`secagg_mod`, so training is exactly the normal path's), then checks its own update
   before anything leaves it, because the server can no longer screen individual replies:
   ``u_k = w_k - g`` must be finite, ``num-examples`` must be in ``[1, max-examples-per-node]``,
   and ``||u_k||_2`` is clipped on the instance to ``secagg-clip-norm`` (B). An instance that
   fails a check raises: its error reply is a dropout for SecAgg+, which removes its masks.
3. Flower's ``secaggplus_mod`` scales ``u_k`` by ``b_k = round(n_k / M * T) / T`` (``M``, Flower's
   ``max_weight``, is ``max-examples-per-node``), quantises it and masks it. The server adds the
   masked vectors and the masked ``q_k = T b_k`` and removes the masks: it gets only
   ``r = sum_k b_k u_k / sum_k b_k``, the weighted mean update, and sets ``g' = g + r``.

Quantisation bound (per coordinate, N updates, ``q = sum_k q_k``). Flower clips each coordinate to
``[-C, C]`` (``clipping_range``) and rounds it stochastically onto ``T`` (``quantization_range``)
levels. Here ``C = B``: since ``|b_k u_k,i| <= ||u_k|| <= B``, nothing is ever clipped. What is
left is rounding, at most one level ``2C / T`` per update and coordinate, divided by
``sum b_k = q / T``; and the weights ``b_k`` differing from ``n_k / M`` by at most ``1 / (2T)``,
which moves the mean by at most ``sum_k |b_k - n_k/M| |u_k,i - m_i| / sum b_k <= N B / q``. So

    |r_i - m_i| < N (2C + B) / q  (= 3 N B / q),  m = sum_k n_k u_k / sum_k n_k,

plus float64 rounding (:func:`error_bound`). ``T`` is chosen as large as the protocol's
arithmetic allows: the sum of N quantised vectors must stay below the modulus ``2**32`` and each
one must fit Flower's int32, so ``T = min(2**31 - 1, (2**32 - 1) // N)``, per round from the
number of sampled instances. With ``q ~ T sum_k n_k / M`` the bound is ``3 N B M / (T sum n_k)``:
a ``max-examples-per-node`` close to the largest real row count keeps it small.

The ClientApp needs no second component: Flower applies a function-level mod to the Message-API
``@app.train`` function, and :func:`secagg_mod` sends the SecAgg+ messages (they carry a
``secaggplus_configs`` ConfigRecord) through ``secaggplus_mod`` with an adapter from legacy FitIns
to the app's train message and back; every other message goes through untouched. Evaluation is
the normal Message-API evaluation (:class:`~sigmax_fl.strategy.WeightedFedAvg`), run by
DefaultWorkflow after each round as its ``evaluate_workflow``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from sigmax_fl import exchange, runs
from sigmax_fl.model import build_model
from sigmax_fl.strategy import (
    EPSILON_KEY,
    META_KEY,
    WEIGHT_KEY,
    NotEnoughNodesError,
    Screened,
    WeightedFedAvg,
    weighted_metrics,
)

if TYPE_CHECKING:
    from sigmax_fl.settings import Settings

log = logging.getLogger(f"flwr.{__name__}")

MODULUS_RANGE = 2**32
"""SecAgg+ mask modulus: Flower's default and documented maximum."""
INT32_MAX = 2**31 - 1
"""Flower's stochastic rounding casts quantised values to int32."""
REQUIRE_KEY = "require-secure-aggregation"
"""Node-config key: an instance that sets it true never sends an unmasked update."""

_DEFAULTS_REPLACED = ("max_update_norm_ratio", "update_norm_policy")
"""Server-side norm screening with no "off" value: at its default it is replaced by the
clipping on each instance; any other value is a request the server cannot honour."""


# --------------------------------------------------------------------------------------------
# Run config: what secure aggregation needs, and what it cannot do
# --------------------------------------------------------------------------------------------


def _count_or_fraction(value: float) -> int | float:
    """Flower's convention: an int is a count, a float in (0, 1] a fraction."""
    return int(value) if value > 1 else float(value)


def settings_problems(settings: Settings) -> list[str]:
    """Why these settings cannot run (an empty list if they can).

    The ``secagg-*`` values are checked always; the incompatible options only with
    ``secure-aggregation = true``. Every option that needs to see individual updates is refused
    with the reason, instead of being silently ignored.
    """
    problems: list[str] = []
    shares, threshold = settings.secagg_num_shares, settings.secagg_reconstruction_threshold
    for key, value, least in (
        ("secagg-num-shares", shares, 3),
        ("secagg-reconstruction-threshold", threshold, 2),
    ):
        if not value > 0 or (value > 1 and (not float(value).is_integer() or value < least)):
            problems.append(
                f"'{key}' = {value!r}: expected a fraction in (0, 1] or a count >= {least}"
            )
    if shares > 1 and threshold > 1 and threshold >= shares:
        problems.append(
            f"'secagg-reconstruction-threshold' = {threshold:g} must be below "
            f"'secagg-num-shares' = {shares:g}"
        )
    if not (np.isfinite(settings.secagg_clip_norm) and settings.secagg_clip_norm > 0):
        problems.append(f"'secagg-clip-norm' = {settings.secagg_clip_norm!r}: expected > 0")
    if not settings.secure_aggregation:
        return problems

    why = "with secure-aggregation = true the server only receives the sum of the masked updates"
    if settings.aggregation != "weighted-fedavg":
        problems.append(
            f"aggregation = '{settings.aggregation}' needs every update ({why}): use "
            "'weighted-fedavg'"
        )
    if getattr(settings, "dp", "off") == "central":
        problems.append(
            f"dp = 'central' clips and weighs each update on the server ({why}): use "
            "dp = 'local' (DP-SGD on each instance) or secure-aggregation = false"
        )
    if settings.max_update_norm > 0:
        problems.append(
            f"max-update-norm = {settings.max_update_norm:g} is a server-side screen of each "
            f"update ({why}): set it to 0; secagg-clip-norm bounds each update on the instance"
        )
    defaults = {f.name: f.default for f in fields(type(settings))}
    for name in _DEFAULTS_REPLACED:
        if getattr(settings, name) != defaults[name]:
            problems.append(
                f"{name.replace('_', '-')} = {getattr(settings, name)!r} sets a server-side screen "
                f"of each update ({why}): leave it at {defaults[name]!r}; secagg-clip-norm bounds "
                "each update on the instance"
            )
    if settings.max_weight_share < 1:
        problems.append(
            f"max-weight-share = {settings.max_weight_share:g} re-weighs each update by the "
            f"others' example counts ({why}, each already weighted by its own num-examples): set "
            "max-weight-share = 1.0; one instance's weight stays bounded by "
            "max-examples-per-node, which each instance enforces on itself"
        )
    if settings.resume_from:
        problems.append(
            "resume-from: a secure-aggregation run keeps no per-round checkpoint (Flower's "
            "DefaultWorkflow runs every round in one call); start a new run"
        )
    return problems


# --------------------------------------------------------------------------------------------
# Quantisation: parameters and the error bound
# --------------------------------------------------------------------------------------------


def quantization_range(num_nodes: int) -> int:
    """The largest T for which N quantised updates add up without wrapping the modulus."""
    if num_nodes < 1:
        raise ValueError("quantization_range: at least one node")
    return min(INT32_MAX, (MODULUS_RANGE - 1) // num_nodes)


def quantized_weights(num_examples: Sequence[int], max_weight: float, target: int) -> list[int]:
    """``q_k`` exactly as ``secaggplus_mod`` computes it from each instance's num-examples."""
    return [round(n / max_weight * target) for n in num_examples]


def error_bound(
    num_examples: Sequence[int],
    *,
    max_weight: float,
    clip_norm: float,
    clipping_range: float,
    quantization_range: int,
) -> float:
    """Largest per-coordinate |SecAgg+ mean update - exact weighted mean update|.

    ``N (2C + B) / q`` (rounding of the N updates plus quantised weights; see the module
    docstring), plus float64 rounding of the decode. Valid when every ``n_k <= max_weight``
    and every ``||u_k|| <= clip_norm <= clipping_range``, which the instances enforce.
    """
    q = sum(quantized_weights(num_examples, max_weight, quantization_range))
    if q <= 0:
        return float("inf")
    n = len(num_examples)
    float_slack = 8 * n * clipping_range * np.finfo(np.float64).eps * quantization_range / q
    return n * (2 * clipping_range + clip_norm) / q + float_slack


# --------------------------------------------------------------------------------------------
# Client side: the instance checks its own update, then Flower masks it
# --------------------------------------------------------------------------------------------


class UpdateRefusedError(RuntimeError):
    """The instance will not send its update (non-finite, implausible weight, policy)."""


@dataclass(frozen=True)
class CheckedUpdate:
    """An update ``w_k - g`` that may be masked: finite, clipped, with a plausible weight."""

    arrays: list[np.ndarray]
    norm: float
    """``||w_k - g||_2`` before clipping."""
    factor: float
    """The update was multiplied by this (1: not clipped)."""


def check_update(
    local: Sequence[np.ndarray],
    global_: Sequence[np.ndarray],
    *,
    clip_norm: float,
    num_examples: int,
    max_examples: int,
) -> CheckedUpdate:
    """Check an instance's own update before masking; clip its L2 norm to ``clip_norm``.

    Raises
    ------
    UpdateRefusedError
        If the weights or the update hold NaN or Inf, the shapes differ from the global model,
        or ``num_examples`` is not in ``[1, max_examples]`` (SecAgg+ would scale it past
        ``max_weight`` and the quantisation bound would not hold).
    """
    if not 1 <= num_examples <= max_examples:
        raise UpdateRefusedError(
            f"num-examples {num_examples} outside [1, max-examples-per-node = {max_examples}]: "
            "SecAgg+ weighs by num-examples / max-examples-per-node"
        )
    if len(local) != len(global_):
        raise UpdateRefusedError(f"{len(local)} arrays, the global model has {len(global_)}")
    update = []
    for i, (w, g) in enumerate(zip(local, global_, strict=True)):
        if np.shape(w) != np.shape(g):
            raise UpdateRefusedError(f"array {i} has shape {np.shape(w)}, global {np.shape(g)}")
        u = np.asarray(w, dtype=np.float64) - np.asarray(g, dtype=np.float64)
        if not np.isfinite(u).all():
            raise UpdateRefusedError(f"array {i} of the update holds NaN or Inf; not sending it")
        update.append(u)
    with np.errstate(over="ignore"):
        norm = float(np.sqrt(sum(float(np.dot(u.ravel(), u.ravel())) for u in update)))
    if not np.isfinite(norm):
        raise UpdateRefusedError("the update's norm overflows; not sending it")
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    if factor < 1.0:
        update = [u * factor for u in update]
    return CheckedUpdate(update, norm, factor)


def _masked_fit(message: Message, context: Context, train: ClientAppCallable) -> Message:
    """Legacy FitIns -> the app's own train function -> checked update as legacy FitRes."""
    from sigmax_fl.settings import Settings  # settings imports this module

    settings = Settings.from_run_config(context.run_config)
    fitins = compat.recorddict_to_fitins(message.content, keep_input=True)
    global_ = parameters_to_ndarrays(fitins.parameters)
    names = list(build_model(settings.model).state_dict().keys())
    if len(names) != len(global_):
        raise UpdateRefusedError(
            f"{len(global_)} arrays received, model '{settings.model}' has {len(names)}"
        )
    round_ = int(cast(int, fitins.config.get("server-round", 0)))
    original = message.content
    message.content = RecordDict(
        {
            "arrays": ArrayRecord(
                {n: Array(np.ascontiguousarray(a)) for n, a in zip(names, global_, strict=True)}
            ),
            "config": ConfigRecord({"server-round": round_}),
        }
    )
    try:
        reply = train(message, context)
    finally:
        message.content = original
    if reply.has_error():
        raise UpdateRefusedError(f"training failed: {reply.error.reason}")
    metrics = dict(reply.content["metrics"])
    arrays = reply.content["arrays"]
    instance_id = str(reply.content[META_KEY]["instance-id"])
    checked = check_update(
        [arrays[n].numpy() for n in names],
        global_,
        clip_norm=settings.secagg_clip_norm,
        num_examples=int(cast(int, metrics[WEIGHT_KEY])),
        max_examples=settings.max_examples_per_node,
    )
    if checked.factor < 1:
        log.info(
            "%s: update norm %.4g clipped to secagg-clip-norm %.4g before masking",
            instance_id,
            checked.norm,
            settings.secagg_clip_norm,
        )
    # Sent in the clear next to the masked vector: the weight and the metrics the normal path
    # sends too, plus one bit (clipped or not). The update norm itself stays here.
    plain: dict[str, Any] = {
        k: v for k, v in metrics.items() if k != WEIGHT_KEY and isinstance(v, int | float)
    }
    plain.update({"instance-id": instance_id, "clipped": int(checked.factor < 1)})
    fitres = FitRes(
        status=Status(Code.OK, ""),
        parameters=ndarrays_to_parameters(checked.arrays),
        num_examples=int(cast(int, metrics[WEIGHT_KEY])),
        metrics=plain,
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=message)


def is_secagg_message(message: Message) -> bool:
    """True for the messages of Flower's SecAgg+ workflow (any of its four stages)."""
    return message.has_content() and RECORD_KEY_CONFIGS in message.content.config_records


def secagg_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Function mod for ``@app.train``: SecAgg+ messages through Flower's ``secaggplus_mod``.

    Plain train messages go to ``call_next`` unchanged, unless the SuperNode was started with
    ``--node-config "require-secure-aggregation=true"``: such an instance refuses to send its
    update unmasked, whatever the submitted run config says.
    """
    if not is_secagg_message(message):
        if bool(context.node_config.get(REQUIRE_KEY, False)):
            raise UpdateRefusedError(
                f"node config {REQUIRE_KEY} = true: this instance sends its update only "
                "through secure aggregation (run with secure-aggregation = true)"
            )
        return call_next(message, context)
    if not bool(context.run_config.get("secure-aggregation", False)):
        raise UpdateRefusedError("a SecAgg+ message in a run with secure-aggregation = false")
    return secaggplus_mod(message, context, lambda msg, ctx: _masked_fit(msg, ctx, call_next))


# --------------------------------------------------------------------------------------------
# Server side: legacy FedAvg that applies the unmasked mean update
# --------------------------------------------------------------------------------------------


@dataclass
class RoundInfo:
    """What the server learnt in one SecAgg+ round (all of it is in the history)."""

    sampled: dict[int, str] = field(default_factory=dict)
    """node id -> instance id (filled in from the replies; "" for a node that dropped)."""
    results: list[tuple[int, int, dict[str, Any]]] = field(default_factory=list)
    """(node id, num-examples, plaintext metrics) of each update in the masked sum."""
    quantization_range: int = 0
    error_bound: float | None = None
    applied: bool = False
    reason: str = ""


class SecAggFedAvg(FedAvg):
    """Legacy FedAvg for SecAgg+: its "replies" all carry the same unmasked mean update.

    ``SecAggPlusWorkflow`` overwrites every FitRes' parameters with the decoded aggregate,
    ``sum_k b_k u_k / sum_k b_k``; :meth:`aggregate_fit` adds it to the global model it sent.
    Sampling is seeded and its size fixed before the round (:meth:`plan`), so that the
    quantisation range can be chosen for exactly that many instances; a partial sample is drawn
    over the nodes in the order of their instances, as ``WeightedFedAvg`` draws its own.
    """

    def __init__(
        self,
        initial: Sequence[np.ndarray],
        *,
        max_weight: float,
        clip_norm: float,
        min_train_replies: int,
        seed: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            initial_parameters=ndarrays_to_parameters(list(initial)),
            on_fit_config_fn=lambda r: {"server-round": r},
            fraction_evaluate=0.0,  # evaluation is the Message-API one, see _Evaluate
            **kwargs,
        )
        self.current = [np.asarray(a) for a in initial]
        self.max_weight = max_weight
        self.clip_norm = clip_norm
        self.min_train_replies = min_train_replies
        # Not the evaluator's stream (seeded by the same seed): with equal fractions it would
        # draw the same positions, and every round would score exactly the instances that trained.
        self.rng = np.random.default_rng([seed, 1])
        self.info = RoundInfo()
        self._size = 0
        self._order: dict[int, int] = {}

    def plan(self, size: int, quantization_range: int, order: Sequence[int] = ()) -> None:
        """Fix the next round's sample size and the T its quantisation uses.

        ``order``: for a partial sample, the nodes it is drawn over, in that order.
        """
        self._size = size
        self._order = {node: i for i, node in enumerate(order)}
        self.info = RoundInfo(quantization_range=quantization_range)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        proxies = sorted(client_manager.all().values(), key=lambda p: p.node_id)
        if self._order:
            # The nodes the order was made for: one that connected since would shift every
            # position drawn (and the size and T were fixed for these)
            proxies = sorted(
                (p for p in proxies if p.node_id in self._order),
                key=lambda p: self._order[p.node_id],
            )
        size = min(self._size, len(proxies))
        picked = [proxies[i] for i in sorted(self.rng.choice(len(proxies), size, replace=False))]
        self.info.sampled = {p.node_id: "" for p in picked}
        fitins = FitIns(parameters, {"server-round": server_round})
        log.info("round %d: secure aggregation over %d instance(s)", server_round, size)
        return [(p, fitins) for p in picked]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Any]]:
        info = self.info
        for proxy, res in results:
            metrics = dict(res.metrics)
            info.sampled[proxy.node_id] = str(metrics.get("instance-id", ""))
            info.results.append((proxy.node_id, int(res.num_examples), metrics))
        counts = [n for _, n, _ in info.results]
        info.error_bound = (
            error_bound(
                counts,
                max_weight=self.max_weight,
                clip_norm=self.clip_norm,
                clipping_range=self.clip_norm,
                quantization_range=info.quantization_range,
            )
            if counts
            else None
        )
        if len(results) < max(self.min_train_replies, 1):
            info.reason = (
                f"{len(results)} masked update(s), min-train-replies is {self.min_train_replies}"
            )
            return None, {}
        if any(n > self.max_weight for n in counts):
            info.reason = "a num-examples above max-examples-per-node: the bound does not hold"
            return None, {}
        mean = parameters_to_ndarrays(results[0][1].parameters)
        if len(mean) != len(self.current) or not all(np.isfinite(u).all() for u in mean):
            info.reason = "the unmasked aggregate is not a finite update of the model's shape"
            return None, {}
        self.current = [
            (g.astype(np.float64) + u.reshape(g.shape)).astype(g.dtype)
            for g, u in zip(self.current, mean, strict=True)
        ]
        info.applied = True
        return ndarrays_to_parameters(self.current), {}


# --------------------------------------------------------------------------------------------
# Server side: the rounds
# --------------------------------------------------------------------------------------------


@dataclass
class SecAggResult:
    """What :func:`run_secagg` returns."""

    arrays: dict[str, np.ndarray]
    """The final global model (the best round's if early stopping is on)."""
    history: list[dict[str, Any]]
    rounds_run: int
    stopped_early: bool
    best_round: int
    best_score: float | None


class _Rounds:
    """DefaultWorkflow's fit and evaluate workflows, sharing one round's bookkeeping."""

    def __init__(
        self,
        settings: Settings,
        names: list[str],
        strategy: SecAggFedAvg,
        evaluator: WeightedFedAvg,
        on_round: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        self.settings = settings
        self.names = names
        self.strategy = strategy
        self.evaluator = evaluator
        self.on_round = on_round
        self.history: list[dict[str, Any]] = []
        self.stopped = False
        self.stale = 0
        self.best_round = 0
        self.best_score: float | None = None
        self.best_arrays: list[np.ndarray] | None = None
        self._started = 0.0

    def _wait_for_nodes(self, context: LegacyContext) -> int:
        s = self.settings
        needed = max(s.min_available_nodes, s.min_train_nodes, 2)
        deadline = time.monotonic() + s.wait_for_nodes_timeout
        while (available := context.client_manager.num_available()) < needed:
            if time.monotonic() > deadline:
                raise NotEnoughNodesError(
                    f"{available} SuperNode(s) connected, {needed} needed (min-available-nodes "
                    f"/ min-train-nodes; SecAgg+ needs 2) after waiting "
                    f"{s.wait_for_nodes_timeout:.0f} s (wait-for-nodes-timeout)"
                )
            time.sleep(1.0)
        return available

    def fit(self, grid: Grid, context: Context) -> None:
        """One SecAgg+ round, with T chosen for the number of instances sampled."""
        if self.stopped:
            return
        context = cast(LegacyContext, context)
        s = self.settings
        self._started = time.monotonic()
        available = self._wait_for_nodes(context)
        size = min(available, max(int(available * s.fraction_train), s.min_train_nodes, 2))
        target = quantization_range(size)
        order: list[int] = []
        if size < available:
            nodes = sorted(p.node_id for p in context.client_manager.all().values())
            order = self.evaluator.by_instance(grid, nodes)
        self.strategy.plan(size, target, order)
        SecAggPlusWorkflow(
            num_shares=_count_or_fraction(s.secagg_num_shares),
            reconstruction_threshold=_count_or_fraction(s.secagg_reconstruction_threshold),
            max_weight=float(s.max_examples_per_node),
            clipping_range=float(s.secagg_clip_norm),
            quantization_range=target,
            modulus_range=MODULUS_RANGE,
            timeout=s.round_timeout,
        )(grid, context)
        # The masked replies name their instances, as plain train replies do: a partial
        # evaluate sample then asks none of those nodes
        self.evaluator.node_names.update(
            (node, name) for node, name in self.strategy.info.sampled.items() if name
        )

    def evaluate(self, grid: Grid, context: Context) -> None:
        """The normal Message-API evaluation of the new global model, then the round record."""
        if self.stopped:
            return
        s = self.settings
        server_round = int(
            cast(int, context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
        )
        arrays = ArrayRecord(
            {
                n: Array(np.ascontiguousarray(a))
                for n, a in zip(self.names, self.strategy.current, strict=True)
            }
        )
        replies = exchange.send_and_receive(
            grid,
            self.evaluator.configure_evaluate(server_round, arrays, ConfigRecord(), grid),
            timeout=s.round_timeout,
        )
        evaluate = dict(self.evaluator.aggregate_evaluate(server_round, replies) or {})
        record = self._record(server_round, evaluate)
        self.history.append(record)
        self._early_stopping(record)
        if self.on_round is not None:
            self.on_round(record)

    def _record(self, server_round: int, evaluate: dict[str, Any]) -> dict[str, Any]:
        info, s = self.strategy.info, self.settings
        total = sum(n for _, n, _ in info.results) or 1
        train_screened = [
            Screened(
                str(m.get("instance-id", "")),
                node,
                n,
                metrics={
                    k: float(v)
                    for k, v in m.items()
                    if isinstance(v, int | float) and k not in ("clipped",)
                },
            )
            for node, n, m in info.results
        ]
        # Keyed by node first: a node that dropped out sent no instance id, but its evaluation
        # reply may name it.
        by_node: dict[int, dict[str, Any]] = {}
        names: dict[int, str] = {}
        for node, n, m in info.results:
            names[node] = str(m.get("instance-id", ""))
            by_node[node] = {
                "node_id": node,
                "train": {
                    **{k: v for k, v in m.items() if k != "instance-id"},
                    WEIGHT_KEY: n,
                    "weight": n / total,
                    "accepted": info.applied,
                    "masked": True,
                },
            }
        for node in info.sampled:
            if node not in by_node:
                by_node[node] = {
                    "node_id": node,
                    "train": {
                        "accepted": False,
                        "masked": False,
                        "reason": "dropped out: no masked update (error reply or timeout)",
                    },
                }
        for e in self.evaluator.last_evaluate:
            names[e.node_id] = names.get(e.node_id) or e.instance_id
            by_node.setdefault(e.node_id, {"node_id": e.node_id})["evaluate"] = {
                **e.metrics,
                "accepted": e.ok,
                **({"reason": e.reason} if e.reason else {}),
            }
        instances = {names.get(node) or f"node-{node}": entry for node, entry in by_node.items()}
        if not info.applied and not info.reason:
            info.reason = (
                "SecAgg+ halted: fewer instances left than the reconstruction threshold "
                "(see the log)"
            )
        clipped = sum(int(m.get("clipped", 0)) for _, _, m in info.results)
        record: dict[str, Any] = {
            "round": server_round,
            "seconds": round(time.monotonic() - self._started, 3),
            "skipped": not info.applied,
            "train": {
                **weighted_metrics(train_screened),
                "replies-ok": len(info.results),
                "replies-rejected": len(info.sampled) - len(info.results),
                "clipped": clipped,
            },
            "evaluate": evaluate,
            "instances": instances,
            "secure_aggregation": {
                "protocol": "SecAgg+",
                "sampled": len(info.sampled),
                "masked": len(info.results),
                "num_shares": s.secagg_num_shares,
                "reconstruction_threshold": s.secagg_reconstruction_threshold,
                "max_weight": s.max_examples_per_node,
                "clip_norm": s.secagg_clip_norm,
                "clipping_range": s.secagg_clip_norm,
                "quantization_range": info.quantization_range,
                "modulus_range": MODULUS_RANGE,
                "error_bound": info.error_bound,
                **({"skip_reason": info.reason} if info.reason else {}),
            },
        }
        if s.dp == "local":  # as the normal path reports it: the largest per-row epsilon
            spent = [float(m[EPSILON_KEY]) for _, _, m in info.results if EPSILON_KEY in m]
            record["privacy"] = {
                "mode": "local",
                "unit": "training row (largest over the instances that replied)",
                "epsilon": max(spent) if spent else None,
                "delta": s.dp_delta,
            }
        return record

    def _early_stopping(self, record: dict[str, Any]) -> None:
        from sigmax_fl.settings import STOPPING_METRICS  # settings imports this module

        s = self.settings
        score = record["evaluate"].get(s.early_stopping_metric)
        better = (
            score is not None
            and np.isfinite(score)
            and (
                self.best_score is None
                or (
                    score < self.best_score
                    if STOPPING_METRICS[s.early_stopping_metric] == "min"
                    else score > self.best_score
                )
            )
        )
        if better:
            self.best_round, self.best_score, self.stale = record["round"], score, 0
            self.best_arrays = [a.copy() for a in self.strategy.current]
        else:
            self.stale += 1
        if s.early_stopping_patience and self.stale >= s.early_stopping_patience:
            log.info(
                "sigmax-fl: early stop after round %d: %s has not improved for %d rounds "
                "(the remaining rounds of Flower's DefaultWorkflow do nothing)",
                record["round"],
                s.early_stopping_metric,
                self.stale,
            )
            self.stopped = True


def run_secagg(
    grid: Grid,
    context: Context,
    settings: Settings,
    initial_arrays: Mapping[str, np.ndarray],
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> SecAggResult:
    """All rounds through LegacyContext + DefaultWorkflow(fit_workflow=SecAggPlusWorkflow).

    Parameters
    ----------
    grid, context
        The ServerApp's.
    settings : Settings
        With ``secure_aggregation`` true (checked by :func:`settings_problems`).
    initial_arrays : Mapping[str, np.ndarray]
        The initial global model, by name (the order of the model's state dict).
    on_round : callable, optional
        Called with each round's history record as soon as it is complete.
    """
    names = list(initial_arrays)
    strategy = SecAggFedAvg(
        [np.asarray(initial_arrays[n]) for n in names],
        max_weight=float(settings.max_examples_per_node),
        clip_norm=settings.secagg_clip_norm,
        min_train_replies=settings.min_train_replies,
        seed=settings.seed,
        fraction_fit=settings.fraction_train,
        min_fit_clients=max(settings.min_train_nodes, 2),
        min_available_clients=max(settings.min_available_nodes, 2),
    )
    evaluator = settings.strategy()
    rounds = _Rounds(settings, names, strategy, evaluator, on_round)
    legacy = LegacyContext(
        context=context,
        config=ServerConfig(num_rounds=settings.num_server_rounds),
        strategy=strategy,
    )
    log.info(
        "sigmax-fl: secure aggregation (SecAgg+): num-shares %g, reconstruction-threshold %g, "
        "max_weight %d, clip norm = clipping_range %g, modulus 2**32",
        settings.secagg_num_shares,
        settings.secagg_reconstruction_threshold,
        settings.max_examples_per_node,
        settings.secagg_clip_norm,
    )
    default_max = next(
        f.default for f in fields(type(settings)) if f.name == "max_examples_per_node"
    )
    if settings.max_examples_per_node == default_max:
        log.warning(
            "sigmax-fl: max-examples-per-node is at its default %d: SecAgg+ weighs each update by "
            "num-examples / max-examples-per-node, and the quantisation error bound grows with "
            "it (see history 'error_bound'); set it near the largest instance's training rows",
            default_max,
        )
    DefaultWorkflow(fit_workflow=rounds.fit, evaluate_workflow=rounds.evaluate)(grid, legacy)
    final = strategy.current
    if settings.early_stopping_patience and rounds.best_arrays is not None:
        final = rounds.best_arrays
    return SecAggResult(
        arrays=dict(zip(names, final, strict=True)),
        history=rounds.history,
        rounds_run=len(rounds.history),
        stopped_early=rounds.stopped,
        best_round=rounds.best_round,
        best_score=rounds.best_score,
    )


def _progress(record: dict[str, Any], total: int) -> str:
    def fmt(value: object) -> str:
        return f"{value:.6g}" if isinstance(value, float) else "n/a"

    sa, train, evaluate = record["secure_aggregation"], record["train"], record["evaluate"]
    return (
        f"round {record['round']}/{total} (SecAgg+) {record['seconds']:.1f}s: "
        f"train_loss={fmt(train.get('train_loss'))} val_loss={fmt(evaluate.get('val_loss'))} "
        f"ic={fmt(evaluate.get('ic'))} masked={sa['masked']}/{sa['sampled']} "
        f"clipped={train['clipped']} error_bound={fmt(sa['error_bound'])}"
        + (f" epsilon={fmt(record['privacy']['epsilon'])}" if "privacy" in record else "")
        + (f" SKIPPED ({sa['skip_reason']}; global model kept)" if record["skipped"] else "")
    )


def main(
    grid: Grid,
    context: Context,
    settings: Settings,
    run_dir: Path,
    initial_arrays: Mapping[str, np.ndarray],
) -> None:
    """The ServerApp's rounds with ``secure-aggregation = true``, and the normal path's outputs.

    ``run_dir`` and ``initial_arrays`` come from the normal path's start (``initial-model`` or
    the seed). The folder gets ``history.jsonl`` (a line per finished round), ``audit.jsonl``
    (a line per sampled instance and round: masked or dropped, never a norm), ``history.json``,
    ``final_model.pt`` and ``summary.json``; no checkpoints.
    """
    initial = {k: np.asarray(v) for k, v in initial_arrays.items()}

    def on_round(record: dict[str, Any]) -> None:
        runs.append_history(run_dir, record)
        runs.append_jsonl(
            run_dir / runs.AUDIT_JSONL,
            [
                {
                    "round": record["round"],
                    "instance_id": iid,
                    "node_id": entry["node_id"],
                    "num_examples": entry["train"].get(WEIGHT_KEY),
                    "update_norm": None,  # masked: the server never sees it
                    "weight": entry["train"].get("weight"),
                    "decision": "masked" if entry["train"].get("masked") else "dropped",
                    "reason": entry["train"].get("reason", "")
                    or ("update clipped on the instance" if entry["train"].get("clipped") else ""),
                }
                for iid, entry in record["instances"].items()
                if "train" in entry
            ],
        )
        log.info("sigmax-fl: %s", _progress(record, settings.num_server_rounds))

    result = run_secagg(grid, context, settings, initial, on_round)
    final_round = (
        result.best_round
        if settings.early_stopping_patience and result.best_round
        else result.rounds_run
    )
    runs.write_json(run_dir / runs.HISTORY_JSON, result.history)
    skipped = runs.check_trained(run_dir, result.history, final_round)
    path = runs.save_model(
        run_dir, {k: torch.from_numpy(np.array(v)) for k, v in result.arrays.items()}
    )
    runs.write_json(
        run_dir / runs.SUMMARY_JSON,
        {
            "rounds_run": result.rounds_run,
            "rounds_skipped": skipped,
            "stopped_early": result.stopped_early,
            "best_round": result.best_round,
            "best_metric": settings.early_stopping_metric,
            "best_value": result.best_score,
            "final_model_round": final_round,
            "final_model": str(path),
            "secure_aggregation": True,
            "privacy": result.history[-1].get("privacy") if result.history else None,
        },
    )
    log.info("sigmax-fl: history %s", run_dir / runs.HISTORY_JSON)

"""WeightedFedAvg: screen every reply, weigh the good ones by their examples, average.

global = sum_k (n_k / n_total) * w_k over the replies that pass screening, within about one
float32 ulp of the float64 average (weighted deltas summed in float32; float64 where updates are
clipped or a robust rule averages). Flower's stock FedAvg raises for the whole round when one
reply is inconsistent; here one bad instance is left out, logged with its instance id and the
reason, and counted.

Screening, in order, each step seeing only what passed the one before:

1. structure: an error reply, no positive integer ``num-examples``, arrays whose names,
   shapes or dtypes differ from the model that was sent, NaN or Inf;
2. plausibility: ``num-examples`` above ``max_examples_per_node``;
3. update norm: ||w_k - w_global|| above an absolute bound, or above ``ratio`` times the
   round's lower median norm (adaptive: a scaled or sign-flipped update stands out against
   its peers); rejected, or clipped to the bound;
4. quorum: fewer than ``min_train_replies`` usable replies skip the round.

Then the weights n_k / n_total are capped at ``max_weight_share`` (the excess goes to the
others in proportion to their weights) so that no instance dominates, and the average is
taken by the chosen ``aggregation``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

from sigmax_fl import exchange, fused
from sigmax_fl.codec import (
    ENCODING_KEY,
    FreshArrays,
    MalformedUpdateError,
    NpyLayout,
    as_numpy,
    decode_update,
    npy_array,
)
from sigmax_fl.privacy import add_gaussian_noise, secure_rng

# A child of Flower's logger, so these lines reach `flwr log` and the run's stream.
log = logging.getLogger(f"flwr.{__name__}")
_R = TypeVar("_R", ArrayRecord, MetricRecord, ConfigRecord)

WEIGHT_KEY = "num-examples"
EPSILON_KEY = "dp-epsilon"
"""Metric a ClientApp under local DP reports: its per-row epsilon so far (not averaged)."""
META_KEY = "meta"
"""ConfigRecord a sigmax-fl ClientApp adds to each reply, holding its ``instance-id``."""
RUN_KEY = "run-key"
"""Train and evaluate config: the run's key (:func:`sigmax_fl.runs.run_key`), the same when the
run resumes; instances key what they keep between rounds by it (:mod:`sigmax_fl.kept`)."""
EVALUATE_RECEIVED_KEY = "evaluate-received"
"""Train-config flag (``evaluate-on-receipt``): score the received model before training."""
EVALUATION_KEY = "evaluation"
"""MetricRecord of a train reply holding the received model's validation scores."""
INSTANCE_QUERY = "query.instance_id"
"""Message type asking a SuperNode which instance it serves (``@app.query("instance_id")``),
answered with :data:`META_KEY` alone."""
QUERY_TIMEOUT = 60.0
"""Longest wait, in seconds, for that answer (``round-timeout`` if shorter). A healthy node
answers in seconds, also deployed (a 3 s poll and a fresh ClientApp process); a node that is
down or busy with a late training must not hold the round for a whole ``round-timeout``."""
GONE = (ErrorCode.NODE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE)
"""Error codes the SuperLink writes for a node that is not there (heartbeat lapsed) or a reply
that expired: the node did not answer, as opposed to its ClientApp failing."""
ROLL_CALL_INTERVAL = 0.5
"""Seconds between the roll call's looks at the SuperLink (:meth:`WeightedFedAvg.roll_call`)."""

AGGREGATIONS = ("weighted-fedavg", "trimmed-mean", "median", "krum")
NORM_POLICIES = ("reject", "clip")
NORM_MARGIN = 1e-4
"""Relative margin below the norm bound within which the one pass defers to the exact path."""
PASS_BLOCK = 1 << 17
"""Values per block of the one-pass average: 512 KiB of float32 per reply, so a block, its
delta, the global model's block and the running sum stay in this machine's caches (1 MiB L2
per core, 32 MiB L3); fewer, larger blocks keep Python's per-call cost small (measured
best of 32K-1M values here)."""


class NotEnoughNodesError(RuntimeError):
    """Fewer SuperNodes connected than the round needs, after waiting the allowed time."""


@dataclass(frozen=True)
class Defences:
    """What the server checks and how it averages; every aggregation keeps the screening."""

    aggregation: str = "weighted-fedavg"
    max_update_norm: float = 0.0
    """Absolute bound on ||w_k - w_global||; 0 means adaptive (``max_update_norm_ratio``)."""
    max_update_norm_ratio: float = 3.0
    update_norm_policy: str = "reject"
    max_examples_per_node: int = 10_000_000
    max_weight_share: float = 0.5
    min_train_replies: int = 1
    trim_fraction: float = 0.2
    krum_byzantine: int = 1

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(
                f"aggregation '{self.aggregation}': expected one of {list(AGGREGATIONS)}"
            )
        if self.update_norm_policy not in NORM_POLICIES:
            raise ValueError(
                f"update-norm-policy '{self.update_norm_policy}': "
                f"expected one of {list(NORM_POLICIES)}"
            )
        if not 0 < self.max_weight_share <= 1:
            raise ValueError(
                f"max-weight-share {self.max_weight_share}: expected a share in (0, 1]"
            )


def _records(content: Mapping[str, object], kind: type[_R]) -> dict[str, _R]:
    """A reply's records of one kind, as ``message.content.<kind>_records`` gives them.

    Without building Flower's synced, type-checked view, which cost more than the one pass
    over a 1M-parameter reply.
    """
    return {key: r for key, r in content.items() if isinstance(r, kind)}


def _meta(message: Message) -> ConfigRecord | None:
    """The sigmax-fl meta ConfigRecord of a reply, if it has one."""
    return _as_meta(message.content.get(META_KEY))


def _as_meta(record: object) -> ConfigRecord | None:
    return record if isinstance(record, ConfigRecord) else None


def _named_instance(meta: ConfigRecord | None) -> str | None:
    """The instance a meta record names, if it names one."""
    name = meta.get("instance-id") if meta is not None else None
    return name if isinstance(name, str) else None


def given_instance_id(message: Message) -> str | None:
    """The instance a reply says it speaks for; None for one that names none (an error)."""
    if not message.has_error() and message.has_content():
        return _named_instance(_meta(message))
    return None


def instance_id(message: Message) -> str:
    """The instance a reply speaks for: its own word, else Flower's node id."""
    return given_instance_id(message) or f"node-{message.metadata.src_node_id}"


@dataclass
class Screened:
    """One reply's verdict; ``arrays`` is filled only while an accepted update is averaged."""

    instance_id: str
    node_id: int
    num_examples: int = 0
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict, repr=False)
    update_norm: float = float("nan")
    clip: float = 1.0
    """Factor the update (w_k - w_global) was scaled by; 1 when not clipped."""
    weight: float = 0.0
    payload_bytes: int = 0
    missing: bool = False
    """Sampled for training but no reply arrived within ``round-timeout`` (or, in a large
    simulation, the timeout ran out before its message was sent: see ``reason``)."""

    @property
    def ok(self) -> bool:
        return not self.reason

    @property
    def norm(self) -> float | None:
        """The update norm, or None when screening stopped before measuring it."""
        return None if np.isnan(self.update_norm) else self.update_norm

    def audit(self, server_round: int) -> dict[str, object]:
        """One line of the audit log."""
        if self.missing:
            decision = "missing"
        elif self.reason:
            decision = "rejected"
        else:
            decision = "clipped" if self.clip < 1 else "accepted"
        return {
            "round": server_round,
            "instance_id": self.instance_id,
            "node_id": self.node_id,
            "num_examples": self.num_examples,
            "update_norm": self.norm,
            "weight": self.weight,
            "decision": decision,
            "reason": self.reason or (f"norm clipped by {self.clip:.3g}" if self.clip < 1 else ""),
        }


def _metrics_of(message: Message, record: str = "") -> tuple[dict[str, float], str]:
    """The reply's metrics and its positive integer weight, or the reason it has none.

    ``record`` names the MetricRecord to read; by default the reply must hold exactly one,
    except that a train reply may add the received model's scores (:data:`EVALUATION_KEY`).
    """
    return _metric_values(_records(message.content, MetricRecord), record)


def _metric_values(
    records: dict[str, MetricRecord], record: str = ""
) -> tuple[dict[str, float], str]:
    """:func:`_metrics_of` on a reply's MetricRecords (``records`` may lose a key)."""
    if record:
        if record not in records:
            return {}, f"no MetricRecord '{record}'"
        metrics = records[record]
    else:
        records.pop(EVALUATION_KEY, None)
        if len(records) != 1:
            return {}, f"expected one MetricRecord, got {len(records)}"
        metrics = next(iter(records.values()))
    n = metrics.get(WEIGHT_KEY)
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        return {}, f"'{WEIGHT_KEY}' missing or not a number ({n!r})"
    if not (float(n).is_integer() and n > 0):
        return {}, f"'{WEIGHT_KEY}' must be a positive integer, got {n!r}"
    values = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    return values, ""


def _encoding(meta: ConfigRecord | None) -> str:
    """The update encoding a reply's meta record declares; float32 weights if none."""
    return str(meta.get(ENCODING_KEY, "float32")) if meta is not None else "float32"


def screen_train_reply(
    message: Message,
    reference: ArrayRecord,
    reference_views: Mapping[str, np.ndarray] | None = None,
    layout: NpyLayout | None = None,
) -> Screened:
    """Accept a train reply only if its structure can be averaged with the global model.

    An encoded reply (float16 / int8 delta) is decoded against ``reference`` first, so every
    later check sees full weights. Values are not read here: :class:`WeightedFedAvg` folds the
    NaN / Inf test into its one pass over the data (a non-finite value makes the update norm
    non-finite) instead of reading every reply once more. ``layout`` must be the reference's
    (:class:`~sigmax_fl.codec.NpyLayout`): it recognises the common reply at a glance.
    """
    node = message.metadata.src_node_id
    if message.has_error():
        return Screened(f"node-{node}", node, reason=f"error reply: {message.error.reason}")
    # One look at the reply's records: each of Flower's typed lookups walks them anew.
    records = dict(message.content.items())
    meta = _as_meta(records.get(META_KEY))
    verdict = Screened(_named_instance(meta) or f"node-{node}", node)
    metrics, problem = _metric_values(_records(records, MetricRecord))
    if problem:
        verdict.reason = problem
        return verdict
    verdict.metrics = metrics
    verdict.num_examples = int(metrics[WEIGHT_KEY])
    array_records = _records(records, ArrayRecord)
    if len(array_records) != 1:
        verdict.reason = f"expected one ArrayRecord, got {len(array_records)}"
        return verdict
    arrays = next(iter(array_records.values()))
    encoding = _encoding(meta)
    views = layout.views(arrays) if layout is not None and encoding == "float32" else None
    if views is not None:  # the common reply: the sent model's layout, to the byte
        verdict.payload_bytes = layout.record_bytes
        verdict.arrays = views
        return verdict
    verdict.payload_bytes = arrays.count_bytes()
    if encoding != "float32":
        if reference_views is None:
            reference_views = {name: as_numpy(a) for name, a in reference.items()}
        try:
            views = decode_update(arrays, reference_views, encoding)
        except MalformedUpdateError as err:
            verdict.reason = f"encoded update ({encoding}) does not decode: {err}"
            return verdict
    else:
        views, verdict.reason = _weights_of(arrays, reference)
        if verdict.reason:
            return verdict
    verdict.arrays = views
    return verdict


def _weights_of(arrays: ArrayRecord, reference: ArrayRecord) -> tuple[dict[str, np.ndarray], str]:
    """Views of a float32 reply's weights, or why they cannot stand for the global model's."""
    if list(arrays.keys()) != list(reference.keys()):
        missing = sorted(set(reference.keys()) - set(arrays.keys()))
        extra = sorted(set(arrays.keys()) - set(reference.keys()))
        return {}, f"array names differ from the global model (missing {missing}, extra {extra})"
    views: dict[str, np.ndarray] = {}
    for name, ref in reference.items():
        got = arrays[name]
        if tuple(got.shape) != tuple(ref.shape) or got.dtype != ref.dtype:
            return {}, (
                f"array '{name}' is {got.dtype}{list(got.shape)}, "
                f"the global model has {ref.dtype}{list(ref.shape)}"
            )
        try:
            view = as_numpy(got)
        except ValueError as err:
            return {}, f"array '{name}' is not a readable npy array ({err})"
        if view.shape != tuple(ref.shape) or view.dtype != np.dtype(ref.dtype):
            return {}, f"array '{name}': npy content disagrees with its declared dtype/shape"
        views[name] = view
    return views, ""


def update_norm(arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """||w_k - w_global||_2 over all arrays, in float64."""
    total = 0.0
    for name, ref in reference.items():
        delta = (arrays[name].astype(np.float64) - ref).ravel()
        # einsum, not np.dot: this machine's BLAS dot was ~100x slower on 1M-element vectors.
        total += float(np.einsum("i,i->", delta, delta))
    return float(np.sqrt(total))


def norms_and_average(
    models: Sequence[Mapping[str, np.ndarray]],
    reference: Mapping[str, np.ndarray],
    weights: Sequence[float],
    out: Mapping[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, Mapping[str, np.ndarray]]:
    """Update norms ||w_k - w_global|| and the average sum_k weight_k w_k, in one pass.

    A float32 model of at least ``fused.MIN_PARAMS`` parameters goes through the C loop of
    :mod:`sigmax_fl.fused` where it could be built (each value read once for both); smaller
    models, or no compiler, take the torch pass below, within the same float32 rounding.

    Aggregation is memory-bound: each reply is read from RAM once, in blocks of
    :data:`PASS_BLOCK` values; its block's delta to the global model (``w_k - w_global``,
    written into a buffer that stays in cache) feeds both the norm (``vector_norm``) and the
    weighted sum of deltas (``add_`` with ``alpha``), and the block's result is
    ``w_global + sum``. Torch ops release the GIL, so two Python threads take alternate blocks.

    The weights must sum to 1 (they are shares). Summing deltas, which are small, in float32
    keeps the result within about one float32 ulp of the float64 average; the norms are
    within 1e-5 relative of float64 ones (float32 blocks, float64 across blocks).

    ``out``, C-ordered float32 arrays of the reference's shapes, receives the average: the
    strategy passes the new global model's own npy bytes (:class:`~sigmax_fl.codec.FreshArrays`).
    """
    if out is None:
        out = {name: np.empty(ref.shape, dtype=np.float32) for name, ref in reference.items()}
    if fused.applies(reference):
        return fused.norms_and_average(models, reference, weights, out), out
    with warnings.catch_warnings():
        # The views are read-only (npy bytes); torch warns since it cannot mark them so.
        warnings.simplefilter("ignore", UserWarning)
        g = {name: torch.from_numpy(ref.reshape(-1)) for name, ref in reference.items()}
        xs = {name: [torch.from_numpy(m[name].reshape(-1)) for m in models] for name in g}
    results = {name: torch.from_numpy(a.reshape(-1)) for name, a in out.items()}
    jobs = [(name, start) for name, t in g.items() for start in range(0, t.numel(), PASS_BLOCK)]
    norms = np.zeros((len(jobs), len(models)))

    def run(indices: range) -> None:
        acc, delta = torch.empty(PASS_BLOCK), torch.empty(PASS_BLOCK)
        for j in indices:
            name, start = jobs[j]
            block = slice(start, start + PASS_BLOCK)
            g_block = g[name][block]
            acc_b, d_b = acc[: g_block.numel()], delta[: g_block.numel()]
            for k, (x, w) in enumerate(zip(xs[name], weights, strict=True)):
                torch.sub(x[block], g_block, out=d_b)
                norms[j, k] = float(torch.linalg.vector_norm(d_b))  # ATen's, not BLAS
                if k == 0:
                    torch.mul(d_b, float(w), out=acc_b)
                else:
                    acc_b.add_(d_b, alpha=float(w))
            torch.add(g_block, acc_b, out=results[name][block])

    # Two Python threads on alternate blocks, each op single-threaded: torch's own
    # intra-op threads spin at a barrier after every op, which stalls for a whole scheduler
    # slice whenever the other core is busy (in simulation: with training).
    failed: list[BaseException] = []

    def run_helper(indices: range) -> None:
        try:
            run(indices)
        except BaseException as err:  # re-raised below: half an average must never be used
            failed.append(err)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    helper = threading.Thread(target=run_helper, args=(range(1, len(jobs), 2),))
    try:
        helper.start()
        run(range(0, len(jobs), 2))
    finally:
        helper.join()
        torch.set_num_threads(threads)
    if failed:
        raise failed[0]
    return np.sqrt(np.square(norms).sum(axis=0)), out


def norm_bound(norms: list[float], defences: Defences) -> float:
    """The round's bound: absolute, else ``ratio`` x the lower median of the norms.

    The *lower* median keeps the bound meaningful with two replies, where the plain median
    would sit halfway to an attacker's huge norm and let it through.
    """
    if defences.max_update_norm > 0:
        return defences.max_update_norm
    ordered = sorted(norms)
    return defences.max_update_norm_ratio * ordered[(len(ordered) - 1) // 2]


def capped_shares(examples: list[int], max_share: float) -> np.ndarray:
    """n_k / n_total with no share above ``max_share``; the excess goes to the uncapped.

    Water-filling: cap the largest, hand the excess to the others in proportion to their
    examples, repeat. When the cap cannot be met (fewer than 1 / max_share replies), every
    reply gets an equal share, the closest feasible weighting.
    """
    if len(examples) * max_share < 1:
        return np.full(len(examples), 1.0 / len(examples))
    total = float(sum(examples))
    if total > 0 and max(examples) / total <= max_share + 1e-12:  # common: nobody capped
        return np.array([n / total for n in examples])
    n = np.asarray(examples, dtype=np.float64)
    shares = n / n.sum()
    capped = np.zeros(len(n), dtype=bool)
    while (over := (shares > max_share + 1e-12) & ~capped).any():
        capped |= over
        free = 1.0 - max_share * capped.sum()
        shares = np.where(capped, max_share, free * n / n[~capped].sum())
    return shares


def _krum_index(models: list[np.ndarray], byzantine: int) -> int:
    """Krum: the model whose n - f - 2 nearest neighbours are closest (Blanchard et al. 2017)."""
    stacked = np.stack(models)
    sq = np.sum(stacked**2, axis=1)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2 * stacked @ stacked.T, 0)
    k = max(len(models) - byzantine - 2, 1)
    scores = [np.sort(np.delete(row, i))[:k].sum() for i, row in enumerate(dist)]
    return int(np.argmin(scores))


def aggregate(
    accepted: list[Screened], reference: dict[str, np.ndarray], defences: Defences
) -> dict[str, np.ndarray]:
    """The new global arrays (float64) from screened, weighted, possibly clipped updates.

    Each update enters as w_global + clip_k * (w_k - w_global), so clipping bounds an
    instance's influence without changing what an unclipped instance contributes.
    """
    method = defences.aggregation
    if method == "weighted-fedavg":
        out = {}
        for name, ref in reference.items():
            acc = np.zeros(ref.shape, dtype=np.float64)
            term = np.empty(ref.shape, dtype=np.float64)  # reused: no allocation per reply
            for s in accepted:
                # np.float64, not a Python float: float32 * float stays float32 (NEP 50).
                coef = np.float64(s.weight * s.clip)
                np.multiply(s.arrays[name], coef, out=term)
                acc += term
                if s.clip < 1:
                    acc += (s.weight - coef) * ref
            out[name] = acc
        return out

    def models(name: str) -> np.ndarray:
        ref = reference[name]
        return np.stack([ref + s.clip * (s.arrays[name] - ref) for s in accepted])

    if method == "median":
        return {name: np.median(models(name), axis=0) for name in reference}
    if method == "trimmed-mean":
        if int(defences.trim_fraction * len(accepted)) == 0:
            # Flower's trim_mean cuts int(fraction * n) per side: 0 below 1 / fraction replies.
            log.warning(
                "trimmed-mean over %d update(s) with trim fraction %.2f trims nothing: this "
                "round is a plain unweighted mean (use aggregation = 'median' below %d replies)",
                len(accepted),
                defences.trim_fraction,
                math.ceil(1 / defences.trim_fraction),
            )
        return {name: trim_mean(models(name), defences.trim_fraction) for name in reference}
    flat = [
        np.concatenate(
            [(ref + s.clip * (s.arrays[n] - ref)).ravel() for n, ref in reference.items()]
        )
        for s in accepted
    ]
    chosen = accepted[_krum_index(flat, defences.krum_byzantine)]
    return {n: ref + chosen.clip * (chosen.arrays[n] - ref) for n, ref in reference.items()}


def weighted_average(
    models: Sequence[Mapping[str, np.ndarray]],
    examples: Sequence[int],
    max_weight_share: float = 1.0,
) -> dict[str, np.ndarray]:
    """The SIGMAX formula on plain arrays, for code that averages without Flower (``compare``).

    Same weights and the same accumulation as a round of :class:`WeightedFedAvg` in which
    every reply passed screening.
    """
    shares = capped_shares(list(examples), max_weight_share)
    accepted = [
        Screened(f"model-{i}", i, int(n), arrays=dict(m), weight=float(w))
        for i, (m, n, w) in enumerate(zip(models, examples, shares, strict=True))
    ]
    reference = {name: np.zeros(a.shape, np.float64) for name, a in models[0].items()}
    return aggregate(accepted, reference, Defences(max_weight_share=max_weight_share))


def weighted_metrics(screened: list[Screened]) -> dict[str, float]:
    """Example-weighted mean of each metric over the replies that report it as a finite number.

    An instance whose IC is undefined (NaN) is left out of that metric's mean only, instead of
    turning the round's figure into NaN.
    """
    skip = (WEIGHT_KEY, EPSILON_KEY)
    names = sorted({k for s in screened for k in s.metrics if k not in skip})
    out: dict[str, float] = {}
    for name in names:
        pairs = [
            (s.num_examples, s.metrics[name])
            for s in screened
            if math.isfinite(s.metrics.get(name, math.nan))
        ]
        weight = sum(n for n, _ in pairs)
        if weight > 0:
            out[name] = sum(n * v for n, v in pairs) / weight
    return out


def _reject(s: Screened, reason: str, server_round: int) -> None:
    s.reason = reason
    s.arrays = {}
    log.warning("round %d: rejected update from %s: %s", server_round, s.instance_id, reason)


class WeightedFedAvg(FedAvg):
    """FedAvg weighted by ``num-examples``, with per-reply screening instead of all-or-nothing.

    After each ``aggregate_train`` / ``aggregate_evaluate``, :attr:`last_train` and
    :attr:`last_evaluate` hold every reply's verdict and metrics, keyed by instance id, for the
    ServerApp's history and audit log.

    Parameters
    ----------
    defences : Defences
        Screening bounds, weight cap, quorum and aggregation rule.
    wait_for_nodes_timeout : float
        Seconds to wait for ``min_available_nodes`` SuperNodes before a round fails with
        :class:`NotEnoughNodesError` (Flower's own sampling waits forever).
    query_timeout : float
        Seconds to wait for SuperNodes not yet named to say which instance they serve, before
        a partial sample (``min(round-timeout, QUERY_TIMEOUT)``).
    seed : int, optional
        Seeds the node sampling; its state is part of the server's checkpoint.
    noise_std : float
        Central DP: std of the Gaussian noise added to the average of the (clipped) updates,
        from :func:`sigmax_fl.privacy.central_noise_std`; 0 adds none.
    **kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg` (fractions, minimum nodes).
    """

    def __init__(
        self,
        defences: Defences | None = None,
        wait_for_nodes_timeout: float = 300.0,
        query_timeout: float = QUERY_TIMEOUT,
        seed: int | None = None,
        noise_std: float = 0.0,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.defences = defences or Defences()
        self.rng = np.random.default_rng(seed)
        self.noise_std = noise_std
        # Central-DP noise must not be reproducible from the (public) run seed.
        self._noise_rng = secure_rng()
        self.wait_for_nodes_timeout = wait_for_nodes_timeout
        self.query_timeout = query_timeout
        self._sent: ArrayRecord | None = None
        self._sampled: list[int] = []
        self._unsent: dict[int, str] = {}
        self.run_key = ""
        """The run's key (:func:`sigmax_fl.runs.run_key`), sent with every train and evaluate
        message: instances key what they keep between rounds by it (:mod:`sigmax_fl.kept`)."""
        self.node_names: dict[int, str] = {}
        """Instance id each node last gave: it orders a partial sample, and names the node's
        error replies and silences."""
        self._unnamed: set[int] = set()
        """Nodes asked which instance they serve that did not say (asked once only)."""
        self._shared_names: set[str] = set()
        """Instance ids two live nodes gave, already warned about."""
        self.last_train: list[Screened] = []
        self.last_evaluate: list[Screened] = []
        self.last_sent_bytes = 0

    def _sample(self, grid: Grid, fraction: float, minimum: int) -> list[int]:
        """Wait (bounded) for enough nodes, then sample ``fraction``, at least ``minimum``."""
        deadline = time.monotonic() + self.wait_for_nodes_timeout
        while True:
            nodes = sorted(grid.get_node_ids())
            needed = max(self.min_available_nodes, minimum)
            if len(nodes) >= needed:
                break
            if time.monotonic() > deadline:
                raise NotEnoughNodesError(
                    f"{len(nodes)} SuperNode(s) connected, {needed} needed "
                    f"(min-available-nodes / min-train-nodes) after waiting "
                    f"{self.wait_for_nodes_timeout:.0f} s (wait-for-nodes-timeout)"
                )
            log.info("waiting for SuperNodes: %d connected, %d needed", len(nodes), needed)
            time.sleep(1.0)
        size = min(len(nodes), max(int(len(nodes) * fraction), minimum))
        if size < len(nodes):
            nodes = self.by_instance(grid, nodes)
        # Sample positions, not ids: node ids are uint64 and numpy would turn them into floats.
        picked = self.rng.choice(len(nodes), size=size, replace=False)
        return [nodes[i] for i in sorted(picked)]

    def by_instance(self, grid: Grid, nodes: list[int]) -> list[int]:
        """``nodes`` in the order of the instances they serve; nodes not yet named are asked.

        A sample of positions in this order picks the same instances whatever ids their nodes
        have. A simulated SuperLink draws new random node ids each time it starts, so a sample
        over sorted node ids trained other instances in a second run of the same seed, or in a
        resumed run, than in the first. A node that does not say keeps its place after the
        named ones, by node id, and is not asked again (a later reply may still name it).
        """
        unasked = [n for n in nodes if n not in self.node_names and n not in self._unnamed]
        if unasked:
            self._name(grid, unasked)
        names = self.node_names
        ordered = sorted(nodes, key=lambda n: (n not in names, names.get(n, ""), n))
        serving: dict[str, list[int]] = {}
        for node in ordered:
            if node in names:
                serving.setdefault(names[node], []).append(node)
        for name, shared in serving.items():
            if len(shared) > 1 and name not in self._shared_names:
                self._shared_names.add(name)
                log.warning(
                    "SuperNodes %s all say they serve instance '%s': each needs its own "
                    "instance-id (node config), or they share what the instance keeps on disk, "
                    "and their place in the sample follows their node ids, which a restarted "
                    "SuperLink may change",
                    ", ".join(map(str, shared)),
                    name,
                )
        return ordered

    def _query(self, node: int) -> Message:
        """The question which instance ``node`` serves (:data:`INSTANCE_QUERY`)."""
        return Message(
            RecordDict({self.configrecord_key: ConfigRecord()}),
            dst_node_id=node,
            message_type=INSTANCE_QUERY,
        )

    def roll_call(self, grid: Grid) -> None:
        """Deployment, before a run's first exchange: wait until enough nodes have answered.

        A SuperLink restarted on its database lists the SuperNodes it had before as online
        until their heartbeats lapse (Flower: twice their 30 s interval). Counted toward
        ``min-available-nodes``, such ghosts could take a resumed run's first round alone
        while the restarted SuperNodes were still connecting: every reply an error, the round
        skipped, and the run one round short of the unbroken one. A node counts here once it
        says which instance it serves (which also names it), or once its ClientApp answers
        with an error of its own (it is connected: it trains, and fails, in round 1, as
        before). Each listed node is asked once, newcomers as they appear, and a node the
        SuperLink reports gone again if it is listed again (a SuperNode that keeps its key
        comes back under its old id); all for at most ``wait-for-nodes-timeout``. Questions
        still out when enough have answered are left: a partial sample asks a node it cannot
        name once more. In simulation every listed node is live, and nothing is asked.
        """
        if not exchange.deployed(grid):
            return
        needed = max(self.min_available_nodes, self.min_train_nodes)
        deadline = time.monotonic() + self.wait_for_nodes_timeout
        asked: set[int] = set()
        failed: set[int] = set()  # answered with their ClientApp's error
        waiting: dict[str, int] = {}  # question's message id -> node
        said, next_line = "", time.monotonic()
        while True:
            listed = set(grid.get_node_ids())
            live = listed & (failed | set(self.node_names))
            if len(live) >= needed:
                return
            if new := sorted(listed - asked - live):
                waiting.update(exchange.push(grid, [self._query(node) for node in new]))
                asked.update(new)
            for reply in grid.pull_messages(list(waiting)):
                node = waiting.pop(reply.metadata.reply_to_message_id, None)
                if node is not None:
                    self._heard(node, reply, asked, failed)
            short = len(listed) < needed
            if short:
                count, line = f"{len(listed)} SuperNode(s) connected", f"{len(listed)} connected"
            else:
                count = line = f"{len(live)} of {len(listed)} connected SuperNode(s) answered"
            if time.monotonic() > deadline:
                raise NotEnoughNodesError(
                    f"{count}, {needed} needed (min-available-nodes / min-train-nodes) after "
                    f"waiting {self.wait_for_nodes_timeout:.0f} s (wait-for-nodes-timeout)"
                )
            # A line a second while too few are connected; while they answer, one per change
            if (short and time.monotonic() >= next_line) or (not short and line != said):
                log.info("waiting for SuperNodes: %s, %d needed", line, needed)
                said, next_line = line, time.monotonic() + 1.0
            time.sleep(ROLL_CALL_INTERVAL)

    def _heard(self, node: int, reply: Message, asked: set[int], failed: set[int]) -> None:
        """Book one roll-call reply: a name, a node gone, or a ClientApp's own error.

        A node gone is asked again if it is listed again; one whose ClientApp failed is
        connected all the same.
        """
        if name := given_instance_id(reply):
            self.node_names[node] = name
        elif reply.has_error() and reply.error.code in GONE:
            asked.discard(node)
        else:
            failed.add(node)
            log.warning(
                "SuperNode %d answered which instance it serves with an error (%s): counted "
                "as connected",
                node,
                reply.error.reason if reply.has_error() else "no instance-id",
            )

    def _name(self, grid: Grid, nodes: list[int]) -> None:
        """Ask ``nodes`` which instance each serves; one exchange, before the sample is drawn."""
        asked = [self._query(node) for node in nodes]
        for reply in exchange.send_and_receive(grid, asked, timeout=self.query_timeout):
            if name := given_instance_id(reply):
                self.node_names[reply.metadata.src_node_id] = name
        if silent := [n for n in nodes if n not in self.node_names]:
            self._unnamed.update(silent)
            log.warning(
                "%d node(s) did not say which instance they serve (%s): they are sampled after "
                "the named ones, in node-id order",
                len(silent),
                ", ".join(map(str, silent[:5])) + (", ..." if len(silent) > 5 else ""),
            )

    def _messages(
        self,
        arrays: ArrayRecord,
        config: ConfigRecord,
        nodes: list[int],
        kind: str,
        server_round: int,
    ) -> list[Message]:
        """One message per node, its config stamped with the round and the run's key."""
        config["server-round"] = server_round
        if self.run_key:
            config[RUN_KEY] = self.run_key
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return [Message(content=content, message_type=kind, dst_node_id=node) for node in nodes]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # Remember what was sent: replies are checked against exactly this model.
        self._sent = arrays
        fused.prepare({name: a.shape for name, a in arrays.items()})
        if self.fraction_train == 0.0:
            return []
        nodes = self._sample(grid, self.fraction_train, self.min_train_nodes)
        self._sampled, self._unsent = nodes, {}
        self.last_sent_bytes = arrays.count_bytes() * len(nodes)
        log.info("round %d: training on %d node(s)", server_round, len(nodes))
        return self._messages(arrays, config, nodes, MessageType.TRAIN, server_round)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        nodes = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes)
        self.last_sent_bytes += arrays.count_bytes() * len(nodes)
        return self._messages(arrays, config, nodes, MessageType.EVALUATE, server_round)

    def not_sent(self, messages: Iterable[Message], why: str) -> None:
        """Messages of the last ``configure_*`` that never left (see ``exchange.Replies``).

        Their bytes come off :attr:`last_sent_bytes`, and a train message's instance is reported
        as ``not sent: <why>`` rather than as silent.
        """
        for message in messages:
            self.last_sent_bytes -= message.content[self.arrayrecord_key].count_bytes()
            if message.metadata.message_type == MessageType.TRAIN:
                self._unsent[message.metadata.dst_node_id] = f"not sent: {why}"

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._sent is None:
            raise RuntimeError("aggregate_train called before configure_train")
        d = self.defences
        # The model that was sent, read in place like the replies
        layout = NpyLayout.of(self._sent)
        sent = layout.views(self._sent) if layout is not None else None
        if sent is None:
            sent = {name: as_numpy(a) for name, a in self._sent.items()}
        screened = [screen_train_reply(m, self._sent, sent, layout) for m in replies]
        for s in screened:
            if s.instance_id == f"node-{s.node_id}":  # an error reply names no instance
                s.instance_id = self.node_names.get(s.node_id, s.instance_id)
            else:
                self.node_names[s.node_id] = s.instance_id
        replied = {s.node_id for s in screened}
        silent = [
            Screened(
                self.node_names.get(node, f"node-{node}"),
                node,
                reason=self._unsent.get(node, "no reply within round-timeout"),
                missing=True,
            )
            for node in self._sampled
            if node not in replied
        ]
        for s in silent:
            log.warning("round %d: no update from %s: %s", server_round, s.instance_id, s.reason)
        # Sorted by instance: the float sum, hence the model, does not depend on arrival order.
        screened.sort(key=lambda s: (s.instance_id, s.node_id))
        self.last_train = sorted([*screened, *silent], key=lambda s: (s.instance_id, s.node_id))
        for s in screened:
            if not s.ok:
                _reject(s, s.reason, server_round)
        # The float32 average is written straight into the new global model's npy bytes.
        fresh = None
        if layout is not None and layout.float32:
            fresh = FreshArrays(layout)
        elif all(a.dtype == np.float32 for a in sent.values()):
            fresh = FreshArrays({name: a.shape for name, a in sent.items()})
        averaged = self._average_all_good(screened, sent, fresh)
        if averaged is None:
            averaged = self._screen_and_average(screened, sent, server_round, fresh)
        accepted = [s for s in screened if s.ok]
        counts = {
            "replies-ok": len(accepted),
            "replies-rejected": len(screened) - len(accepted),
            "replies-missing": len(silent),
        }
        received = sum(s.payload_bytes for s in screened)
        if averaged is None:
            log.warning(
                "round %d: %d usable update(s), min-train-replies is %d; global model kept "
                "(round skipped)",
                server_round,
                len(accepted),
                d.min_train_replies,
            )
            return None, MetricRecord({**counts, "bytes-received": received})
        if self.noise_std > 0:
            averaged = add_gaussian_noise(averaged, self.noise_std, self._noise_rng)
        if fresh is not None and averaged is fresh.values:
            arrays = fresh.record()
        else:
            arrays = ArrayRecord(
                {name: npy_array(averaged[name], ref.dtype) for name, ref in self._sent.items()}
            )
        for s in accepted:
            s.arrays = {}  # the views pin reply buffers; the average no longer needs them
        metrics = {**weighted_metrics(accepted), **counts, "bytes-received": received}
        return arrays, MetricRecord(metrics)

    def _average_all_good(
        self, screened: list[Screened], sent: Mapping[str, np.ndarray], out: FreshArrays | None
    ) -> dict[str, np.ndarray] | None:
        """The common round, in one pass over the replies; None when it is not that round.

        Optimistic: every structurally sound reply is assumed plausible, finite and inside
        the norm bound, so its weight is known before its data is read, and one blockwise
        pass (:func:`norms_and_average`) yields both the update norms and the weighted sum.
        If any assumption fails (a NaN makes a norm non-finite, a norm is above the bound),
        the result is dropped and the round is redone by :meth:`_screen_and_average`, whose
        verdicts and reasons are the reference.
        """
        d = self.defences
        accepted = [s for s in screened if s.ok]
        if (
            out is None
            or d.aggregation != "weighted-fedavg"
            or len(accepted) < max(d.min_train_replies, 1)
            or any(s.num_examples > d.max_examples_per_node for s in accepted)
        ):
            return None
        shares = capped_shares([s.num_examples for s in accepted], d.max_weight_share)
        models = [s.arrays for s in accepted]
        norms, averaged = norms_and_average(models, sent, shares, out.values)
        # Float32 norms are within ~1e-5 of the float64 ones: a norm that close to the bound is
        # decided by the exact path, as the bound is DP's sensitivity under central DP.
        bound = norm_bound(list(norms), d) * (1 - NORM_MARGIN)
        if not np.isfinite(norms).all() or (norms > bound).any():
            return None
        for s, norm, share in zip(accepted, norms, shares, strict=True):
            s.update_norm, s.weight = float(norm), float(share)
        return averaged

    def _screen_and_average(
        self,
        screened: list[Screened],
        sent: Mapping[str, np.ndarray],
        server_round: int,
        out: FreshArrays | None,
    ) -> dict[str, np.ndarray] | None:
        """Every check one after the other, norms in float64; None if too few replies are left."""
        d = self.defences
        for s in screened:
            if not s.ok:
                continue  # rejected (and logged) by the structural screening
            bad = [name for name, view in s.arrays.items() if not np.isfinite(view).all()]
            if bad:
                _reject(s, f"array '{bad[0]}' holds NaN or Inf", server_round)
            elif s.num_examples > d.max_examples_per_node:
                _reject(
                    s,
                    f"num-examples {s.num_examples} above max-examples-per-node "
                    f"{d.max_examples_per_node} (implausible)",
                    server_round,
                )
        reference = {name: as_numpy(a).astype(np.float64) for name, a in self._sent.items()}
        accepted = [s for s in screened if s.ok]
        for s in accepted:
            s.update_norm = update_norm(s.arrays, reference)
        if accepted:
            bound = norm_bound([s.update_norm for s in accepted], d)
            for s in accepted:
                if s.update_norm > bound:
                    if d.update_norm_policy == "clip":
                        s.clip = bound / s.update_norm
                    else:
                        _reject(
                            s,
                            f"update norm {s.update_norm:.4g} above bound {bound:.4g}",
                            server_round,
                        )
        accepted = [s for s in screened if s.ok]
        if len(accepted) < max(d.min_train_replies, 1):
            return None
        for s, share in zip(
            accepted,
            capped_shares([s.num_examples for s in accepted], d.max_weight_share),
            strict=True,
        ):
            s.weight = float(share)
        plain = d.aggregation == "weighted-fedavg" and all(s.clip == 1 for s in accepted)
        if plain and out is not None:
            # The one-pass round's arithmetic: the same replies give the same model, bit for bit,
            # whether or not another reply made this round take the long way.
            weights = [s.weight for s in accepted]
            return norms_and_average([s.arrays for s in accepted], sent, weights, out.values)[1]
        return aggregate(accepted, reference, d)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message], record: str = ""
    ) -> MetricRecord | None:
        """Weighted validation scores; ``record``: read that MetricRecord (:func:`_metrics_of`).

        With ``evaluate-on-receipt`` the replies are the next round's train replies and
        ``record`` is :data:`EVALUATION_KEY`; ``server_round`` is the round scored.
        """
        self.last_evaluate = []
        for message in replies:
            verdict = Screened(instance_id(message), message.metadata.src_node_id)
            if verdict.instance_id == f"node-{verdict.node_id}":  # an error reply names none
                verdict.instance_id = self.node_names.get(verdict.node_id, verdict.instance_id)
            if message.has_error():
                verdict.reason = f"error reply: {message.error.reason}"
            else:
                verdict.metrics, verdict.reason = _metrics_of(message, record)
                verdict.num_examples = int(verdict.metrics.get(WEIGHT_KEY, 0))
                if verdict.num_examples > self.defences.max_examples_per_node:
                    # The same plausibility bound as for updates: the aggregated validation
                    # metric drives early stopping and the best-round choice.
                    verdict.reason = (
                        f"num-examples {verdict.num_examples} above max-examples-per-node "
                        f"{self.defences.max_examples_per_node} (implausible)"
                    )
            if not verdict.ok:
                log.warning(
                    "round %d: evaluation from %s left out: %s",
                    server_round,
                    verdict.instance_id,
                    verdict.reason,
                )
            self.last_evaluate.append(verdict)
        self.last_evaluate.sort(key=lambda s: (s.instance_id, s.node_id))
        accepted = [s for s in self.last_evaluate if s.ok]
        if not accepted:
            return None
        return MetricRecord({**weighted_metrics(accepted), "replies-ok": len(accepted)})

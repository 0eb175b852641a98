"""The federated scaler (``scaler = "federated"``): one mean and scale per feature for everyone.

With the default local scaler each instance standardises its features with its own training
rows' mean and standard deviation, so a feature value of 1.0 means something different on each
instance. The federated scaler pools them: before round 1 every instance sends, for its
training rows only, per feature

- the row count n,
- the sum of the values, and
- the sum of squared deviations from its own mean, M2 (the sum of squares, centred:
  sum x^2 = M2 + sum^2 / n; sent centred because raw sums of squares of large values lose
  the variance to cancellation),

and nothing else. The server merges them with Chan, Golub and LeVeque's pairwise update in
float64 (exact up to rounding for any split of the rows) and sends back the pooled mean and
scale; every instance normalises with those from then on.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from sigmax_fl import exchange
from sigmax_fl.features import FEATURE_NAMES, Scaler
from sigmax_fl.strategy import META_KEY, NotEnoughNodesError, given_instance_id, instance_id

log = logging.getLogger(f"flwr.{__name__}")

QUERY = "query.scaler_statistics"
"""Message type of the statistics request (the ClientApp's ``@app.query("scaler_statistics")``)."""
RECORD = "scaler-moments"
"""ConfigRecord of a statistics reply: ``count``, ``sum``, ``m2``."""
MEAN_KEY, SCALE_KEY = "scaler-mean", "scaler-scale"
"""Train and evaluate config entries carrying the pooled statistics to the instances."""


@dataclass(frozen=True)
class Moments:
    """Count, per-feature sum and centred sum of squares of some rows (float64)."""

    count: int
    total: np.ndarray
    m2: np.ndarray

    @classmethod
    def of(cls, X: np.ndarray) -> Moments:
        """The moments of the rows of ``X`` (two-pass: the mean first, then M2 about it)."""
        if len(X) == 0:
            raise ValueError("no training rows to compute scaler statistics from")
        values = np.asarray(X, dtype=np.float64)
        mean = values.mean(axis=0)
        return cls(len(values), values.sum(axis=0), ((values - mean) ** 2).sum(axis=0))

    @property
    def mean(self) -> np.ndarray:
        return self.total / self.count

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation, as the local scaler's ``np.std``."""
        return np.sqrt(self.m2 / self.count)

    def merge(self, other: Moments) -> Moments:
        """Chan et al. (1979): the moments of both row sets together, without their rows."""
        n = self.count + other.count
        delta = other.mean - self.mean
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        return Moments(n, self.total + other.total, m2)

    def scaler(self) -> Scaler:
        return Scaler.of(self.mean, self.std)

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {"count": self.count, "sum": self.total.tolist(), "m2": self.m2.tolist()}
        )

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Moments:
        """A reply's moments, checked: a malformed or non-finite reply is refused."""
        count = record.get("count")
        total = np.asarray(record.get("sum", []), dtype=np.float64)
        m2 = np.asarray(record.get("m2", []), dtype=np.float64)
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError(f"row count {count!r} is not a positive integer")
        if total.ndim != 1 or total.shape != m2.shape or len(total) == 0:
            raise ValueError(f"sum and m2 must be equal-length vectors ({total.shape}, {m2.shape})")
        if not (np.isfinite(total).all() and np.isfinite(m2).all()) or (m2 < 0).any():
            raise ValueError("non-finite sums or a negative sum of squared deviations")
        return cls(count, total, m2)


def pool(moments: Sequence[Moments]) -> Moments:
    """All instances' moments merged; every instance must have the same features."""
    widths = {len(m.total) for m in moments}
    if len(widths) != 1:
        raise ValueError(f"instances report different numbers of features: {sorted(widths)}")
    return functools.reduce(Moments.merge, moments)


def to_config(scaler: Mapping[str, Any]) -> dict[str, list[float]]:
    """The config entries a train or evaluate message carries; none with the local scaler."""
    if not scaler:
        return {}
    return {MEAN_KEY: list(scaler["mean"]), SCALE_KEY: list(scaler["scale"])}


def from_config(config: Mapping[str, Any]) -> Scaler | None:
    """The pooled scaler a message carries, or None if it carries none."""
    if MEAN_KEY not in config:
        return None
    return Scaler(
        np.asarray(config[MEAN_KEY], dtype=np.float64),
        np.asarray(config[SCALE_KEY], dtype=np.float64),
    )


def _wait_for_nodes(grid: Grid, needed: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < needed:
        if time.monotonic() > deadline:
            raise NotEnoughNodesError(
                f"scaler statistics: {len(nodes)} SuperNode(s) connected, {needed} needed "
                f"(min-available-nodes) after waiting {timeout:.0f} s (wait-for-nodes-timeout)"
            )
        log.info("scaler statistics: waiting for SuperNodes: %d of %d", len(nodes), needed)
        time.sleep(1.0)
    return nodes


def collect(
    grid: Grid,
    *,
    min_available_nodes: int,
    min_replies: int,
    wait_for_nodes_timeout: float,
    timeout: float,
    names: dict[int, str] | None = None,
) -> dict[str, Any]:
    """Round 0: ask every connected instance for its moments; return the pooled scaler.

    The result (pooled mean and scale, total rows, contributing instances) goes into the
    server state, so checkpoints carry it and a resumed run normalises exactly as before.
    A malformed reply is left out and logged; fewer than ``min_replies`` good ones is an error.
    ``names`` receives the instance id each replying node gave (the strategy's
    ``node_names``: a partial sample in round 1 then asks no node again).
    """
    nodes = _wait_for_nodes(grid, min_available_nodes, wait_for_nodes_timeout)
    messages = [
        Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type=QUERY)
        for node in nodes
    ]
    replies: Iterable[Message] = exchange.send_and_receive(grid, messages, timeout=timeout)
    gathered: dict[str, Moments] = {}
    for reply in replies:
        if reply.has_error():
            log.warning(
                "scaler statistics: node %s failed: %s",
                reply.metadata.src_node_id,
                reply.error.reason,
            )
            continue
        name = instance_id(reply)
        if names is not None and (given := given_instance_id(reply)):
            names[reply.metadata.src_node_id] = given
        try:
            moments = Moments.from_record(reply.content[RECORD])
        except (KeyError, ValueError, TypeError) as err:
            log.warning("scaler statistics: reply of %s refused: %s", name, err)
            continue
        if len(moments.total) != len(FEATURE_NAMES):
            log.warning(
                "scaler statistics: reply of %s refused: %d features, expected %d",
                name,
                len(moments.total),
                len(FEATURE_NAMES),
            )
        elif name in gathered:
            log.warning(
                "scaler statistics: a second reply for %s refused (node %s)",
                name,
                reply.metadata.src_node_id,
            )
        else:
            gathered[name] = moments
    if len(gathered) < max(min_replies, 1):
        raise RuntimeError(
            f"scaler = 'federated': {len(gathered)} usable statistics replies of {len(nodes)} "
            f"node(s), at least {max(min_replies, 1)} needed (min-train-replies)"
        )
    if len(gathered) < 3:
        # Each instance receives the pooled mean and scale: with two contributors, either can
        # solve for the other's training mean and std (README, "What the server sees").
        log.warning(
            "scaler statistics: only %d instance(s) contribute; each can derive the others' "
            "feature means and stds from the pooled ones",
            len(gathered),
        )
    pooled = pool(list(gathered.values()))
    scaler = pooled.scaler()
    log.info(
        "scaler statistics: pooled over %d training rows of %s", pooled.count, sorted(gathered)
    )
    return {
        "mean": scaler.mean.tolist(),
        "scale": scaler.scale.tolist(),
        "rows": pooled.count,
        "instances": sorted(gathered),
    }


def reply(message: Message, instance: str, moments: Moments) -> Message:
    """An instance's statistics reply: its moments and its id, nothing else."""
    content = RecordDict(
        {RECORD: moments.to_record(), META_KEY: ConfigRecord({"instance-id": instance})}
    )
    return Message(content=content, reply_to=message)

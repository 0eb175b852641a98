"""WeightedFedAvg: screen every reply, weigh the good ones by their examples, average.

global = sum_k (n_k / n_total) * w_k over the replies that pass screening, accumulated in
float64. Flower's stock FedAvg raises for the whole round when one reply is inconsistent; here
one bad instance is left out, logged with its instance id and the reason, and counted.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

# A child of Flower's logger, so these lines reach `flwr log` and the run's stream.
log = logging.getLogger(f"flwr.{__name__}")

WEIGHT_KEY = "num-examples"
META_KEY = "meta"
"""ConfigRecord a sigmax-fl ClientApp adds to each reply, holding its ``instance-id``."""


def as_numpy(array: Array) -> np.ndarray:
    """A read-only view of an Array's npy bytes, without the copy ``Array.numpy()`` makes."""
    stream = io.BytesIO(array.data)
    version = np.lib.format.read_magic(stream)
    read_header = (
        np.lib.format.read_array_header_1_0
        if version == (1, 0)
        else np.lib.format.read_array_header_2_0
    )
    shape, fortran, dtype = read_header(stream)
    if dtype.hasobject:
        raise ValueError("object arrays are not model weights")
    count = int(np.prod(shape, dtype=np.int64))
    flat = np.frombuffer(array.data, dtype=dtype, count=count, offset=stream.tell())
    return flat.reshape(shape, order="F" if fortran else "C")


def instance_id(message: Message) -> str:
    """The instance a reply speaks for: its own word, else Flower's node id."""
    if not message.has_error() and message.has_content():
        meta = message.content.config_records.get(META_KEY)
        if meta is not None and isinstance(meta.get("instance-id"), str):
            return str(meta["instance-id"])
    return f"node-{message.metadata.src_node_id}"


@dataclass
class Screened:
    """One reply's verdict; ``arrays`` is filled only for accepted train replies."""

    instance_id: str
    node_id: int
    num_examples: int = 0
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return not self.reason


def _metrics_of(message: Message) -> tuple[dict[str, float], str]:
    """The reply's metrics and its positive integer weight, or the reason it has none."""
    records = message.content.metric_records
    if len(records) != 1:
        return {}, f"expected one MetricRecord, got {len(records)}"
    metrics = next(iter(records.values()))
    n = metrics.get(WEIGHT_KEY)
    if isinstance(n, bool) or not isinstance(n, int | float):
        return {}, f"'{WEIGHT_KEY}' missing or not a number ({n!r})"
    if not (float(n).is_integer() and n > 0):
        return {}, f"'{WEIGHT_KEY}' must be a positive integer, got {n!r}"
    values = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    return values, ""


def screen_train_reply(message: Message, reference: ArrayRecord) -> Screened:
    """Accept a train reply only if it can be averaged with the global model it answers."""
    verdict = Screened(instance_id(message), message.metadata.src_node_id)
    if message.has_error():
        verdict.reason = f"error reply: {message.error.reason}"
        return verdict
    metrics, problem = _metrics_of(message)
    if problem:
        verdict.reason = problem
        return verdict
    verdict.metrics = metrics
    verdict.num_examples = int(metrics[WEIGHT_KEY])
    records = message.content.array_records
    if len(records) != 1:
        verdict.reason = f"expected one ArrayRecord, got {len(records)}"
        return verdict
    arrays = next(iter(records.values()))
    if list(arrays.keys()) != list(reference.keys()):
        missing = sorted(set(reference.keys()) - set(arrays.keys()))
        extra = sorted(set(arrays.keys()) - set(reference.keys()))
        verdict.reason = (
            f"array names differ from the global model (missing {missing}, extra {extra})"
        )
        return verdict
    views: dict[str, np.ndarray] = {}
    for name, ref in reference.items():
        got = arrays[name]
        if tuple(got.shape) != tuple(ref.shape) or got.dtype != ref.dtype:
            verdict.reason = (
                f"array '{name}' is {got.dtype}{list(got.shape)}, "
                f"the global model has {ref.dtype}{list(ref.shape)}"
            )
            return verdict
        try:
            view = as_numpy(got)
        except ValueError as err:
            verdict.reason = f"array '{name}' is not a readable npy array ({err})"
            return verdict
        if view.shape != tuple(ref.shape) or view.dtype != np.dtype(ref.dtype):
            verdict.reason = f"array '{name}': npy content disagrees with its declared dtype/shape"
            return verdict
        if not np.isfinite(view).all():
            verdict.reason = f"array '{name}' holds NaN or Inf"
            return verdict
        views[name] = view
    verdict.arrays = views
    return verdict


def weighted_average(accepted: list[Screened], reference: ArrayRecord) -> ArrayRecord:
    """sum_k (n_k / n_total) * w_k, accumulated in float64, returned in the model's dtypes."""
    total = float(sum(s.num_examples for s in accepted))
    out: dict[str, Array] = {}
    for name, ref in reference.items():
        acc = np.zeros(tuple(ref.shape), dtype=np.float64)
        for s in accepted:
            acc += (s.num_examples / total) * s.arrays[name]
        out[name] = Array(acc.astype(np.dtype(ref.dtype)))
    return ArrayRecord(out)


def weighted_metrics(screened: list[Screened]) -> dict[str, float]:
    """Example-weighted mean of each metric over the replies that report it as a finite number.

    An instance whose IC is undefined (NaN) is left out of that metric's mean only, instead of
    turning the round's figure into NaN.
    """
    names = sorted({k for s in screened for k in s.metrics if k != WEIGHT_KEY})
    out: dict[str, float] = {}
    for name in names:
        pairs = [
            (s.num_examples, s.metrics[name])
            for s in screened
            if np.isfinite(s.metrics.get(name, np.nan))
        ]
        weight = sum(n for n, _ in pairs)
        if weight > 0:
            out[name] = sum(n * v for n, v in pairs) / weight
    return out


class WeightedFedAvg(FedAvg):
    """FedAvg weighted by ``num-examples``, with per-reply screening instead of all-or-nothing.

    After each ``aggregate_train`` / ``aggregate_evaluate``, :attr:`last_train` and
    :attr:`last_evaluate` hold every reply's verdict and metrics, keyed by instance id, for the
    ServerApp's history.
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._sent: ArrayRecord | None = None
        self.last_train: list[Screened] = []
        self.last_evaluate: list[Screened] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid):
        # Remember what was sent: replies are checked against exactly this model.
        self._sent = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._sent is None:
            raise RuntimeError("aggregate_train called before configure_train")
        self.last_train = [screen_train_reply(m, self._sent) for m in replies]
        accepted = [s for s in self.last_train if s.ok]
        for s in self.last_train:
            if not s.ok:
                log.warning(
                    "round %d: rejected update from %s: %s", server_round, s.instance_id, s.reason
                )
        counts = {
            "replies-ok": len(accepted),
            "replies-rejected": len(self.last_train) - len(accepted),
        }
        if not accepted:
            log.warning(
                "round %d: no usable update; global model kept (round skipped)", server_round
            )
            return None, MetricRecord(counts)
        arrays = weighted_average(accepted, self._sent)
        for s in accepted:
            s.arrays = {}  # the views pin reply buffers; the average no longer needs them
        return arrays, MetricRecord({**weighted_metrics(accepted), **counts})

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        self.last_evaluate = []
        for message in replies:
            verdict = Screened(instance_id(message), message.metadata.src_node_id)
            if message.has_error():
                verdict.reason = f"error reply: {message.error.reason}"
            else:
                verdict.metrics, verdict.reason = _metrics_of(message)
                verdict.num_examples = int(verdict.metrics.get(WEIGHT_KEY, 0))
            if not verdict.ok:
                log.warning(
                    "round %d: evaluation from %s left out: %s",
                    server_round,
                    verdict.instance_id,
                    verdict.reason,
                )
            self.last_evaluate.append(verdict)
        accepted = [s for s in self.last_evaluate if s.ok]
        if not accepted:
            return None
        return MetricRecord({**weighted_metrics(accepted), "replies-ok": len(accepted)})

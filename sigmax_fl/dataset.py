"""One instance's ready-to-train arrays, built once and cached on that instance's own disk.

In deployment every message starts a fresh ClientApp process, so features are cached on disk,
keyed by the source file's content hash and everything that shapes the arrays; in simulation
the same process serves many rounds, so they are also kept in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sigmax_fl.data import DataError, DataSource, source_digest
from sigmax_fl.data.sources import split_asset
from sigmax_fl.features import FEATURE_VERSION, Calendar, Scaler, make_features
from sigmax_fl.paths import PRIVATE, PRIVATE_FOLDER, make_folders, write_durably

if TYPE_CHECKING:
    from sigmax_fl.settings import Settings

CACHE_DIR_ENV = "SIGMAX_FL_CACHE_DIR"
SPLITS = ("train", "val", "test")

# A child of Flower's logger, so these lines reach `flwr log` and the run's stream.
log = logging.getLogger(f"flwr.{__name__}")

_MEMORY: dict[str, InstanceData] = {}

CACHE_LAYOUT = 2
"""Bumped when the cached arrays change: 2 adds the training scaler (``scaler_mean``,
``scaler_scale``) that :meth:`InstanceData.raw` needs for the federated scaler."""


@dataclass(frozen=True)
class Recipe:
    """Everything besides the file's bytes that decides an instance's arrays."""

    horizon: int
    max_gap: str
    train_end: str
    val_end: str
    data_policy: str
    target: str = "return"

    @classmethod
    def of(cls, settings: Settings) -> Recipe:
        """The recipe a run config implies: every instance of the run builds the same way."""
        return cls(
            settings.horizon,
            settings.max_gap,
            settings.train_end,
            settings.val_end,
            settings.data_policy,
            settings.target,
        )

    def key(self, source: DataSource) -> str:
        # The file's bytes, or for a synthetic series its spec and generator version.
        _, asset = split_asset(source.path)
        text = json.dumps(
            [
                source_digest(source.path),
                asset,
                FEATURE_VERSION,
                CACHE_LAYOUT,
                self.horizon,
                self.max_gap,
                self.train_end,
                self.val_end,
                self.data_policy,
                self.target,
            ]
        )
        return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class InstanceData:
    """Scaled features and targets per split; the scaler statistics stay with the instance."""

    instance_id: str
    arrays: dict[str, np.ndarray]
    """``X_train, y_train, t_train`` (bar times, int64 ns) and the same for val and test;
    ``scaler_mean, scaler_scale``: what the X arrays were normalised with."""
    report: dict

    def X(self, split: str) -> np.ndarray:
        return self.arrays[f"X_{split}"]

    def y(self, split: str) -> np.ndarray:
        return self.arrays[f"y_{split}"]

    def rows(self, split: str) -> int:
        return len(self.arrays[f"y_{split}"])

    def raw(self, split: str) -> np.ndarray:
        """Unscaled features (float64), for the federated scaler's statistics.

        Ready arrays from the Python API (:func:`load_arrays`) carry no scaler: their features
        are taken as given.
        """
        if "scaler_mean" not in self.arrays:
            return self.X(split).astype(np.float64)
        return Scaler(self.arrays["scaler_mean"], self.arrays["scaler_scale"]).inverse(
            self.X(split)
        )

    def rescaled(self, scaler: Scaler) -> InstanceData:
        """The same rows normalised by ``scaler`` (the federated pooled one) instead."""
        if len(scaler.mean) != self.X("train").shape[1]:
            raise ValueError(
                f"{self.instance_id}: scaler has {len(scaler.mean)} features, the data "
                f"{self.X('train').shape[1]}"
            )
        arrays = dict(self.arrays)
        for split in SPLITS:
            if f"X_{split}" in arrays:
                arrays[f"X_{split}"] = scaler.transform(self.raw(split))
        arrays.update(scaler_mean=scaler.mean, scaler_scale=scaler.scale)
        return InstanceData(self.instance_id, arrays, {**self.report, "scaler": "federated"})


def build(source: DataSource, recipe: Recipe) -> InstanceData:
    """Load, featurise, split on the shared calendar, and scale on training rows alone."""
    from sigmax_fl.data.formats import load_ohlcv  # pandas: only where features are built

    bars = load_ohlcv(source.path, policy=recipe.data_policy)
    X, y = make_features(bars, recipe.horizon, max_gap=recipe.max_gap, target=recipe.target)
    calendar = Calendar.from_strings(recipe.train_end, recipe.val_end, embargo=recipe.horizon)
    positions = calendar.split(X.index)
    if len(positions["train"]) == 0:
        raise ValueError(
            f"{source.path}: no training rows on or before train-end {recipe.train_end} "
            f"(its bars run {bars.index[0].date()} .. {bars.index[-1].date()})"
        )
    values = X.to_numpy(np.float32)
    scaler = Scaler.fit(values[positions["train"]])
    arrays: dict[str, np.ndarray] = {}
    stamps = X.index.as_unit("ns").asi8
    for split in SPLITS:
        pos = positions[split]
        arrays[f"X_{split}"] = scaler.transform(values[pos])
        arrays[f"y_{split}"] = y.to_numpy(np.float32)[pos]
        arrays[f"t_{split}"] = stamps[pos]
    arrays.update(scaler_mean=scaler.mean, scaler_scale=scaler.scale)
    report = {
        "instance_id": source.instance_id,
        "venue": source.venue,
        "source": source.path,
        "bars": bars.attrs["report"],
        "dropped_rows": X.attrs["dropped"],
        "rows": {split: len(positions[split]) for split in SPLITS},
        "dates": {
            split: [str(X.index[p[0]].date()), str(X.index[p[-1]].date())] if len(p) else None
            for split, p in positions.items()
        },
    }
    return InstanceData(source.instance_id, arrays, report)


ARRAYS_SUFFIX = ".npz"
"""A ``data-path`` with this ending holds ready arrays, not bars: see :func:`load_arrays`."""


def load_arrays(source: DataSource) -> InstanceData:
    """An instance's already-featurised arrays: ``X_train, y_train, X_val, y_val``.

    The Python API (:mod:`sigmax_fl.manager`) writes them from an instance's own data
    loaders, whose features, splits and scaling its own code chose; so none of that is
    redone here, and nothing is cached (the file already is the arrays).
    """
    with np.load(source.path) as stored:
        arrays = {name: stored[name] for name in stored.files}
    needed = [f"{a}_{split}" for split in ("train", "val") for a in ("X", "y")]
    missing = [name for name in needed if name not in arrays]
    if missing:
        raise DataError(source.path, f"missing arrays {missing}", field="data-path")
    for split in ("train", "val"):
        if len(arrays[f"X_{split}"]) != len(arrays[f"y_{split}"]):
            raise DataError(source.path, f"X_{split} and y_{split} differ in rows")
    report = {
        "instance_id": source.instance_id,
        "source": source.path,
        "rows": {split: len(arrays[f"y_{split}"]) for split in ("train", "val")},
    }
    return InstanceData(source.instance_id, arrays, report)


def default_cache_dir() -> Path:
    """``$SIGMAX_FL_CACHE_DIR``, else the user's cache: the instance's own disk."""
    if env := os.environ.get(CACHE_DIR_ENV):
        return Path(env).expanduser()
    return Path.home() / ".cache" / "sigmax-fl" / "features"


CACHED_ARRAYS = frozenset(
    [f"{kind}_{split}" for kind in "Xyt" for split in SPLITS] + ["scaler_mean", "scaler_scale"]
)
"""The arrays :func:`build` makes: what a feature cache file must hold."""
CACHED_REPORT = frozenset(
    ["instance_id", "venue", "source", "bars", "dropped_rows", "rows", "dates"]
)
"""The fields of the report :func:`build` makes, which the comparisons read."""


class _UnusableCacheError(Exception):
    """A cache file that cannot be read, or does not hold what :func:`build` makes."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"{path} ({why})")


def _cached(instance_id: str, npz: Path, meta: Path) -> InstanceData | None:
    """The cached arrays; None if there are none, or if they cannot be used.

    A cache that cannot be used (left empty by a power cut under a version that did not sync
    it, damaged since, or not as :func:`build` makes it) is built again from the source, with
    a warning that names the file, instead of failing every message of the instance until
    someone deletes it. Nothing of it is trained on: the source is checked and featurised anew.
    """
    if not (npz.is_file() and meta.is_file()):
        return None
    try:
        arrays, report = _read_cache(npz, meta)
    except _UnusableCacheError as err:
        log.warning(
            "%s: cannot use the feature cache %s; building it again from the source",
            instance_id,
            err,
        )
        return None
    return InstanceData(instance_id, arrays, report)


def _read_cache(npz: Path, meta: Path) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays and report of a cache; :class:`_UnusableCacheError` naming the file at fault."""
    try:
        with np.load(npz) as stored:
            arrays = dict(stored)
    except Exception as err:  # a derived file: whatever broke it (zip, npy, I/O), rebuild it
        raise _UnusableCacheError(npz, f"{type(err).__name__}: {err}") from err
    if arrays.keys() != CACHED_ARRAYS:
        raise _UnusableCacheError(npz, f"holds {sorted(arrays)}, expected {sorted(CACHED_ARRAYS)}")
    for split in SPLITS:
        X, y, t = (arrays[f"{kind}_{split}"] for kind in "Xyt")
        if X.ndim != 2 or y.ndim != 1 or t.ndim != 1 or not len(X) == len(y) == len(t):
            raise _UnusableCacheError(
                npz, f"X, y and t of {split} have shapes {X.shape}, {y.shape}, {t.shape}"
            )
    try:
        report = json.loads(meta.read_text(encoding="utf-8"))
    except Exception as err:  # as above: unreadable, not UTF-8, not JSON
        raise _UnusableCacheError(meta, f"{type(err).__name__}: {err}") from err
    if not isinstance(report, dict) or not report.keys() >= CACHED_REPORT:
        raise _UnusableCacheError(meta, f"expected a JSON object with {sorted(CACHED_REPORT)}")
    return arrays, report


def load_instance(
    source: DataSource, recipe: Recipe, cache_dir: Path | None = None
) -> InstanceData:
    """The instance's arrays from memory, else from its disk cache, else built and cached."""
    if source.path.endswith(ARRAYS_SUFFIX):
        return load_arrays(source)
    key = f"{source.instance_id}-{recipe.key(source)}"
    if key in _MEMORY:
        return _MEMORY[key]
    folder = cache_dir or default_cache_dir()
    npz, meta = folder / f"{key}.npz", folder / f"{key}.json"
    data = _cached(source.instance_id, npz, meta)
    if data is None:
        data = build(source, recipe)
        make_folders(folder, PRIVATE_FOLDER)
        # Owner-only (PRIVATE): the features are the instance's market data. The arrays go
        # first: a crash between the two leaves no report, and the next process builds both.
        arrays = data.arrays
        write_durably(npz, lambda handle: np.savez(handle, **arrays), PRIVATE)
        report = json.dumps(data.report, indent=1).encode("utf-8")
        write_durably(meta, lambda handle: handle.write(report), PRIVATE)
        log.info("%s: features built and cached in %s", source.instance_id, npz)
    _MEMORY[key] = data
    return data

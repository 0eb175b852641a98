"""Is the federation worth it? Local-only, pooled and federated models on the same splits.

For every seed, three kinds of model start from the same initial weights and are trained by
the same :func:`sigmax_fl.task.train` loop on the same shared-calendar splits and features:

- **local-only**: one model per instance, on that instance's training rows alone;
- **pooled**: one model on all instances' training rows (the reference that privacy rules out
  in production);
- **federated**: FedAvg computed in-process. Each round every instance trains the global model
  on its own rows and the updates are averaged by :func:`sigmax_fl.strategy.weighted_average`,
  the app's own aggregation code. Flower's transport (messages through a SuperLink) is not
  used; it carries the same arrays and does not change the maths.

Fair by construction: every kind makes ``rounds x local_epochs`` passes over each instance's
training rows, in ``rounds`` calls of ``task.train`` (a fresh optimiser each call, as in FedAvg);
the learning rate and the round to keep are chosen on validation loss alone; each kept model
predicts the test split once, after selection, and those predictions are scored next to naive
baselines with block-bootstrap confidence intervals.

Use cases register in :data:`USE_CASES` (and, with their own tables, :data:`OUTPUTS`):
``multi-market`` (one next-bar return model across venues and assets, here),
``multi-strategy`` (:mod:`sigmax_fl.compare_strategy`) and ``risk`` (a realised-volatility
model, :mod:`sigmax_fl.compare_risk`).
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import json
import logging
import math
import multiprocessing
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from sigmax_fl import metrics, scaling, task
from sigmax_fl.data import DataSource, load_ohlcv, parse_sources
from sigmax_fl.dataset import InstanceData, Recipe, default_cache_dir, load_instance
from sigmax_fl.model import build_model
from sigmax_fl.runs import outputs_root
from sigmax_fl.settings import SCALERS, Settings
from sigmax_fl.strategy import weighted_average

log = logging.getLogger(__name__)

FEDERATION_NOTE = (
    "The federated model is trained in-process: each round, every instance trains the global "
    "model with the same `task.train` as the other kinds, and the updates are averaged by "
    "`sigmax_fl.strategy.weighted_average`, the app's own aggregation code (weights "
    "n_k / n_total capped at `max-weight-share`, float64 accumulation). Flower's transport is "
    "not used: it carries the same arrays and does not change the maths. The app's per-reply "
    "screening is not applied, as in a round where every update passes it."
)

KINDS = ("federated", "pooled", "local")
BASELINES = ("zero", "last_reversed", "always_long")
LABELS = {
    "federated": "federated (FedAvg)",
    "pooled": "pooled (reference)",
    "local": "local-only",
    "zero": "predict zero",
    "last_reversed": "last return reversed",
    "always_long": "always long",
}
METRICS = ("mse", "r2_oos", "hit_rate", "ic", "rank_ic", "sharpe")
METRIC_LABELS = {
    "mse": "MSE",
    "r2_oos": "R² vs 0",
    "hit_rate": "hit rate",
    "ic": "IC",
    "rank_ic": "rank IC",
    "sharpe": "Sharpe (net)",
}
NOT_APPLICABLE = {
    "zero": {"hit_rate", "ic", "rank_ic", "sharpe"},
    "always_long": {"mse", "r2_oos", "ic", "rank_ic"},
}
"""Metrics a baseline has no meaningful value for: "predict zero" never takes a position and
has no variation; "always long" is a position, not a return forecast."""
DIFFERENCES = (("federated", "local"), ("federated", "pooled"))
"""Paired differences reported with their own bootstrap interval."""
POOLED_SCOPE = "all instances"
TORCH_THREADS = 1
"""Measured on this 2-core machine (shared, loaded): one thread trains the 15k-parameter MLP in
0.18-0.26 s an epoch over the 3,348 bundled training rows, two threads in 0.20-2.1 s; the
second core is better spent on a second seed (``workers``)."""


@dataclass(frozen=True)
class Training:
    """How every kind of model is trained and selected; identical for all three kinds."""

    rounds: int
    local_epochs: int
    batch_size: int
    learning_rates: tuple[float, ...]
    optimizer: str
    model: str
    max_weight_share: float

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.local_epochs < 1:
            raise ValueError(
                f"rounds ({self.rounds}) and local epochs ({self.local_epochs}) must be >= 1"
            )
        if not self.learning_rates or min(self.learning_rates) <= 0:
            raise ValueError(f"learning rates must be positive, got {self.learning_rates}")

    def record(self) -> dict[str, object]:
        """These settings as every use case's compare.json records them under ``config``."""
        return {**asdict(self), "learning_rates": list(self.learning_rates)}


@dataclass(frozen=True)
class Request:
    """Everything a use case needs to run one comparison."""

    sources: tuple[DataSource, ...]
    recipe: Recipe
    training: Training
    seeds: tuple[int, ...]
    cost_bps: float
    n_boot: int
    workers: int
    fine_tune_epochs: int = 1
    """Epochs each instance fine-tunes the global model for (multi-strategy's fine-tune kind)."""
    scaler: str = "local"
    """``local``: each instance's own training statistics; ``federated``: pooled ones."""


@dataclass(frozen=True)
class Market:
    """One instance's arrays, plus what its baselines and Sharpe ratio need."""

    data: InstanceData
    last_return: np.ndarray
    """Log return over the ``horizon`` bars up to each test bar (the reversal baseline)."""
    bar_interval: pd.Timedelta

    @property
    def instance_id(self) -> str:
        return self.data.instance_id

    def times(self, split: str) -> pd.DatetimeIndex:
        return pd.to_datetime(self.data.arrays[f"t_{split}"], utc=True)


def load_markets(
    sources: Sequence[DataSource], recipe: Recipe, scaler: str = "local"
) -> list[Market]:
    """Each instance's scaled arrays (via the feature cache) and its raw last returns.

    ``scaler = "federated"`` normalises every instance with the statistics pooled over all
    instances' training rows, merged from per-instance moments as the app's round 0 does.
    """
    if scaler not in SCALERS:
        raise ValueError(f"scaler '{scaler}': expected one of {list(SCALERS)}")
    markets = []
    for source in sources:
        data = load_instance(source, recipe)
        times = pd.to_datetime(data.arrays["t_test"], utc=True)
        expected = data.report["dates"]["test"]
        if expected is None or len(times) == 0:
            raise ValueError(f"{source.instance_id}: no test rows after val-end {recipe.val_end}")
        if str(times[0].date()) != expected[0]:
            raise ValueError(
                f"{source.instance_id}: cached bar times start {times[0]} but the cache's own "
                f"report says {expected[0]}; the feature cache in {default_cache_dir()} was "
                "written by an older sigmax-fl. Delete it and run again."
            )
        bars = load_ohlcv(source.path, policy=recipe.data_policy)
        last = np.log(bars["close"]).diff(recipe.horizon).reindex(times).to_numpy()
        markets.append(Market(data, last, bars.attrs["bar_interval"]))
    if scaler == "federated":
        pooled = scaling.pool([scaling.Moments.of(m.data.raw("train")) for m in markets])
        markets = [replace(m, data=m.data.rescaled(pooled.scaler())) for m in markets]
    return markets


# ---------------------------------------------------------------------------------------------
# Training and selection (train and validation rows only; the test split is not passed in)


@dataclass(frozen=True)
class Selection:
    """What validation chose for one model: learning rate, round, and the curves behind it."""

    learning_rate: float
    best_round: int
    val_loss: tuple[float, ...]
    """Validation MSE per round over the rows the choice was made on, at the chosen rate."""
    instance_val_loss: dict[str, tuple[float, ...]]
    """Validation MSE per round on each instance's own rows, at the chosen rate."""


@dataclass
class KindFit:
    """One kind's models for one seed: their selections and their single test prediction."""

    selections: dict[str, Selection]
    """Keyed by instance id for local-only models, by ``"all"`` for the one shared model."""
    states: dict[str, dict[str, torch.Tensor]]
    """The kept weights, keyed like ``selections``."""
    test_pred: dict[str, np.ndarray] = field(default_factory=dict)

    def unit(self, instance_id: str) -> str:
        """The key of the model that serves ``instance_id``."""
        return instance_id if instance_id in self.selections else "all"


Step = Callable[[torch.nn.Module, int, float], None]
"""Advance a model in place by one round: (model, round 1..R, learning rate)."""
Predict = Callable[[torch.nn.Module, Market, float], np.ndarray]
"""(model, instance, learning rate) -> that instance's validation forecasts."""


def round_seed(seed: int, server_round: int, name: str) -> int:
    """Batch-shuffling seed of one instance's training in one round.

    The same formula for every kind, so an instance's first round is identical in its
    local-only and its federated model: they differ only by what averaging does.
    """
    return seed * 1_000_003 + server_round * 7919 + zlib.crc32(name.encode())


def _local_step(training: Training, seed: int, name: str, X: np.ndarray, y: np.ndarray) -> Step:
    def step(model: torch.nn.Module, server_round: int, lr: float) -> None:
        task.train(
            model,
            X,
            y,
            epochs=training.local_epochs,
            batch_size=training.batch_size,
            learning_rate=lr,
            optimizer=training.optimizer,
            seed=round_seed(seed, server_round, name),
        )

    return step


def _federated_step(training: Training, seed: int, markets: Sequence[Market]) -> Step:
    examples = [m.data.rows("train") for m in markets]
    local_steps = [
        _local_step(training, seed, m.instance_id, m.data.X("train"), m.data.y("train"))
        for m in markets
    ]

    def step(model: torch.nn.Module, server_round: int, lr: float) -> None:
        sent = {k: v.detach().clone() for k, v in model.state_dict().items()}
        updates = []
        for local_step in local_steps:
            model.load_state_dict(sent)
            local_step(model, server_round, lr)
            updates.append({k: v.detach().numpy().copy() for k, v in model.state_dict().items()})
        average = weighted_average(updates, examples, training.max_weight_share)
        model.load_state_dict({k: torch.from_numpy(average[k]).to(sent[k].dtype) for k in sent})

    return step


def _select(
    training: Training,
    seed: int,
    step: Step,
    markets: Sequence[Market],
    *,
    build: Callable[[], torch.nn.Module] | None = None,
    predict: Predict | None = None,
) -> tuple[Selection, dict[str, torch.Tensor]]:
    """Train ``rounds`` rounds per learning rate; keep the (rate, round) of least val loss.

    The loss is the MSE over all the given instances' validation rows, i.e. the example-weighted
    mean of their losses, as the ServerApp aggregates ``val_loss``. ``build`` (default: the
    seeded model) and ``predict`` (default: the model's own forecast) let a personalised kind
    keep per-instance parts in its module and forecast each instance as that instance would.
    """
    y_all = np.concatenate([m.data.y("val") for m in markets])
    best: tuple[float, Selection, dict[str, torch.Tensor]] | None = None
    for lr in training.learning_rates:
        model = build() if build else build_model(training.model, seed=seed)
        curve: list[float] = []
        per_instance: dict[str, list[float]] = {m.instance_id: [] for m in markets}
        kept: tuple[float, int, dict[str, torch.Tensor]] = (math.inf, 0, {})
        for server_round in range(1, training.rounds + 1):
            step(model, server_round, lr)
            preds = [
                predict(model, m, lr) if predict else task.predict(model, m.data.X("val"))
                for m in markets
            ]
            for market, pred in zip(markets, preds, strict=True):
                per_instance[market.instance_id].append(metrics.mse(pred, market.data.y("val")))
            curve.append(metrics.mse(np.concatenate(preds), y_all))
            if curve[-1] < kept[0]:  # NaN (a diverged model) never wins
                kept = (
                    curve[-1],
                    server_round,
                    {k: v.clone() for k, v in model.state_dict().items()},
                )
        if kept[1] and (best is None or kept[0] < best[0]):
            selection = Selection(
                lr,
                kept[1],
                tuple(curve),
                {name: tuple(c) for name, c in per_instance.items()},
            )
            best = (kept[0], selection, kept[2])
    if best is None:
        ids = [m.instance_id for m in markets]
        raise RuntimeError(
            f"validation loss of {ids} was NaN in every round at every learning rate "
            f"{training.learning_rates}: training diverged"
        )
    return best[1], best[2]


def _predict_test(model_name: str, state: dict[str, torch.Tensor], market: Market) -> np.ndarray:
    model = build_model(model_name)
    model.load_state_dict(state)
    return task.predict(model, market.data.X("test"))


def fit_seed(markets: Sequence[Market], training: Training, seed: int) -> dict[str, KindFit]:
    """Train and select the three kinds for one seed, then predict each test split once."""
    fits: dict[str, KindFit] = {}

    # Federated: the global model, chosen on the pooled validation loss the server sees
    selection, state = _select(training, seed, _federated_step(training, seed, markets), markets)
    fits["federated"] = KindFit({"all": selection}, {"all": state})

    # Pooled: one model on every instance's training rows
    X = np.concatenate([m.data.X("train") for m in markets])
    y = np.concatenate([m.data.y("train") for m in markets])
    selection, state = _select(training, seed, _local_step(training, seed, "pooled", X, y), markets)
    fits["pooled"] = KindFit({"all": selection}, {"all": state})

    # Local-only: each instance alone, chosen on its own validation rows
    fits["local"] = KindFit({}, {})
    for m in markets:
        step = _local_step(training, seed, m.instance_id, m.data.X("train"), m.data.y("train"))
        fits["local"].selections[m.instance_id], fits["local"].states[m.instance_id] = _select(
            training, seed, step, [m]
        )

    # Only now, once per kept model and instance: predict the test split
    for fit in fits.values():
        for m in markets:
            state = fit.states[fit.unit(m.instance_id)]
            fit.test_pred[m.instance_id] = _predict_test(training.model, state, m)
    return fits


def fit_seeds(
    markets: Sequence[Market],
    training: Training,
    seeds: Sequence[int],
    workers: int,
    fit: Callable[[Sequence[Market], Training, int], dict[str, KindFit]] = fit_seed,
) -> list[dict[str, KindFit]]:
    """``fit`` (:func:`fit_seed`) for every seed, in ``workers`` processes (1: in this one)."""
    if workers <= 1 or len(seeds) == 1:
        out = []
        for seed in seeds:
            started = time.monotonic()
            out.append(fit(markets, training, seed))
            log.info("compare: seed %d trained in %.1fs", seed, time.monotonic() - started)
        return out
    # spawn, not fork: a forked child inherits torch's thread pools in an undefined state.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=torch.set_num_threads, initargs=(TORCH_THREADS,)
    ) as pool:
        futures = [pool.submit(fit, markets, training, seed) for seed in seeds]
        for seed, future in zip(seeds, futures, strict=True):
            future.add_done_callback(lambda _, s=seed: log.info("compare: seed %d trained", s))
        return [f.result() for f in futures]


# ---------------------------------------------------------------------------------------------
# Scoring on the test split


def _portfolio_returns(
    pred: np.ndarray, realised: np.ndarray, cost_bps: float, horizon: int
) -> np.ndarray:
    """Per-bar net return of an equal-weight portfolio of the instances trading that bar.

    ``pred`` and ``realised`` are (instances, bars) panels with NaN where an instance has no
    bar; with one instance this is that instance's own strategy.
    """
    rets = np.vstack(
        [
            metrics.strategy_returns(p, r, cost_bps=cost_bps, horizon=horizon)
            for p, r in zip(pred, realised, strict=True)
        ]
    )
    held = (~np.isnan(rets)).sum(axis=0)
    return np.where(held > 0, np.nansum(rets, axis=0) / np.maximum(held, 1), np.nan)


Metric = Callable[[np.ndarray, np.ndarray], float]
"""(pred, realised) -> statistic."""


def _metric_fns(periods_per_year: float, cost_bps: float, horizon: int) -> dict[str, Metric]:
    """Each metric on an (instances, bars) panel; forecast metrics pool every valid cell."""

    def sharpe(pred: np.ndarray, realised: np.ndarray) -> float:
        returns = _portfolio_returns(pred, realised, cost_bps, horizon)
        return metrics.sharpe_ratio(returns, periods_per_year=periods_per_year / horizon)

    return {
        "mse": metrics.mse,
        "r2_oos": metrics.r2_oos,
        "hit_rate": metrics.hit_rate,
        "ic": metrics.ic,
        "rank_ic": metrics.rank_ic,
        "sharpe": sharpe,
    }


def _seed_mean(fn: Metric) -> Metric:
    """A metric of (seeds, instances, bars) predictions: its mean over seeds."""

    def over_seeds(pred: np.ndarray, realised: np.ndarray) -> float:
        return float(np.mean([fn(p, realised) for p in pred]))

    return over_seeds


@dataclass(frozen=True)
class Scope:
    """Test bars of one instance, or of all instances on the union of their bar times."""

    name: str
    realised: np.ndarray
    """(instances, bars), NaN where an instance has no bar."""
    preds: dict[str, np.ndarray]
    """Model or baseline -> (seeds, instances, bars); baselines have one 'seed'."""
    periods_per_year: float
    times: pd.DatetimeIndex


def build_scopes(
    markets: Sequence[Market],
    fits: Sequence[dict[str, KindFit]],
    baselines: dict[str, dict[str, np.ndarray]] | None = None,
) -> list[Scope]:
    """One scope per instance, then the panel of all instances on their union of test bars.

    ``baselines`` maps instance id -> baseline name -> test forecast; default: the return
    baselines of :data:`BASELINES`.
    """
    if baselines is None:
        baselines = {
            m.instance_id: {
                "zero": np.zeros(m.data.rows("test")),
                "last_reversed": -m.last_return,
                "always_long": np.ones(m.data.rows("test")),
            }
            for m in markets
        }
    names = tuple(baselines[markets[0].instance_id])

    def stacked(kind: str, instance_id: str) -> np.ndarray:
        if kind in names:
            return baselines[instance_id][kind][None, :]
        return np.stack([fit[kind].test_pred[instance_id] for fit in fits])

    models = (*fits[0], *names)
    scopes = []
    for m in markets:
        scopes.append(
            Scope(
                m.instance_id,
                m.data.y("test").astype(np.float64)[None, :],
                {k: stacked(k, m.instance_id)[:, None, :] for k in models},
                metrics.periods_per_year(m.bar_interval),
                m.times("test"),
            )
        )
    union = markets[0].times("test")
    for m in markets[1:]:
        union = union.union(m.times("test"))
    positions = [union.get_indexer(m.times("test")) for m in markets]

    def panel(values: Sequence[np.ndarray]) -> np.ndarray:
        """Per instance ([seeds,] bars) -> ([seeds,] instances, union bars), NaN in gaps."""
        lead = values[0].shape[:-1]
        out = np.full((*lead, len(markets), len(union)), np.nan)
        for k, (v, pos) in enumerate(zip(values, positions, strict=True)):
            out[..., k, pos] = v
        return out

    intervals = {m.bar_interval for m in markets}
    scopes.append(
        Scope(
            POOLED_SCOPE,
            panel([m.data.y("test").astype(np.float64) for m in markets]),
            {k: panel([stacked(k, m.instance_id) for m in markets]) for k in models},
            # A portfolio of daily and hourly strategies has no single annualisation.
            metrics.periods_per_year(intervals.pop()) if len(intervals) == 1 else math.nan,
            union,
        )
    )
    return scopes


def _estimate(value: float, interval: tuple[float, float], seed_sd: float | None) -> dict:
    out: dict[str, float | None] = {"value": value, "ci_low": interval[0], "ci_high": interval[1]}
    if seed_sd is not None:
        out["seed_sd"] = seed_sd
    return out


def score_scope(
    scope: Scope,
    cost_bps: float,
    horizon: int,
    n_boot: int,
    boot_seed: int = 0,
    *,
    fns: dict[str, Metric] | None = None,
    differences: Sequence[tuple[str, str]] = DIFFERENCES,
    not_applicable: dict[str, set[str]] = NOT_APPLICABLE,
) -> dict[str, Any]:
    """Every model's and baseline's metrics with 95 % intervals, and the paired differences.

    All statistics of a scope are computed on the same bootstrap resamples of its bars
    (``boot_seed``), so a difference's interval comes from the element-wise differences and
    accounts for the noise the two models share. ``fns`` default to the return metrics.
    """
    if fns is None:
        fns = _metric_fns(scope.periods_per_year, cost_bps, horizon)
    results: dict[str, dict[str, dict]] = {}
    draws: dict[tuple[str, str], np.ndarray] = {}
    for name, pred in scope.preds.items():
        results[name] = {}
        for metric, fn in fns.items():
            if metric in not_applicable.get(name, ()):
                results[name][metric] = _estimate(math.nan, (math.nan, math.nan), None)
                continue
            per_seed = [fn(p, scope.realised) for p in pred]
            draws[name, metric] = metrics.bootstrap_distribution(
                _seed_mean(fn), pred, scope.realised, n=n_boot, seed=boot_seed
            )
            sd = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else None
            results[name][metric] = _estimate(
                float(np.mean(per_seed)), metrics.percentile_interval(draws[name, metric]), sd
            )
    paired = {
        f"{a} - {b}": {
            metric: _estimate(
                results[a][metric]["value"] - results[b][metric]["value"],
                metrics.percentile_interval(draws[a, metric] - draws[b, metric]),
                None,
            )
            for metric in fns
        }
        for a, b in differences
    }
    return {
        "bars": int(np.sum(~np.isnan(scope.realised).all(axis=0))),
        "rows": int(np.sum(~np.isnan(scope.realised))),
        "dates": [str(scope.times[0].date()), str(scope.times[-1].date())],
        "periods_per_year": scope.periods_per_year,
        "models": results,
        "differences": paired,
    }


def target_correlation(
    markets: Sequence[Market], splits: Sequence[str] = ("train", "val", "test")
) -> dict[str, dict[str, float | None]]:
    """Pearson correlation of the instances' realised targets (returns, log vol) on common bars.

    Near-duplicate instances (one asset on two venues) add little new information: pooling
    or federating them mostly re-weights that asset, which this makes visible.
    """
    columns = {}
    for m in markets:
        times = np.concatenate([m.data.arrays[f"t_{s}"] for s in splits])
        values = np.concatenate([m.data.y(s) for s in splits])
        columns[m.instance_id] = pd.Series(values, index=pd.to_datetime(times, utc=True))
    corr = pd.DataFrame(columns).corr(min_periods=30)
    return {
        a: {b: float(corr.loc[a, b]) if np.isfinite(corr.loc[a, b]) else None for b in corr}
        for a in corr.index
    }


# ---------------------------------------------------------------------------------------------
# Use cases


def _selection_summary(fits: Sequence[dict[str, KindFit]]) -> dict[str, dict[str, dict]]:
    """Kind -> model -> the learning rate and round kept for each seed."""
    return {
        kind: {
            unit: {
                "learning_rate": [fit[kind].selections[unit].learning_rate for fit in fits],
                "best_round": [fit[kind].selections[unit].best_round for fit in fits],
            }
            for unit in fits[0][kind].selections
        }
        for kind in fits[0]
    }


def _val_curves(
    fits: Sequence[dict[str, KindFit]], markets: Sequence[Market]
) -> dict[str, dict[str, list[float]]]:
    """Kind -> instance -> validation MSE per round on that instance, mean over seeds."""
    return {
        kind: {
            m.instance_id: np.mean(
                [
                    fit[kind]
                    .selections[fit[kind].unit(m.instance_id)]
                    .instance_val_loss[m.instance_id]
                    for fit in fits
                ],
                axis=0,
            ).tolist()
            for m in markets
        }
        for kind in fits[0]
    }


def _net_returns(scope: Scope, cost_bps: float, horizon: int) -> dict[str, list]:
    """Per-bar net strategy return on the test bars, mean over seeds, for the P&L plot."""
    out: dict[str, list] = {"times": [str(x) for x in scope.times]}
    for name, pred in scope.preds.items():
        if name != "zero":  # never trades
            per_seed = [_portfolio_returns(p, scope.realised, cost_bps, horizon) for p in pred]
            out[name] = np.mean(per_seed, axis=0).tolist()
    return out


def multi_market(
    request: Request,
    *,
    use_case: str = "multi-market",
    fit: Callable[[Sequence[Market], Training, int], dict[str, KindFit]] = fit_seed,
    differences: Sequence[tuple[str, str]] = DIFFERENCES,
) -> dict[str, Any]:
    """One next-bar return model across venues and assets: the three kinds and baselines.

    A return-forecast use case that trains other kinds (``fit``) and reports other paired
    ``differences`` reuses it whole.
    """
    started = time.monotonic()
    markets = load_markets(request.sources, request.recipe, request.scaler)
    fits = fit_seeds(markets, request.training, request.seeds, request.workers, fit)
    trained = time.monotonic()
    scopes = build_scopes(markets, fits)
    horizon = request.recipe.horizon
    return {
        "use_case": use_case,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "note": FEDERATION_NOTE,
        "config": {
            "data_sources": [s.instance_id for s in request.sources],
            **request.training.record(),
            "scaler": request.scaler,
            "seeds": list(request.seeds),
            "cost_bps": request.cost_bps,
            "horizon": horizon,
            "train_end": request.recipe.train_end,
            "val_end": request.recipe.val_end,
            "bootstrap": {"resamples": request.n_boot, "mean_block": "ceil(sqrt(test bars))"},
        },
        "instances": {
            m.instance_id: {
                "rows": m.data.report["rows"],
                "dates": m.data.report["dates"],
                "bar_interval": str(m.bar_interval),
            }
            for m in markets
        },
        "return_correlation": {
            "all splits": target_correlation(markets),
            "test": target_correlation(markets, ("test",)),
        },
        "selection": _selection_summary(fits),
        "val_loss_per_round": _val_curves(fits, markets),
        "val_loss_zero_forecast": {
            m.instance_id: metrics.mse(np.zeros(m.data.rows("val")), m.data.y("val"))
            for m in markets
        },
        "scopes": {
            s.name: score_scope(
                s, request.cost_bps, horizon, request.n_boot, differences=differences
            )
            for s in scopes
        },
        "test_net_returns": {s.name: _net_returns(s, request.cost_bps, horizon) for s in scopes},
        "seconds": {
            "training": round(trained - started, 1),
            "scoring": round(time.monotonic() - trained, 1),
        },
    }


def _risk(request: Request) -> dict[str, Any]:
    """The cross-portfolio volatility model (:mod:`sigmax_fl.compare_risk`, built on this one)."""
    from sigmax_fl.compare_risk import risk

    return risk(request)


def _risk_outputs(result: dict[str, Any], out_dir: Path) -> None:
    from sigmax_fl.compare_risk import write_outputs as write_risk_outputs

    write_risk_outputs(result, out_dir)


def _multi_strategy(request: Request) -> dict[str, Any]:
    """Personalised vs plain federated models (:mod:`sigmax_fl.compare_strategy`)."""
    from sigmax_fl.compare_strategy import multi_strategy

    return multi_strategy(request)


def _multi_strategy_outputs(result: dict[str, Any], out_dir: Path) -> None:
    from sigmax_fl.compare_strategy import write_outputs as write_strategy_outputs

    write_strategy_outputs(result, out_dir)


USE_CASES: dict[str, Callable[[Request], dict[str, Any]]] = {
    "multi-market": multi_market,
    "multi-strategy": _multi_strategy,
    "risk": _risk,
}
"""Use case name -> the function that runs it; each returns the result written out."""
OUTPUTS: dict[str, Callable[[dict[str, Any], Path], None]] = {
    "risk": _risk_outputs,
    "multi-strategy": _multi_strategy_outputs,
}
"""Use cases that write their own outputs; the others use :func:`write_outputs`."""


def compare(
    data_sources: str | None = None,
    rounds: int | None = None,
    out_dir: str | Path | None = None,
    seeds: int = 5,
    *,
    use_case: str = "multi-market",
    local_epochs: int | None = None,
    learning_rates: Sequence[float] | None = None,
    cost_bps: float = 10.0,
    n_boot: int = 1000,
    workers: int | None = None,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Run a comparison and write ``compare.json``, ``compare.md`` and plots to ``out_dir``.

    Parameters
    ----------
    data_sources : str, optional
        Comma-separated ``data-sources`` entries; default: the run config's (the bundled data).
    rounds : int, optional
        Rounds R; every kind makes R x ``local_epochs`` passes over each instance's rows.
        Default: ``num-server-rounds``.
    out_dir : str or Path, optional
        Default: ``<outputs>/compare-<use case>-<UTC time>``.
    seeds : int
        Independent repetitions (initial weights and batch order), seeds ``seed .. seed+n-1``.
    use_case : str
        A key of :data:`USE_CASES`.
    local_epochs : int, optional
        Default: the run config's ``local-epochs``.
    learning_rates : sequence of float, optional
        Candidates chosen among on validation loss; default: the run config's one rate.
    cost_bps : float
        Trading cost per unit of position changed, for the Sharpe ratio.
    n_boot : int
        Bootstrap resamples per confidence interval.
    workers : int, optional
        Processes training seeds in parallel; default: one per core, at most one per seed.
    settings : Settings, optional
        Everything else (batch size, optimiser, splits, horizon, data policy, seed, weight cap);
        default: the run config defaults.

    Returns
    -------
    dict
        The content of ``compare.json``, with ``out_dir`` added.
    """
    settings = settings or Settings()
    if use_case not in USE_CASES:
        raise ValueError(f"unknown use case '{use_case}'; known: {sorted(USE_CASES)}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    if settings.scaler != "local" and use_case != "multi-market":
        raise ValueError(f"scaler '{settings.scaler}' is compared for use case multi-market only")
    if settings.target != "return" and use_case != "risk":
        # Hit rate, IC and Sharpe of a volatility forecast would be numbers without meaning
        raise ValueError(
            f"use case '{use_case}' compares return forecasts; target '{settings.target}' is "
            "compared by use case 'risk'"
        )
    sources = parse_sources(data_sources or settings.data_sources, settings.data_dir)
    request = Request(
        sources=tuple(sources),
        recipe=Recipe.of(settings),
        training=Training(
            rounds=settings.num_server_rounds if rounds is None else rounds,
            local_epochs=settings.local_epochs if local_epochs is None else local_epochs,
            batch_size=settings.batch_size,
            learning_rates=tuple(learning_rates or (settings.learning_rate,)),
            optimizer=settings.optimizer,
            model=settings.model,
            max_weight_share=settings.max_weight_share,
        ),
        seeds=tuple(settings.seed + i for i in range(seeds)),
        cost_bps=cost_bps,
        n_boot=n_boot,
        workers=min(seeds, multiprocessing.cpu_count()) if workers is None else workers,
        fine_tune_epochs=settings.fine_tune_epochs,
        scaler=settings.scaler,
    )
    torch.set_num_threads(TORCH_THREADS)
    started = time.monotonic()
    result = USE_CASES[use_case](request)
    result["seconds"]["total"] = round(time.monotonic() - started, 1)
    if out_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        out_dir = outputs_root(settings.outputs_dir) / f"compare-{use_case}-{stamp}"
    out = Path(out_dir)
    OUTPUTS.get(use_case, write_outputs)(result, out)
    return {**result, "out_dir": str(out)}


# ---------------------------------------------------------------------------------------------
# Outputs


def _json_safe(value: Any) -> Any:
    """NaN and infinities -> null: compare.json is strict JSON any tool can read."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _fmt(metric: str, x: float | None, signed: bool) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    if metric == "mse":
        return f"{x:+.2e}" if signed else f"{x:.2e}"
    return f"{x:+.3f}" if signed or metric not in ("hit_rate", "qlike") else f"{x:.3f}"


def _cell(metric: str, estimate: dict, signed: bool) -> str:
    if estimate["value"] is None or not math.isfinite(estimate["value"]):
        return "—"
    low, high = (_fmt(metric, estimate[k], signed) for k in ("ci_low", "ci_high"))
    return f"{_fmt(metric, estimate['value'], signed)} [{low}, {high}]"


def _table(
    rows: dict[str, dict[str, dict]],
    labels: dict[str, str],
    *,
    signed: bool = False,
    columns: dict[str, str] = METRIC_LABELS,
) -> list[str]:
    """A markdown table of estimates; ``columns``: metric -> header, in order."""
    header = "| | " + " | ".join(columns.values()) + " |"
    lines = [header, "|---" * (len(columns) + 1) + "|"]
    for name, values in rows.items():
        cells = " | ".join(_cell(m, values[m], signed) for m in columns)
        lines.append(f"| {labels.get(name, name)} | {cells} |")
    return lines


def correlation_table(what: str, corr: dict[str, dict[str, float | None]]) -> list[str]:
    """Markdown lines of an instance x instance correlation matrix (common bars)."""
    ids = list(corr)
    lines = [
        "",
        f"## Correlation of {what}, common bars",
        "",
        "| | " + " | ".join(ids) + " |",
        "|---" * (len(ids) + 1) + "|",
    ]
    for a in ids:
        lines.append(f"| {a} | " + " | ".join(_fmt("ic", corr[a][b], False) for b in ids) + " |")
    return lines


def scope_sections(
    result: dict[str, Any],
    labels: dict[str, str],
    pooled_note: str = "",
    columns: dict[str, str] = METRIC_LABELS,
) -> list[str]:
    """Markdown: per scope (instance, then all instances) the models' and differences' tables.

    ``pooled_note`` follows the all-instances scope's row count (how its metrics pool).
    """
    lines: list[str] = []
    for name, scope in result["scopes"].items():
        title = name if name != POOLED_SCOPE else "All instances (pooled over instances)"
        lines += [
            f"## {title}",
            "",
            f"{scope['bars']} test bars, {scope['dates'][0]} .. {scope['dates'][1]}"
            + (f", {scope['rows']} instance-bars{pooled_note}." if name == POOLED_SCOPE else "."),
            "",
            *_table(scope["models"], labels, columns=columns),
            "",
            *_table(scope["differences"], {}, signed=True, columns=columns),
            "",
        ]
    return lines


def selection_lines(result: dict[str, Any], labels: dict[str, str]) -> list[str]:
    """Markdown: the round (and, if several were tried, learning rate) validation kept."""
    c = result["config"]
    lines = ["## Rounds kept by validation", ""]
    for kind, units in result["selection"].items():
        for unit, chosen in units.items():
            who = "" if unit == "all" else f" ({unit})"
            lines.append(
                f"- {labels[kind]}{who}: rounds {chosen['best_round']} of {c['rounds']}"
                + (
                    f", learning rates {chosen['learning_rate']}"
                    if len(c["learning_rates"]) > 1
                    else ""
                )
            )
    return lines


def render_markdown(result: dict[str, Any], labels: dict[str, str] = LABELS) -> str:
    """compare.md: set-up, one table per instance and one over all instances, differences."""
    c = result["config"]
    seeds = c["seeds"]
    scaled_by = (
        "the statistics pooled over all instances' training rows (scaler = federated)"
        if c.get("scaler") == "federated"
        else "each instance's own training statistics"
    )
    lines = [
        f"# Federated vs local-only vs pooled: {result['use_case']}",
        "",
        f"Instances: {', '.join(c['data_sources'])}. Split: train to {c['train_end']}, "
        f"validation to {c['val_end']}, test after (embargo {c['horizon']} bar(s) at each "
        f"boundary). Every model: {c['rounds']} rounds x {c['local_epochs']} local epochs "
        f"over each instance's training rows, batch {c['batch_size']}, {c['optimizer']}, "
        f"learning rate chosen from {c['learning_rates']} and round kept chosen on validation "
        f"loss only; {len(seeds)} seeds ({seeds[0]}..{seeds[-1]}); the test split is predicted "
        f"once per model. Features normalised by {scaled_by}. Cost {c['cost_bps']:g} bps "
        "per unit of position changed. Wall time "
        f"{result['seconds']['total']:.0f} s.",
        "",
        result["note"],
        "",
        "Cells: mean over seeds [95 % stationary block-bootstrap interval over test bars, mean "
        "block ceil(sqrt(bars)), "
        f"{c['bootstrap']['resamples']} resamples]. MSE and R² are against the realised "
        "log return; R² vs 0 is 1 - SSE / sum(r²), so the zero forecast scores 0. Sharpe: "
        "sign of the forecast held one horizon, annualised by the bar interval, net of costs. "
        "'—': not defined for that baseline (predict zero never trades and has no "
        "correlation; always long is a position, not a return forecast).",
        "",
    ]
    pooled_note = (
        "; forecast metrics over all instance-bars, Sharpe of the equal-weight portfolio of the "
        "instances trading each bar"
    )
    lines += scope_sections(result, labels, pooled_note)
    lines += selection_lines(result, labels)
    for period, corr in result["return_correlation"].items():
        lines += correlation_table(f"the instances' realised returns ({period})", corr)
    lines += [
        "",
        "![metrics](compare_metrics.png)",
        "",
        "![cumulative net returns](compare_pnl.png)",
        "",
        "![validation loss](compare_validation.png)",
        "",
    ]
    return "\n".join(lines)


COLORS = {
    "federated": "tab:blue",
    "pooled": "tab:green",
    "local": "tab:orange",
    "zero": "tab:gray",
    "last_reversed": "tab:purple",
    "always_long": "tab:brown",
}


def plot_metrics(result: dict[str, Any], path: Path) -> None:
    """Each metric per scope and model, with its 95 % interval as an error bar."""
    scopes = list(result["scopes"])
    models = list(next(iter(result["scopes"].values()))["models"])
    fig = Figure(figsize=(15, 8), layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    width = 0.8 / len(models)
    for ax, metric in zip(axes, METRICS, strict=True):
        for j, model in enumerate(models):
            xs, ys, err = [], [], [[], []]
            for i, scope in enumerate(scopes):
                e = result["scopes"][scope]["models"][model][metric]
                if e["value"] is None or not math.isfinite(e["value"]):
                    continue
                xs.append(i + (j - (len(models) - 1) / 2) * width)
                ys.append(e["value"])
                low, high = e["ci_low"], e["ci_high"]
                ok = low is not None and high is not None and math.isfinite(low + high)
                # A percentile interval need not contain the estimate (a biased statistic
                # such as Sharpe on a few hundred bars): clip instead of a negative bar.
                err[0].append(max(e["value"] - low, 0.0) if ok else 0.0)
                err[1].append(max(high - e["value"], 0.0) if ok else 0.0)
            ax.bar(xs, ys, width, yerr=err, capsize=2, color=COLORS[model])
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title(METRIC_LABELS[metric])
        ax.set_xticks(range(len(scopes)), scopes, rotation=20, ha="right", fontsize=8)
    handles = [Patch(color=COLORS[m], label=LABELS[m]) for m in models]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(models), fontsize=9)
    fig.suptitle("Test split: mean over seeds, 95 % block-bootstrap intervals")
    fig.savefig(path, dpi=110)


def plot_pnl(result: dict[str, Any], path: Path) -> None:
    """Cumulative net log return of trading each model's sign on the test split."""
    scopes = result["test_net_returns"]
    fig = Figure(figsize=(15, 3.2 * math.ceil(len(scopes) / 3)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(math.ceil(len(scopes) / 3), 3)).ravel()
    for ax, (name, series) in zip(axes, scopes.items(), strict=False):
        times = pd.to_datetime(series["times"])
        for model, values in series.items():
            if model == "times":
                continue
            ax.plot(
                times,
                np.nancumsum(np.asarray(values, dtype=np.float64)),
                color=COLORS.get(model),
                label=LABELS[model],
                linewidth=1.8 if model in KINDS else 1.0,
            )
        ax.set_title(name, fontsize=10)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        ax.axhline(0, color="black", linewidth=0.6)
    for ax in axes[len(scopes) :]:
        ax.set_visible(False)
    axes[0].legend(fontsize=8)
    fig.suptitle("Cumulative net log return on the test split (mean over seeds)")
    fig.savefig(path, dpi=110)


def plot_validation(result: dict[str, Any], path: Path) -> None:
    """Validation MSE per round per instance and kind, against the zero forecast's."""
    curves = result["val_loss_per_round"]
    ids = list(result["instances"])
    fig = Figure(figsize=(4 * len(ids), 3.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(ids)))
    for ax, instance in zip(axes, ids, strict=True):
        for kind in KINDS:
            values = curves[kind][instance]
            ax.plot(range(1, len(values) + 1), values, color=COLORS[kind], label=LABELS[kind])
        ax.axhline(
            result["val_loss_zero_forecast"][instance],
            color=COLORS["zero"],
            linestyle="--",
            label=LABELS["zero"],
        )
        ax.set_title(instance, fontsize=10)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel("validation MSE (mean over seeds)")
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=110)


def write_outputs(result: dict[str, Any], out_dir: Path) -> None:
    """compare.json, compare.md and the three PNG plots."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.json").write_text(json.dumps(_json_safe(result), indent=1))
    (out_dir / "compare.md").write_text(render_markdown(result))
    plot_metrics(result, out_dir / "compare_metrics.png")
    plot_pnl(result, out_dir / "compare_pnl.png")
    plot_validation(result, out_dir / "compare_validation.png")

"""What differential privacy costs, measured: epsilon against the test R^2 and IC.

For each data set (the bundled instances; many synthetic venues with a planted signal) the
federation is trained in-process exactly as :mod:`sigmax_fl.compare` trains its federated
model (same shared-calendar splits, features, seeds and ``task.train`` loop; round kept on
validation loss; test split predicted once, after selection), at several noise levels of the
app's **central** DP (``dp = "central"``):

1. every instance trains the global model on its own rows (``compare``'s local step);
2. the server measures each update ``||w_k - w_global||`` (:func:`sigmax_fl.strategy.update_norm`)
   and clips it to ``C`` with the factor ``C / norm`` the strategy's ``clip`` screen sets;
   shares are ``num-examples`` capped at ``max-weight-share`` and renormalised over the replies
   (:func:`sigmax_fl.strategy.capped_shares`); the average is the strategy's own
   :func:`sigmax_fl.strategy.aggregate`;
3. Gaussian noise of std ``z * 2 * s_max * C`` is added to every coordinate
   (:func:`sigmax_fl.privacy.add_gaussian_noise`); the std comes from the ServerApp's
   ``_central_noise_std`` applied to a :class:`~sigmax_fl.settings.Settings` the app accepts;
4. every round is one Gaussian release, accounted by :class:`~sigmax_fl.privacy.CentralAccountant`
   at sampling rate 1, as the ServerApp does. Epsilon is reported after all ``R`` rounds: every
   round's model was released, whichever one validation keeps.

``max-weight-share`` is ``1 / instances``, the smallest cap the app accepts with every instance
replying, hence the least noise for a given ``C``. ``C`` is the median update norm of the
non-private run (all rounds, instances and seeds) unless given. Choosing ``C`` from the data is
not itself private: in production it would come from a public proxy or cost budget; here it is
the most favourable fair choice, so the figures are a best case for DP.

On the real federation also the app's **local** DP (by default at z = 1 only: DP-SGD takes
~7x the CPU of plain training): every instance trains with
:func:`sigmax_fl.privacy.train_dp_sgd` (Poisson sampling, per-row clipping and noise), the
server averages plainly, and epsilon is per training row
(:class:`~sigmax_fl.privacy.LocalAccountant`; the largest over the instances).

The noise and the DP-SGD batches come from seeded generators so that the measurement repeats;
the app draws them from the OS (:func:`sigmax_fl.privacy.secure_rng`). Validation losses, which
choose the round kept, are reported by the instances in the clear in the app too: outside
epsilon.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import json
import logging
import math
import multiprocessing
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sigmax_fl import metrics
from sigmax_fl.compare import (
    TORCH_THREADS,
    KindFit,
    Market,
    Step,
    Training,
    _json_safe,
    _local_step,
    _predict_test,
    _select,
    build_scopes,
    load_markets,
    round_seed,
)
from sigmax_fl.data import DataSource, parse_sources, synthetic
from sigmax_fl.dataset import Recipe
from sigmax_fl.model import build_model
from sigmax_fl.privacy import (
    CentralAccountant,
    LocalAccountant,
    add_gaussian_noise,
    per_sample_gradients,
    train_dp_sgd,
)
from sigmax_fl.runs import outputs_root
from sigmax_fl.settings import Settings
from sigmax_fl.strategy import Defences, Screened, aggregate, capped_shares, update_norm

log = logging.getLogger(__name__)

NOISE_MULTIPLIERS = (0.0, 0.3, 1.0, 3.0)
"""Central-DP noise multipliers z measured by default; 0 clips without noise."""
SYNTHETIC = "synthetic:100:signal=0.1:bar=1d:start=2012-01-01:end=2021-12-31"
"""Default synthetic federation: 100 venues of one market, planted signal R^2 = 0.1, ten years
of daily bars (about 2,400 training rows a venue; with the default 2016-2019, 940 rows, the
non-private MLP's test R^2 stayed at or below 0)."""
SYNTHETIC_ROUNDS = 6
SYNTHETIC_LOCAL_EPOCHS = 1
SYNTHETIC_LEARNING_RATE = 0.002
"""At the app's 0.001 the MLP learns the planted signal more slowly; at 0.003 one seed in two
keeps an early, worse round."""
LOCAL_NOISE = (1.0,)
"""Local-DP (DP-SGD) noise multipliers measured on the real federation by default."""
METRICS = ("r2_oos", "ic", "hit_rate")
NON_PRIVATE = "non-private"
ORACLE = "oracle (planted signal)"
MODES = ("off", "central", "local", "oracle")


# --------------------------------------------------------------------------------------------
# The federated round under central DP (or none), and under local DP


def central_step(
    training: Training,
    seed: int,
    markets: Sequence[Market],
    *,
    clip_norm: float | None,
    noise_std: float = 0.0,
    noise_seed: int = 0,
    norms: list[float] | None = None,
    clipped: list[int] | None = None,
) -> Step:
    """One round of the app's aggregation, with central DP's clip and noise.

    ``clip_norm=None`` is ``dp = "off"``: no clip and no noise, and the new global model is
    exactly ``compare``'s federated round (:func:`sigmax_fl.strategy.weighted_average` calls the
    same :func:`~sigmax_fl.strategy.aggregate`). Otherwise each update is clipped to
    ``clip_norm`` as :class:`~sigmax_fl.strategy.WeightedFedAvg` clips under central DP, and
    ``N(0, noise_std^2)`` is added to every coordinate of the average, drawn from
    ``default_rng([noise_seed, round])``.

    ``norms`` and ``clipped``, when given, collect every update norm and, per round, the number
    of updates the clip shortened.
    """
    examples = [m.data.rows("train") for m in markets]
    shares = capped_shares(examples, training.max_weight_share)
    local_steps = [
        _local_step(training, seed, m.instance_id, m.data.X("train"), m.data.y("train"))
        for m in markets
    ]
    defences = Defences(
        max_update_norm=clip_norm or 0.0,
        update_norm_policy="clip",
        max_weight_share=training.max_weight_share,
    )

    def step(model: torch.nn.Module, server_round: int, lr: float) -> None:
        sent = {k: v.detach().clone() for k, v in model.state_dict().items()}
        reference = {k: v.numpy().astype(np.float64) for k, v in sent.items()}
        accepted = []
        for i, (market, local_step) in enumerate(zip(markets, local_steps, strict=True)):
            model.load_state_dict(sent)
            local_step(model, server_round, lr)
            arrays = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
            s = Screened(market.instance_id, i, examples[i], arrays=arrays, weight=shares[i])
            s.update_norm = update_norm(arrays, reference)
            if clip_norm is not None and s.update_norm > clip_norm:
                s.clip = clip_norm / s.update_norm
            accepted.append(s)
        if norms is not None:
            norms.extend(s.update_norm for s in accepted)
        if clipped is not None:
            clipped.append(sum(s.clip < 1 for s in accepted))
        average = aggregate(accepted, reference, defences)
        if noise_std > 0:
            average = add_gaussian_noise(
                average, noise_std, np.random.default_rng([noise_seed, server_round])
            )
        model.load_state_dict({k: torch.from_numpy(average[k]).to(sent[k].dtype) for k in sent})

    return step


def local_dp_step(
    training: Training,
    seed: int,
    markets: Sequence[Market],
    *,
    clip_norm: float,
    noise_multiplier: float,
    accountants: dict[str, LocalAccountant],
) -> Step:
    """One round of ``dp = "local"``: DP-SGD on every instance, then the capped average.

    Each instance's accountant in ``accountants`` is charged its round, as the ClientApp's
    ``_train_dp`` charges the ledger on its disk.
    """
    examples = [m.data.rows("train") for m in markets]
    shares = capped_shares(examples, training.max_weight_share)
    defences = Defences(max_weight_share=training.max_weight_share)

    def step(model: torch.nn.Module, server_round: int, lr: float) -> None:
        sent = {k: v.detach().clone() for k, v in model.state_dict().items()}
        reference = {k: v.numpy().astype(np.float64) for k, v in sent.items()}
        accepted = []
        for i, market in enumerate(markets):
            model.load_state_dict(sent)
            _, steps, q = train_dp_sgd(
                model,
                market.data.X("train"),
                market.data.y("train"),
                epochs=training.local_epochs,
                batch_size=training.batch_size,
                learning_rate=lr,
                clip_norm=clip_norm,
                noise_multiplier=noise_multiplier,
                seed=round_seed(seed, server_round, market.instance_id),
                optimizer=training.optimizer,
            )
            accountants[market.instance_id].step(noise_multiplier, q, steps)
            arrays = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
            accepted.append(
                Screened(market.instance_id, i, examples[i], arrays=arrays, weight=shares[i])
            )
        average = aggregate(accepted, reference, defences)
        model.load_state_dict({k: torch.from_numpy(average[k]).to(sent[k].dtype) for k in sent})

    return step


def central_noise(clip_norm: float, noise_multiplier: float, max_weight_share: float) -> float:
    """The noise std the ServerApp adds, ``z * 2 * s_max * C``, for a run config it accepts.

    Builds the :class:`~sigmax_fl.settings.Settings` of that ``dp = "central"`` run (which
    checks, e.g., ``min-train-replies`` >= 1 / ``max-weight-share``) and asks the ServerApp's
    own ``_central_noise_std``.
    """
    from sigmax_fl.server_app import _central_noise_std

    settings = Settings(
        dp="central",
        dp_clip_norm=clip_norm,
        dp_noise_multiplier=noise_multiplier,
        max_weight_share=max_weight_share,
        min_train_replies=math.ceil(1 / max_weight_share - 1e-9),
    )
    return _central_noise_std(settings)


def central_epsilon(noise_multiplier: float, rounds: int, delta: float) -> list[float]:
    """Client-level epsilon after each round: one ``step(z, 1.0)`` a round, as the ServerApp."""
    accountant = CentralAccountant()
    curve = []
    for _ in range(rounds):
        accountant.step(noise_multiplier, sampling_rate=1.0)
        curve.append(accountant.epsilon(delta))
    return curve


def median_row_gradient_norm(markets: Sequence[Market], model_name: str, seed: int) -> float:
    """Median per-row gradient norm of the initial model over every instance's training rows.

    The default per-row clip of local DP: half the rows are clipped at the start of training.
    """
    model = build_model(model_name, seed=seed)
    norms = []
    for m in markets:
        X = torch.from_numpy(np.ascontiguousarray(m.data.X("train"), dtype=np.float32))
        y = torch.from_numpy(np.ascontiguousarray(m.data.y("train"), dtype=np.float32))
        for start in range(0, len(X), 256):
            grads, _ = per_sample_gradients(model, X[start : start + 256], y[start : start + 256])
            squares = sum(g.double().flatten(1).pow(2).sum(1) for g in grads.values())
            norms.append(squares.sqrt().numpy())
    return float(np.median(np.concatenate(norms)))


# --------------------------------------------------------------------------------------------
# Jobs: one federation (data set, privacy level, seed), run in worker processes


@dataclass(frozen=True)
class Level:
    """One privacy setting of the federation."""

    name: str
    mode: str
    """``"off"`` (no clip, no noise), ``"central"`` or ``"local"``."""
    noise_multiplier: float = 0.0
    clip_norm: float = 0.0
    noise_std: float = 0.0
    """Central: std of the noise added to the aggregate each round (0: clip only)."""


@dataclass(frozen=True)
class Job:
    """One federation to train."""

    dataset: str
    level: Level
    seed: int
    training: Training


@dataclass
class JobResult:
    """The kept model's test forecasts and what the server saw while training it."""

    job: Job
    test_pred: dict[str, np.ndarray]
    best_round: int
    norms: list[float] = field(default_factory=list)
    """Every update norm ``||w_k - w_global||`` (central and off)."""
    clipped: int = 0
    """How many updates the clip shortened."""
    local_epsilon: dict[str, float] = field(default_factory=dict)
    """Local DP: each instance's per-row accountant after the run (epsilon at ``delta``)."""
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    """CPU time of the process that trained it (the machine may be shared)."""


Loads = dict[str, tuple[tuple[DataSource, ...], Recipe]]
_MARKETS: dict[str, tuple[tuple[DataSource, ...], Recipe, list[Market]]] = {}
"""Data set name -> its sources, recipe and loaded instances, once per process."""


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Silence the per-instance INFO lines of loading (gaps kept, cache written)."""
    loggers = [logging.getLogger(n) for n in ("flwr.sigmax_fl.data", "flwr.sigmax_fl.dataset")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _load(loads: Loads) -> None:
    torch.set_num_threads(TORCH_THREADS)
    with _quiet_loading():
        for name, (sources, recipe) in loads.items():
            if _MARKETS.get(name, ((), None))[:2] != (sources, recipe):
                _MARKETS[name] = (sources, recipe, load_markets(sources, recipe))


def _markets(name: str) -> list[Market]:
    return _MARKETS[name][2]


def run_job(job: Job, delta: float = 1e-5) -> JobResult:
    """Train one federation on the loaded instances of ``job.dataset``; predict its test split."""
    started, cpu = time.monotonic(), time.process_time()
    markets = _markets(job.dataset)
    level, training = job.level, job.training
    norms: list[float] = []
    clipped: list[int] = []
    accountants = {m.instance_id: LocalAccountant() for m in markets}
    if level.mode == "local":
        step = local_dp_step(
            training,
            job.seed,
            markets,
            clip_norm=level.clip_norm,
            noise_multiplier=level.noise_multiplier,
            accountants=accountants,
        )
    else:
        step = central_step(
            training,
            job.seed,
            markets,
            clip_norm=level.clip_norm if level.mode == "central" else None,
            noise_std=level.noise_std,
            noise_seed=job.seed * 1_000_003 + zlib.crc32(level.name.encode()),
            norms=norms,
            clipped=clipped,
        )
    # dp-accounting warns, once per composition, of RDP orders it leaves out (a bound still)
    absl = logging.getLogger("absl")
    level_before = absl.level
    absl.setLevel(logging.ERROR)
    try:
        selection, state = _select(training, job.seed, step, markets)
    finally:
        absl.setLevel(level_before)
    return JobResult(
        job,
        {m.instance_id: _predict_test(training.model, state, m) for m in markets},
        selection.best_round,
        norms,
        sum(clipped),
        {k: a.epsilon(delta) for k, a in accountants.items()} if level.mode == "local" else {},
        time.monotonic() - started,
        time.process_time() - cpu,
    )


class _InProcess(concurrent.futures.Executor):
    """``workers = 1``: run each job when it is submitted."""

    def submit(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_result(fn(*args, **kwargs))
        return future


@contextlib.contextmanager
def _executor(workers: int, loads: Loads) -> Iterator[concurrent.futures.Executor]:
    _load(loads)  # builds the feature caches once, before the workers read them
    if workers <= 1:
        yield _InProcess()
        return
    # spawn, not fork: a forked child inherits torch's thread pools in an undefined state.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_load, initargs=(loads,)
    ) as pool:
        yield pool


# --------------------------------------------------------------------------------------------
# Scoring: all instances pooled, with compare's stationary block-bootstrap intervals


def _panel(
    markets: Sequence[Market], preds_per_seed: Sequence[dict[str, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """(seeds, instances, bars) forecasts and (instances, bars) realised returns.

    Laid out by ``compare.build_scopes`` on the union of the instances' test bars (NaN where an
    instance has no bar); its last scope is "all instances".
    """
    fits = [
        dict.fromkeys(("federated", "pooled", "local"), KindFit({}, {}, dict(preds)))
        for preds in preds_per_seed
    ]
    scope = build_scopes(markets, fits)[-1]
    return scope.preds["federated"], scope.realised


def oracle_forecasts(
    markets: Sequence[Market], sources: Sequence[DataSource]
) -> dict[str, np.ndarray] | None:
    """The planted signal's forecast of each synthetic instance's test rows; None if real."""
    preds = {}
    for m, source in zip(markets, sources, strict=True):
        if not synthetic.is_synthetic(source.path):
            return None
        spec, instances = synthetic.parse_spec(source.path)
        oracle = synthetic.generate(spec, instances.start).oracle
        preds[m.instance_id] = oracle.reindex(m.times("test")).to_numpy(np.float64)
    return preds


Draws = dict[str, tuple[list[float], np.ndarray]]
"""Metric -> (its value per seed, the bootstrap draws of its mean over seeds)."""


def bootstrap_draws(
    pred: np.ndarray, realised: np.ndarray, n_boot: int, boot_seed: int = 0
) -> Draws:
    """One level's metrics per seed, and their mean over seeds on bootstrap resamples.

    ``pred``: (seeds, instances, bars). The resamples are ``compare``'s:
    :func:`sigmax_fl.metrics.bootstrap_distribution` (stationary blocks of mean length
    ceil(sqrt(bars))) with ``boot_seed``, so every level sees the same resamples.
    """
    out: Draws = {}
    for metric in METRICS:
        fn = getattr(metrics, metric)

        def over_seeds(p: np.ndarray, r: np.ndarray, fn: Any = fn) -> float:
            return float(np.mean([fn(x, r) for x in p]))

        out[metric] = (
            [float(fn(p, realised)) for p in pred],
            metrics.bootstrap_distribution(over_seeds, pred, realised, n=n_boot, seed=boot_seed),
        )
    return out


def score(draws: dict[str, Draws]) -> dict[str, dict[str, Any]]:
    """Each level's metrics (mean over seeds, 95 % interval) and its difference to non-private.

    ``draws``: level -> :func:`bootstrap_draws`, all with the same resamples, so a difference's
    interval is that of the paired differences (as ``compare.score_scope``).
    """
    out: dict[str, dict[str, Any]] = {}
    for name, level in draws.items():
        out[name] = {"metrics": {}, "vs_non_private": {}}
        for metric, (per_seed, dist) in level.items():
            low, high = metrics.percentile_interval(dist)
            out[name]["metrics"][metric] = {
                "value": float(np.mean(per_seed)),
                "ci_low": low,
                "ci_high": high,
                "per_seed": per_seed,
            }
            if name == NON_PRIVATE or NON_PRIVATE not in draws:
                continue
            base_per_seed, base = draws[NON_PRIVATE][metric]
            low, high = metrics.percentile_interval(dist - base)
            out[name]["vs_non_private"][metric] = {
                "value": float(np.mean(per_seed) - np.mean(base_per_seed)),
                "ci_low": low,
                "ci_high": high,
            }
    return out


# --------------------------------------------------------------------------------------------
# The measurement


@dataclass(frozen=True)
class DataSet:
    """One federation to measure: its instances and how they train."""

    name: str
    label: str
    """The ``data-sources`` text it was parsed from."""
    sources: tuple[DataSource, ...]
    training: Training
    clip_norm: float | None = None
    """Central DP's C; None: the median update norm of the non-private run."""
    local_noise: tuple[float, ...] = ()
    """Local-DP (DP-SGD) noise multipliers to measure too."""
    local_clip_norm: float | None = None
    """Local DP's per-row C; None: the median per-row gradient norm of the initial model."""


def _level_name(mode: str, z: float) -> str:
    return f"{mode} z={z:g}" + (" (clip only)" if mode == "central" and z == 0 else "")


def measure(
    datasets: Sequence[DataSet],
    recipe: Recipe,
    *,
    noise_multipliers: Sequence[float] = NOISE_MULTIPLIERS,
    seeds: Sequence[int] = (42, 43),
    delta: float = 1e-5,
    n_boot: int = 1000,
    workers: int = 1,
) -> dict[str, Any]:
    """Train every data set at every level for every seed; score; return the result."""
    started = time.monotonic()
    loads = {d.name: (d.sources, recipe) for d in datasets}
    off = Level(NON_PRIVATE, "off")
    results: list[JobResult] = []
    clip: dict[str, float] = {}
    local_clip: dict[str, float] = {}

    def done(future: concurrent.futures.Future) -> JobResult:
        r: JobResult = future.result()
        log.info(
            "dp-utility: %s, %s, seed %d: %.0f s (%.0f s CPU)",
            r.job.dataset,
            r.job.level.name,
            r.job.seed,
            r.seconds,
            r.cpu_seconds,
        )
        results.append(r)
        return r

    with _executor(workers, loads) as pool:
        # 1. The non-private federations: the baseline, and the update norms C is chosen from.
        first = {
            d.name: [pool.submit(run_job, Job(d.name, off, s, d.training), delta) for s in seeds]
            for d in datasets
        }
        second = []
        for d in datasets:  # as soon as a data set's baseline is in, queue its private levels
            norms = np.concatenate([done(f).norms for f in first[d.name]])
            clip[d.name] = d.clip_norm or float(f"{np.median(norms):.2g}")
            s_max = d.training.max_weight_share
            levels = [
                Level(
                    _level_name("central", z),
                    "central",
                    z,
                    clip[d.name],
                    central_noise(clip[d.name], z, s_max),
                )
                for z in noise_multipliers
            ]
            if d.local_noise:
                local_clip[d.name] = d.local_clip_norm or float(
                    f"{median_row_gradient_norm(_markets(d.name), d.training.model, seeds[0]):.2g}"
                )
                levels += [
                    Level(_level_name("local", z), "local", z, local_clip[d.name])
                    for z in d.local_noise
                ]
            second += [
                pool.submit(run_job, Job(d.name, level, s, d.training), delta)
                for level in levels
                for s in seeds
            ]
        for future in second:
            done(future)
        trained = time.monotonic()

        # 3. Score every level, all instances pooled (in the workers: the bootstrap is slow)
        panels = {d.name: _panels(d, results) for d in datasets}
        pending = {
            (name, level): pool.submit(bootstrap_draws, pred, realised, n_boot)
            for name, (preds, realised) in panels.items()
            for level, pred in preds.items()
        }
        draws: dict[str, dict[str, Draws]] = {d.name: {} for d in datasets}
        for (name, level), future in pending.items():
            draws[name][level] = future.result()

    out = {
        d.name: _summarise(
            d,
            results,
            panels[d.name][1],
            score(draws[d.name]),
            clip[d.name],
            local_clip.get(d.name),
            delta,
        )
        for d in datasets
    }
    return {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "config": {
            "noise_multipliers": list(noise_multipliers),
            "seeds": list(seeds),
            "delta": delta,
            "bootstrap": {"resamples": n_boot, "mean_block": "ceil(sqrt(test bars))"},
            "train_end": recipe.train_end,
            "val_end": recipe.val_end,
            "horizon": recipe.horizon,
            "workers": workers,
        },
        "datasets": out,
        "seconds": {
            "training": round(trained - started, 1),
            "training_cpu": round(sum(r.cpu_seconds for r in results), 1),
            "scoring": round(time.monotonic() - trained, 1),
        },
    }


def _panels(d: DataSet, results: Sequence[JobResult]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Level -> (seeds, instances, bars) test forecasts, in table order; realised returns."""
    markets = _markets(d.name)
    runs = sorted((r for r in results if r.job.dataset == d.name), key=lambda r: r.job.seed)
    order = sorted(
        {r.job.level for r in runs}, key=lambda v: (MODES.index(v.mode), v.noise_multiplier)
    )
    preds: dict[str, np.ndarray] = {}
    realised = np.empty(0)
    for level in order:
        preds[level.name], realised = _panel(
            markets, [r.test_pred for r in runs if r.job.level == level]
        )
    oracle = oracle_forecasts(markets, d.sources)
    if oracle is not None:
        preds[ORACLE] = _panel(markets, [oracle])[0]
    return preds, realised


def _summarise(
    d: DataSet,
    results: Sequence[JobResult],
    realised: np.ndarray,
    scores: dict[str, dict[str, Any]],
    clip_norm: float,
    local_clip_norm: float | None,
    delta: float,
) -> dict[str, Any]:
    """One data set's table: per level, epsilon, noise, clipping, rounds kept, scores."""
    markets = _markets(d.name)
    runs = sorted((r for r in results if r.job.dataset == d.name), key=lambda r: r.job.seed)
    levels = {r.job.level.name: r.job.level for r in runs}
    parameters = sum(p.numel() for p in build_model(d.training.model).parameters())
    rows = []
    for name in scores:
        if name == ORACLE:
            rows.append({"level": ORACLE, "mode": "oracle", **scores[ORACLE]})
            continue
        level = levels[name]
        mine = [r for r in runs if r.job.level.name == name]
        row: dict[str, Any] = {"level": name, "mode": level.mode}
        if level.mode == "central":
            curve = central_epsilon(level.noise_multiplier, d.training.rounds, delta)
            row.update(
                noise_multiplier=level.noise_multiplier,
                clip_norm=level.clip_norm,
                noise_std=level.noise_std,
                noise_norm=level.noise_std * math.sqrt(parameters),
                epsilon=curve[-1],
                epsilon_per_round=curve,
                epsilon_unit="instance",
            )
        elif level.mode == "local":
            per_instance = {k: max(r.local_epsilon[k] for r in mine) for k in mine[0].local_epsilon}
            row.update(
                noise_multiplier=level.noise_multiplier,
                clip_norm=level.clip_norm,
                epsilon=max(per_instance.values()),
                epsilon_per_instance=per_instance,
                epsilon_unit="training row (largest over the instances)",
            )
        else:
            row.update(epsilon=None, epsilon_unit="none: no DP")
        updates = sum(len(r.norms) for r in mine)
        row.update(
            clipped_share=sum(r.clipped for r in mine) / updates
            if updates and level.mode == "central"
            else None,
            best_round=[r.best_round for r in mine],
            seconds=[round(r.seconds, 1) for r in mine],
            cpu_seconds=[round(r.cpu_seconds, 1) for r in mine],
            **scores[name],
        )
        rows.append(row)
    norms = np.concatenate([r.norms for r in runs if r.job.level.mode == "off"])
    s_max = d.training.max_weight_share
    examples = [m.data.rows("train") for m in markets]
    return {
        "data_sources": d.label,
        "instances": len(markets),
        "training_rows": int(sum(examples)),
        "test_rows": int(np.sum(~np.isnan(realised))),
        "test_bars": int(realised.shape[-1]),
        "rounds": d.training.rounds,
        "local_epochs": d.training.local_epochs,
        "batch_size": d.training.batch_size,
        "learning_rate": d.training.learning_rates[0],
        "max_weight_share": s_max,
        "largest_share": float(capped_shares(examples, s_max).max()),
        "model_parameters": parameters,
        "clip_norm": clip_norm,
        "clip_norm_source": "given" if d.clip_norm else "median non-private update norm",
        "update_norms": {
            "median": float(np.median(norms)),
            "p10": float(np.percentile(norms, 10)),
            "p90": float(np.percentile(norms, 90)),
            "max": float(norms.max()),
        },
        "sensitivity": 2 * s_max * clip_norm,
        "local_clip_norm": local_clip_norm,
        "levels": rows,
    }


# --------------------------------------------------------------------------------------------
# Outputs


def _num(x: float | None, fmt: str) -> str:
    if x is None or math.isnan(x):
        return "—"
    if math.isinf(x):
        return "∞"
    return f"{x:+.1e}" if abs(x) >= 100 and "+" in fmt else format(x, fmt)


def _ci(e: dict[str, float] | None) -> str:
    if not e:
        return ""
    return f"{_num(e['value'], '+.3f')} [{_num(e['ci_low'], '+.3f')}, {_num(e['ci_high'], '+.3f')}]"


def _epsilon(row: dict[str, Any]) -> str:
    if row["mode"] == "off":
        return "no DP"
    x = row["epsilon"]
    text = "∞" if x is None or math.isinf(x) else f"{x:.3g}" if x < 1e4 else f"{x:.1e}"
    return text + (" per row" if row["mode"] == "local" else "")


def dataset_table(d: dict[str, Any]) -> list[str]:
    """The markdown table of one data set."""
    lines = [
        "| level | z | epsilon | noise std | noise norm | clipped | round kept | R² vs 0 | IC "
        "| ΔR² | ΔIC |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in d["levels"]:
        m, diff = row["metrics"], row.get("vs_non_private") or {}
        central = row["mode"] == "central"
        cells = [
            row["level"],
            _num(row.get("noise_multiplier"), "g"),
            "" if row["mode"] == "oracle" else _epsilon(row),
            _num(row["noise_std"], ".3g") if central else "",
            _num(row["noise_norm"], ".3g") if central else "",
            f"{row['clipped_share']:.0%}" if row.get("clipped_share") is not None else "",
            ",".join(str(b) for b in row.get("best_round", [])),
            _ci(m["r2_oos"]),
            _ci(m["ic"]),
            _ci(diff.get("r2_oos")),
            _ci(diff.get("ic")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def dataset_summary(name: str, d: dict[str, Any]) -> str:
    """One paragraph: the set-up of a data set's table."""
    n = d["update_norms"]
    local = (
        f" Local DP: DP-SGD, per-row clip {d['local_clip_norm']:g} (median per-row gradient "
        "norm of the initial model), epsilon per training row, the largest over the instances."
        if d["local_clip_norm"]
        else ""
    )
    return (
        f"**{name}** (`{d['data_sources']}`): {d['instances']} instances, "
        f"{d['training_rows']} training rows, {d['test_rows']} test instance-bars on "
        f"{d['test_bars']} bars. {d['rounds']} rounds x {d['local_epochs']} local epoch(s), "
        f"batch {d['batch_size']}, learning rate {d['learning_rate']:g}; max-weight-share "
        f"s_max = {d['max_weight_share']:.3g} (largest share {d['largest_share']:.3g}); "
        f"{d['model_parameters']} parameters. Central: C = {d['clip_norm']:g} "
        f"({d['clip_norm_source']}; non-private update norms median {n['median']:.3g}, "
        f"10-90 % {n['p10']:.3g}-{n['p90']:.3g}), sensitivity 2 s_max C = "
        f"{d['sensitivity']:.3g}, noise std z x that per coordinate per round (noise norm = "
        f"std x sqrt(parameters)), {d['rounds']} releases at sampling rate 1, epsilon per "
        f"instance.{local}"
    )


def render_markdown(result: dict[str, Any]) -> str:
    """dp_utility.md: the set-up and one table per data set."""
    c = result["config"]
    lines = [
        "# Differential privacy: epsilon against test R² and IC",
        "",
        f"Epsilon at delta = {c['delta']:g} after all rounds. Seeds {c['seeds']}. Cells: mean "
        f"over seeds [95 % stationary block-bootstrap interval over test bars, "
        f"{c['bootstrap']['resamples']} resamples], all instances pooled; Δ: difference to the "
        "non-private federation on the same resamples. R² vs 0 is 1 - SSE / sum(r²). Train to "
        f"{c['train_end']}, validation to {c['val_end']}, test after; the round kept is chosen "
        f"on validation loss. Wall time {result['seconds'].get('total', 0):.0f} s "
        f"({result['seconds']['training_cpu']:.0f} s of CPU training, "
        f"{result['config']['workers']} worker process(es)).",
        "",
    ]
    for name, d in result["datasets"].items():
        lines += [dataset_summary(name, d), "", *dataset_table(d), ""]
    return "\n".join(lines)


def write_outputs(result: dict[str, Any], out_dir: Path) -> None:
    """dp_utility.json and dp_utility.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "dp_utility.json").write_text(json.dumps(_json_safe(result), indent=1))
    (out_dir / "dp_utility.md").write_text(render_markdown(result))


def _training(settings: Settings, rounds: int, epochs: int, lr: float, instances: int) -> Training:
    return Training(
        rounds=rounds,
        local_epochs=epochs,
        batch_size=settings.batch_size,
        learning_rates=(lr,),
        optimizer=settings.optimizer,
        model=settings.model,
        max_weight_share=1.0 / instances,
    )


def dp_utility(
    data_sources: str | None = None,
    synthetic_sources: str | None = SYNTHETIC,
    out_dir: str | Path | None = None,
    *,
    noise_multipliers: Sequence[float] = NOISE_MULTIPLIERS,
    rounds: int | None = None,
    local_epochs: int | None = None,
    clip_norm: float | None = None,
    synthetic_rounds: int = SYNTHETIC_ROUNDS,
    synthetic_local_epochs: int = SYNTHETIC_LOCAL_EPOCHS,
    synthetic_learning_rate: float = SYNTHETIC_LEARNING_RATE,
    synthetic_clip_norm: float | None = None,
    local_noise: Sequence[float] = LOCAL_NOISE,
    local_clip_norm: float | None = None,
    seeds: int = 2,
    n_boot: int = 1000,
    workers: int | None = None,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Measure, then write ``dp_utility.json`` and ``dp_utility.md`` to ``out_dir``.

    Parameters
    ----------
    data_sources : str, optional
        The real federation; default the run config's (the 4 bundled instances); ``""`` skips.
    synthetic_sources : str, optional
        The large synthetic federation (default :data:`SYNTHETIC`); ``""`` or None skips.
    out_dir : str or Path, optional
        Default ``<outputs>/dp-utility-<UTC time>``.
    noise_multipliers : sequence of float
        Central-DP noise multipliers z (0: clip only).
    rounds, local_epochs : int, optional
        Real federation; default the run config's (``num-server-rounds``, ``local-epochs``).
    clip_norm, synthetic_clip_norm : float, optional
        Central C; default the median update norm of the non-private run.
    synthetic_rounds, synthetic_local_epochs, synthetic_learning_rate
        The synthetic federation's training (it has ~30x the rows of the bundled one).
    local_noise : sequence of float
        Local-DP (DP-SGD) noise multipliers measured on the real federation too; empty: none.
    local_clip_norm : float, optional
        Local DP's per-row bound; default the median per-row gradient norm at initialisation.
    seeds : int
        Seeds ``seed .. seed + seeds - 1``.
    n_boot : int
        Bootstrap resamples per interval.
    workers : int, optional
        Processes; default one per core.
    settings : Settings, optional
        Batch size, learning rate, optimiser, model, splits, horizon, dp-delta and seed;
        default the run config's.

    Returns
    -------
    dict
        The content of ``dp_utility.json``, with ``out_dir`` added.
    """
    settings = settings or Settings()
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    started = time.monotonic()
    recipe = Recipe.of(settings)
    datasets = []
    real = settings.data_sources if data_sources is None else data_sources
    if real:
        sources = tuple(parse_sources(real, settings.data_dir))
        training = _training(
            settings,
            settings.num_server_rounds if rounds is None else rounds,
            settings.local_epochs if local_epochs is None else local_epochs,
            settings.learning_rate,
            len(sources),
        )
        name = "bundled" if real == Settings().data_sources else "real"
        datasets.append(
            DataSet(name, real, sources, training, clip_norm, tuple(local_noise), local_clip_norm)
        )
    if synthetic_sources:
        sources = tuple(parse_sources(synthetic_sources, settings.data_dir))
        training = _training(
            settings,
            synthetic_rounds,
            synthetic_local_epochs,
            synthetic_learning_rate,
            len(sources),
        )
        datasets.append(
            DataSet("synthetic", synthetic_sources, sources, training, synthetic_clip_norm)
        )
    if not datasets:
        raise ValueError("nothing to measure: no real and no synthetic data sources")
    result = measure(
        datasets,
        recipe,
        noise_multipliers=tuple(noise_multipliers),
        seeds=tuple(settings.seed + i for i in range(seeds)),
        delta=settings.dp_delta,
        n_boot=n_boot,
        workers=multiprocessing.cpu_count() if workers is None else workers,
    )
    result["seconds"]["total"] = round(time.monotonic() - started, 1)
    if out_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        out_dir = outputs_root(settings.outputs_dir) / f"dp-utility-{stamp}"
    out = Path(out_dir)
    write_outputs(result, out)
    return {**result, "out_dir": str(out)}

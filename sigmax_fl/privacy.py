"""Differential privacy for sigmax-fl: clipping, Gaussian noise, DP-SGD and RDP accounting.

Two settings, each with its own unit of privacy:

* **central** (server side, *client-level*): the server clips every instance's update
  ``delta_k = w_k - w_global`` to ``clip_norm``, averages the clipped updates with fixed
  public shares, adds Gaussian noise once, and accounts the rounds with
  :class:`CentralAccountant`. Epsilon is per **instance**: the released global models hardly
  depend on whether one whole instance took part. The server is trusted: it sees the raw
  updates.
* **local** (instance side, *record-level*): each instance trains with DP-SGD
  (:func:`train_dp_sgd`: per-sample clipping, Gaussian noise on the summed gradients, Poisson
  sampling), so the update it sends is already private and the server need not be trusted.
  Epsilon is per **training row** and is accounted by :class:`LocalAccountant`, persisted on
  the instance's own disk across rounds and runs (:func:`load_local_accountant`,
  :func:`save_local_accountant`).

Nothing here touches Flower's messages or strategies, so the strategy and the ClientApp can
call it and the tests can exercise it on plain arrays. The only Flower import is the RDP
backend of the accountants (``flwr.supercore.privacy_accounting.rdp_accountant``), imported
when an accountant is built; it needs the ``flwr[dp]`` extra (``dp-accounting``).

Sensitivity of the central aggregate
------------------------------------
The server releases ``A = w_global + sum_k s_k * clip_C(delta_k) + N(0, sigma^2 I)`` where
``clip_C`` scales a vector to L2 norm at most ``C`` and ``s_k`` are the instances' shares
(``num-examples`` capped at ``s_max`` by :func:`sigmax_fl.strategy.capped_shares`).

*Assumption*: the shares are public and fixed before the round (computed from
``num-examples`` values, which the server sees in the clear anyway, over the population of
instances, or simply bounded by the configured cap ``s_max``), and an instance that is absent
(removed, not sampled, failed, rejected) contributes zero: its share is **not** handed to the
others.

*Add-or-remove-one-instance* adjacency. Removing instance ``j`` removes exactly the term
``s_j * clip_C(delta_j)``, so ``||A(D) - A(D')||_2 = s_j * ||clip_C(delta_j)||_2 <= s_j * C
<= s_max * C``. The L2 sensitivity is ``s_max * C`` and the Gaussian mechanism with
``sigma = z * s_max * C`` has noise multiplier ``z`` in the accountant's sense.

*Replace-one-instance* adjacency (the population is public, one instance's data is swapped
for arbitrary other data): the term changes from ``s_j * u`` to ``s_j * u'`` with
``||u||, ||u'|| <= C``, so the sensitivity is ``2 * s_max * C``.

*Shares renormalised over the replies* (what :func:`~sigmax_fl.strategy.capped_shares` does
when it is applied to the replies that arrived): removing ``j`` also raises every other share
(water-filling only ever raises the others), so with ``s'`` the new shares,
``||s - s'||_1 = s_j + (1 - (1 - s_j)) = 2 s_j`` and
``||A(D) - A(D')|| <= sum_k |s_k - s'_k| C <= 2 * s_max * C``. Renormalising therefore costs a
factor 2 in noise for the same epsilon (``renormalised=True``).

The noise must be calibrated to a data-independent bound: pass the population's public shares
or the cap, not the shares that happen to result from this round's replies.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from sigmax_fl.paths import PRIVATE, PRIVATE_FOLDER, make_folders, write_text
from sigmax_fl.task import make_optimizer

Relation = Literal["add-or-remove-one", "replace-one"]
RELATIONS: tuple[str, ...] = ("add-or-remove-one", "replace-one")

BAR_ROWS_WINDOWED = 62
"""Training rows one bar enters through finite windows and the target.

Close ``c_t`` is in the features of rows ``t .. t+60`` (the longest window, ``ret_60`` and
``vol_cc_60``, spans 61 closes) and in the targets of rows ``t`` and ``t - horizon``
(``log c_{s+h} - log c_s``): 61 + 1 = 62 rows. See :func:`group_privacy` for what this means
for a per-row epsilon, and its caveat about the EMA features and the scaler.
"""

_STATE_VERSION = 1
_RATE_RESOLUTION = 1_000_000_000
"""Flower's events take ``sample_size / population_size``: rates are rounded *up* to 1e-9."""


# --------------------------------------------------------------------------------------------
# Central DP: clipping, sensitivity, noise


def l2_norm(arrays: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of all arrays taken as one flat vector, accumulated in float64."""
    total = 0.0
    for a in arrays.values():
        flat = np.asarray(a, dtype=np.float64).ravel()
        total += float(np.einsum("i,i->", flat, flat))  # BLAS dot is slow here (see strategy)
    return math.sqrt(total)


def clip_update(
    delta: Mapping[str, np.ndarray], clip_norm: float
) -> tuple[dict[str, np.ndarray], float]:
    """Scale an update to L2 norm at most ``clip_norm``; return it (float64) and the factor.

    The bound is what the sensitivity derivation rests on, so it is enforced on the computed
    result, not only in exact arithmetic: if rounding leaves the norm a few ulps above
    ``clip_norm``, the factor is nudged down until it is not. An update already within the
    bound is returned unchanged (factor 1), so clipping never alters an honest small update.

    Parameters
    ----------
    delta : Mapping[str, np.ndarray]
        The update ``w_k - w_global``, per array name.
    clip_norm : float
        ``C > 0``.

    Returns
    -------
    clipped : dict[str, np.ndarray]
        ``factor * delta`` in float64.
    factor : float
        ``min(1, C / ||delta||)`` (slightly less after the rounding guard).

    Raises
    ------
    ValueError
        If ``clip_norm`` is not positive and finite, or the update holds NaN or Inf (its norm,
        hence its clipped value, would be undefined).
    """
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be positive and finite, got {clip_norm}")
    arrays = {name: np.asarray(a, dtype=np.float64) for name, a in delta.items()}
    norm = l2_norm(arrays)
    if not math.isfinite(norm):
        raise ValueError("the update holds NaN or Inf; it cannot be clipped")
    if norm <= clip_norm:
        return {name: a.copy() for name, a in arrays.items()}, 1.0
    factor = clip_norm / norm
    while True:
        clipped = {name: a * factor for name, a in arrays.items()}
        if l2_norm(clipped) <= clip_norm:
            return clipped, factor
        factor = float(np.nextafter(factor, 0.0))


def _max_share(shares: Sequence[float] | np.ndarray | float) -> float:
    values = np.atleast_1d(np.asarray(shares, dtype=np.float64))
    if values.size == 0:
        raise ValueError("shares is empty")
    if not np.isfinite(values).all() or (values < 0).any():
        raise ValueError(f"shares must be finite and >= 0, got {values}")
    return float(values.max())


def central_sensitivity(
    clip_norm: float,
    shares: Sequence[float] | np.ndarray | float,
    *,
    relation: Relation = "add-or-remove-one",
    renormalised: bool = False,
) -> float:
    """L2 sensitivity of ``sum_k s_k * clip_C(delta_k)`` to one instance.

    ``s_max * C`` for add-or-remove-one with fixed public shares; ``2 * s_max * C`` for
    replace-one, or when the shares are renormalised over whoever replied (the module
    docstring derives both). ``s_max`` is the largest entry of ``shares``.

    Parameters
    ----------
    clip_norm : float
        ``C``, the bound each update was clipped to.
    shares : sequence of float, or float
        Public shares fixed before the round (all instances', or the configured cap).
    relation : {"add-or-remove-one", "replace-one"}
        The adjacency the epsilon will be stated for.
    renormalised : bool
        True when an absent instance's share is redistributed to the others.
    """
    if relation not in RELATIONS:
        raise ValueError(f"relation '{relation}': expected one of {list(RELATIONS)}")
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be positive and finite, got {clip_norm}")
    factor = 1.0 if relation == "add-or-remove-one" and not renormalised else 2.0
    return factor * _max_share(shares) * clip_norm


def central_noise_std(
    clip_norm: float,
    noise_multiplier: float,
    shares: Sequence[float] | np.ndarray | float,
    *,
    relation: Relation = "add-or-remove-one",
    renormalised: bool = False,
) -> float:
    """Standard deviation of the central noise: ``z * sensitivity`` (``z * s_max * C``).

    With this std the round is a Gaussian mechanism of noise multiplier ``z`` relative to its
    sensitivity, which is exactly what :meth:`CentralAccountant.step` accounts.
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be >= 0 and finite, got {noise_multiplier}")
    sensitivity = central_sensitivity(
        clip_norm, shares, relation=relation, renormalised=renormalised
    )
    return noise_multiplier * sensitivity


def secure_rng() -> np.random.Generator:
    """A generator seeded with 128 bits from the OS, for the noise of a real run.

    Noise drawn from a generator seeded with the run seed (public in pyproject.toml, and part
    of the server's checkpoint) can be regenerated and subtracted by anyone who knows the seed,
    which voids the guarantee. Seeded generators are for tests only.
    """
    return np.random.default_rng(secrets.randbits(128))


def add_gaussian_noise(
    arrays: Mapping[str, np.ndarray], std: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """``arrays + N(0, std^2)`` independently per coordinate, as new float64 arrays.

    Parameters
    ----------
    arrays : Mapping[str, np.ndarray]
        The aggregate (or any arrays); not modified.
    std : float
        Noise standard deviation, from :func:`central_noise_std`; 0 returns copies.
    rng : np.random.Generator
        :func:`secure_rng` in a real run; a seeded generator in tests.
    """
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"std must be >= 0 and finite, got {std}")
    out: dict[str, np.ndarray] = {}
    for name, a in arrays.items():
        base = np.asarray(a, dtype=np.float64)
        out[name] = base + rng.normal(0.0, std, size=base.shape) if std > 0 else base.copy()
    return out


def private_aggregate(
    reference: Mapping[str, np.ndarray],
    updates: Sequence[Mapping[str, np.ndarray]],
    shares: Sequence[float],
    *,
    clip_norm: float,
    noise_std: float,
    rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], list[float]]:
    """The central-DP global model: ``w_global + sum_k s_k clip_C(delta_k) + noise``.

    The shares are used as given and never renormalised: an instance missing from
    ``updates`` simply contributes nothing, which is what the ``s_max * C`` sensitivity
    assumes. Pass ``noise_std`` from :func:`central_noise_std`.

    Parameters
    ----------
    reference : Mapping[str, np.ndarray]
        The global weights the updates answer.
    updates : sequence of Mapping[str, np.ndarray]
        Each accepted instance's weights ``w_k`` (not deltas).
    shares : sequence of float
        ``s_k`` for the same instances, fixed before the round.
    clip_norm, noise_std : float
        ``C`` and the noise standard deviation.
    rng : np.random.Generator
        Source of the noise (:func:`secure_rng` in a real run).

    Returns
    -------
    new_global : dict[str, np.ndarray]
        float64 arrays.
    factors : list[float]
        Each update's clip factor, for the audit log.
    """
    if len(updates) != len(shares):
        raise ValueError(f"{len(updates)} updates but {len(shares)} shares")
    ref = {name: np.asarray(a, dtype=np.float64) for name, a in reference.items()}
    total = {name: np.zeros_like(a) for name, a in ref.items()}
    factors: list[float] = []
    for weights, share in zip(updates, shares, strict=True):
        delta = {name: np.asarray(weights[name], dtype=np.float64) - r for name, r in ref.items()}
        clipped, factor = clip_update(delta, clip_norm)
        factors.append(factor)
        for name in total:
            total[name] += np.float64(share) * clipped[name]
    noisy = add_gaussian_noise(total, noise_std, rng)
    return {name: ref[name] + noisy[name] for name in ref}, factors


# --------------------------------------------------------------------------------------------
# Accounting (RDP, through Flower's RdpAccountant)


def _flower_rdp() -> tuple[Any, Any]:
    """Flower's RDP accountant and its types; ImportError names the extra if it is missing."""
    from flwr.supercore import privacy_accounting as pa
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    return pa, RdpAccountant


def _check_rate(sampling_rate: float) -> None:
    if not (math.isfinite(sampling_rate) and 0 <= sampling_rate <= 1):
        raise ValueError(f"sampling_rate must be in [0, 1], got {sampling_rate}")


def _check_noise(noise_multiplier: float) -> None:
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be >= 0 and finite, got {noise_multiplier}")


def _check_delta(delta: float) -> None:
    if not (math.isfinite(delta) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta}")


class _Accountant:
    """A ledger of sampled Gaussian steps and the epsilon they add up to (RDP).

    The ledger ``[(noise_multiplier, sampling_rate, steps), ...]`` is the state; Flower's
    ``RdpAccountant`` (``dp-accounting`` underneath: the Mironov-Talwar-Zhang bound for the
    Poisson-subsampled Gaussian, and the Canonne-Kamath-Steinke RDP-to-(eps, delta)
    conversion) turns it into epsilon. Adjacency is add-or-remove-one; a sampling rate of 1 is
    the plain Gaussian mechanism (no amplification), any lower rate assumes Poisson sampling.
    """

    unit = "?"

    def __init__(self, orders: Sequence[float] | None = None) -> None:
        self._orders = None if orders is None else tuple(float(o) for o in orders)
        self._ledger: list[list[float | int]] = []
        self._pa, self._rdp_cls = _flower_rdp()
        self._backend = self._new_backend()
        self._unbounded = False

    # -- backend

    def _new_backend(self) -> Any:
        pa = self._pa
        config = pa.PrivacyConfig(
            target_delta=1e-5,  # unused: every query passes its own delta
            population_size=_RATE_RESOLUTION,
            neighboring_relation=pa.NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=pa.SamplingMethod.POISSON,
        )
        return self._rdp_cls(config, orders=self._orders)

    def _compose(self, backend: Any, z: float, q: float, steps: int) -> bool:
        """Compose into ``backend``; False when the step has no noise (epsilon unbounded)."""
        if q == 0:
            return True
        if z == 0:
            return False
        size = min(_RATE_RESOLUTION, max(1, math.ceil(round(q * _RATE_RESOLUTION, 6))))
        event = self._pa.GaussianPrivacyEvent(
            noise_multiplier=float(z), sample_size=size, population_size=_RATE_RESOLUTION
        )
        backend.compose(event, int(steps))
        return True

    # -- public API

    @property
    def steps(self) -> int:
        """Number of accounted releases (rounds for central, optimiser steps for local)."""
        return int(sum(int(entry[2]) for entry in self._ledger))

    @property
    def ledger(self) -> list[tuple[float, float, int]]:
        """``(noise_multiplier, sampling_rate, steps)`` runs, consecutive equal ones merged."""
        return [(float(z), float(q), int(n)) for z, q, n in self._ledger]

    def step(self, noise_multiplier: float, sampling_rate: float, steps: int = 1) -> None:
        """Account ``steps`` releases, each a Gaussian of ``noise_multiplier`` at ``sampling_rate``.

        Parameters
        ----------
        noise_multiplier : float
            Noise std divided by the L2 sensitivity; 0 (no noise) makes epsilon infinite.
        sampling_rate : float
            Probability each unit (instance or row) takes part, by Poisson sampling; 1 when
            every unit takes part every time.
        steps : int
            How many identical releases.
        """
        _check_noise(noise_multiplier)
        _check_rate(sampling_rate)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if not self._compose(self._backend, noise_multiplier, sampling_rate, steps):
            self._unbounded = True
        last = self._ledger[-1] if self._ledger else None
        if last is not None and last[0] == noise_multiplier and last[1] == sampling_rate:
            last[2] = int(last[2]) + steps
        else:
            self._ledger.append([float(noise_multiplier), float(sampling_rate), steps])

    def epsilon(self, delta: float) -> float:
        """Cumulative epsilon at ``delta`` over every accounted step (0 before the first)."""
        _check_delta(delta)
        if self._unbounded:
            return math.inf
        if not any(q > 0 for _, q, _ in self._ledger):
            return 0.0
        return float(self._backend.get_epsilon(delta))

    def would_exceed(
        self,
        target_epsilon: float,
        delta: float,
        next_steps: int = 1,
        *,
        noise_multiplier: float | None = None,
        sampling_rate: float | None = None,
    ) -> bool:
        """Whether ``next_steps`` more steps would take epsilon above ``target_epsilon``.

        Asked before a round so that a run stops *before* exceeding its budget, never after.
        The next steps default to the parameters of the last accounted step. The accountant
        itself is not changed.
        """
        _check_delta(delta)
        if not (target_epsilon > 0):
            raise ValueError(f"target_epsilon must be positive, got {target_epsilon}")
        if noise_multiplier is None or sampling_rate is None:
            if not self._ledger:
                raise ValueError("no step accounted yet: pass noise_multiplier and sampling_rate")
            last_z, last_q, _ = self._ledger[-1]
            noise_multiplier = float(last_z) if noise_multiplier is None else noise_multiplier
            sampling_rate = float(last_q) if sampling_rate is None else sampling_rate
        projected = type(self)(orders=self._orders)
        projected.load_state_dict(self.state_dict())
        projected.step(noise_multiplier, sampling_rate, next_steps)
        return projected.epsilon(delta) > target_epsilon

    def report(self, delta: float) -> dict[str, float | int | str]:
        """One JSON-ready line for the log and the history: epsilon, delta, steps, unit."""
        return {
            "epsilon": self.epsilon(delta),
            "delta": delta,
            "steps": self.steps,
            "unit": self.unit,
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: the ledger (epsilon is recomputed from it on load)."""
        return {
            "version": _STATE_VERSION,
            "unit": self.unit,
            "orders": None if self._orders is None else list(self._orders),
            "ledger": [
                {"noise_multiplier": float(z), "sampling_rate": float(q), "steps": int(n)}
                for z, q, n in self._ledger
            ],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace this accountant's state by ``state`` (from :meth:`state_dict`).

        Raises ValueError on anything malformed, and on another unit's state: a client-level
        ledger read as a row-level one (or vice versa) would report a meaningless epsilon.
        """
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"accountant state version {state.get('version')!r} is unknown")
        if state.get("unit") != self.unit:
            raise ValueError(
                f"accountant state is per {state.get('unit')!r}, this accountant per {self.unit!r}"
            )
        orders = state.get("orders")
        ledger = state.get("ledger")
        if not isinstance(ledger, list):
            raise ValueError("accountant state has no ledger list")
        # Rebuild aside and swap in only when every entry was accepted: a half-loaded ledger
        # would under-report epsilon.
        try:
            fresh = type(self)(orders=None if orders is None else [float(o) for o in orders])
            for entry in ledger:
                z, q, n = entry["noise_multiplier"], entry["sampling_rate"], entry["steps"]
                fresh.step(float(z), float(q), n)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"malformed accountant state: {err}") from err
        self._orders = fresh._orders
        self._ledger = fresh._ledger
        self._backend = fresh._backend
        self._unbounded = fresh._unbounded


class CentralAccountant(_Accountant):
    """Client-level (per instance) epsilon of the central-DP global models, one step a round.

    Call ``step(z, q)`` once per round that released a noised model, where ``z`` is the noise
    std divided by the sensitivity from :func:`central_sensitivity` (so
    ``noise_std = z * s_max * C`` under add-or-remove-one with fixed shares) and ``q`` is the
    probability with which each instance was sampled for the round:

    * ``q = 1``: every available instance trains every round: no amplification.
    * ``q < 1``: only valid if each instance was sampled *independently* with probability
      ``q`` (Poisson). Flower's FedAvg draws a fixed number of nodes without replacement,
      which is not Poisson; with that sampling, account ``q = 1`` with the replace-one
      sensitivity (``2 s_max C``), which is valid whatever the draw and states epsilon for
      replace-one adjacency.

    Epsilon covers the global models only; metrics that instances report in the clear (their
    losses, ``num-examples``) are outside it.
    """

    unit = "instance"


class LocalAccountant(_Accountant):
    """Record-level epsilon of one instance's DP-SGD, per training row, across all rounds.

    Each round adds ``step(z, q, steps)`` with the values :func:`train_dp_sgd` returns. The
    sum runs over every round of every run that trained on the same rows, so it must live on
    the instance's disk (:func:`save_local_accountant`), not in one run's or one process's
    memory. The server's sampling of instances does not amplify this epsilon (the server knows
    whom it sampled) and is not used.

    What "per training row" means for bars (group privacy): a row is one feature vector and
    its target. One bar enters up to ``BAR_ROWS_WINDOWED = 62`` rows through the finite
    windows and the target, so the guarantee for a bar follows from :func:`group_privacy`
    with ``k = 62``: ``(62 eps, delta * sum_{i<62} e^{i eps})`` (at most
    ``62 e^{61 eps} delta``), which is meaningful only when the per-row epsilon is small: at
    delta = 1e-5 the group's delta stays below 1 only for a per-row eps below about 0.157.
    Strictly even that undercounts: the EMA, MACD, RSI and ATR features are recursive (every
    later row depends on a bar, with geometrically decaying weight) and the scaler is fitted
    on all training rows, so a bar touches every row and the bar-level bound is vacuous. The
    per-row epsilon is the honest figure to report.
    """

    unit = "training row"


def compute_epsilon(
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    orders: Sequence[float] | None = None,
) -> float:
    """Epsilon of ``steps`` Poisson-sampled Gaussian releases (for tables and planning)."""
    acc = CentralAccountant(orders=orders)
    acc.step(noise_multiplier, sampling_rate, steps)
    return acc.epsilon(delta)


def group_privacy(epsilon: float, delta: float, group_size: int) -> tuple[float, float]:
    """(eps, delta)-DP for single records -> the guarantee for a group of ``k`` records.

    Chaining the single-record bound along ``k`` neighbouring datasets gives
    ``(k * eps, delta * sum_{i<k} e^{i eps})``, and the delta term is at most
    ``k * e^{(k-1) eps} * delta``. The returned delta can exceed 1, which means the bound
    says nothing.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if not (epsilon >= 0):
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    k = int(group_size)
    return k * epsilon, delta * math.fsum(math.exp(i * epsilon) for i in range(k))


def load_local_accountant(path: str | os.PathLike[str]) -> LocalAccountant:
    """The instance's accountant from ``path``; a fresh one if the file does not exist.

    A file that exists but cannot be read raises: silently starting again from zero would
    reset the privacy budget.
    """
    acc = LocalAccountant()
    file = Path(path)
    if not file.exists():
        return acc
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{file}: unreadable privacy ledger ({err})") from err
    if not isinstance(state, dict):
        raise ValueError(f"{file}: privacy ledger is not a JSON object")
    acc.load_state_dict(state)
    return acc


def save_local_accountant(path: str | os.PathLike[str], acc: LocalAccountant) -> None:
    """Write ``acc`` to ``path`` durably (:func:`sigmax_fl.paths.write_text`), owner-only.

    A crash leaves either the old ledger or the new one, never a torn file. Save *before* the
    round's update leaves the instance: an update sent but not accounted is privacy spent
    without a record. Its sampling rate tells the instance's number of rows: other users of
    the machine may not read it.
    """
    file = Path(path)
    make_folders(file.parent, PRIVATE_FOLDER)
    write_text(file, json.dumps(acc.state_dict(), indent=1), mode=PRIVATE)


# --------------------------------------------------------------------------------------------
# Local DP: DP-SGD with torch.func


def _check_model(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                "BatchNorm mixes the samples of a batch, so a sample's gradient is not its own "
                "and per-sample clipping bounds nothing; use a model without it"
            )


def per_sample_gradients(
    model: nn.Module, X: torch.Tensor, y: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each row's own gradient of its squared error, and the per-row losses.

    ``torch.func``: ``grad`` of the one-row loss through ``functional_call``, ``vmap``-ed over
    the rows. The one-row loss is the MSE of that row alone, so the mean of these gradients is
    exactly the gradient of :class:`torch.nn.MSELoss` on the batch.

    Returns
    -------
    grads : dict[str, torch.Tensor]
        Parameter name -> tensor of shape ``(rows, *param.shape)``.
    losses : torch.Tensor
        Shape ``(rows,)``.
    """
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    if len(X) == 0:
        empty = {n: p.new_zeros((0, *p.shape)) for n, p in params.items()}
        return empty, X.new_zeros(0)

    def row_loss(
        p: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pred = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        loss = ((pred - t) ** 2).mean()
        return loss, loss.detach()

    grads, losses = vmap(
        grad(row_loss, has_aux=True), in_dims=(None, 0, 0), randomness="different"
    )(params, X, y)
    return grads, losses


def clip_per_sample(
    grads: Mapping[str, torch.Tensor], clip_norm: float
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Scale each row's gradient (over all parameters) to L2 norm at most ``clip_norm``.

    Done in float64, with the factor ``(C / norm) * (1 - 1e-9)`` for rows above the bound and
    1 for the others: float32 rounding of ``g * C / norm`` lands a few ulps *above* ``C``
    often enough to matter for a bound the privacy proof rests on, and the relative margin
    keeps the float64 result below ``C`` for any norm. Rows within the bound are not touched.

    Returns
    -------
    clipped : dict[str, torch.Tensor]
        float64, same shapes as ``grads``.
    factors : torch.Tensor
        Shape ``(rows,)``.
    """
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be positive and finite, got {clip_norm}")
    first = next(iter(grads.values()))
    rows = first.shape[0]
    wide = {n: g.double() for n, g in grads.items()}
    squares = torch.zeros(rows, dtype=torch.float64)
    for g in wide.values():
        squares += g.reshape(rows, -1).pow(2).sum(dim=1)
    norms = squares.sqrt()
    if not torch.isfinite(norms).all():
        raise ValueError("a per-sample gradient holds NaN or Inf; it cannot be clipped")
    over = norms > clip_norm
    factors = torch.where(
        over, clip_norm / norms.clamp(min=clip_norm) * (1 - 1e-9), torch.ones_like(norms)
    )
    clipped = {n: g * factors.reshape(rows, *([1] * (g.dim() - 1))) for n, g in wide.items()}
    return clipped, factors


def private_gradient(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    clip_norm: float,
    noise_multiplier: float,
    denominator: float,
    generator: torch.Generator,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One DP-SGD gradient: ``(sum_i clip_C(g_i) + N(0, (z C)^2 I)) / denominator``.

    Each row's gradient is clipped to ``C`` before summing, so adding or removing a row moves
    the sum by at most ``C``: the noise ``z * C`` makes the step a Gaussian mechanism of noise
    multiplier ``z``. ``denominator`` is the *expected* batch size, a constant: dividing by the
    realised size would make the scale depend on who was sampled.

    Returns
    -------
    gradient : dict[str, torch.Tensor]
        Per parameter name, shaped like the parameter.
    losses : torch.Tensor
        The sampled rows' losses (not private: for the instance's own log only).
    """
    grads, losses = per_sample_gradients(model, X, y)
    clipped, _ = clip_per_sample(grads, clip_norm) if len(X) else (grads, None)
    std = noise_multiplier * clip_norm
    out: dict[str, torch.Tensor] = {}
    for name, g in clipped.items():
        total = g.double().sum(dim=0)
        if std > 0:
            total = total + torch.normal(
                0.0, std, size=total.shape, generator=generator, dtype=torch.float64
            )
        out[name] = (total / denominator).to(grads[name].dtype)
    return out, losses


def poisson_batches(
    rows: int, sampling_rate: float, steps: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """``steps`` batches, each row in each independently with probability ``sampling_rate``.

    Poisson sampling is what the subsampled-Gaussian accountant assumes; batches vary in size
    and can be empty (the step is then noise alone, as the analysis requires).
    """
    return [
        torch.nonzero(torch.rand(rows, generator=generator) < sampling_rate).squeeze(1)
        for _ in range(steps)
    ]


def dp_sgd_schedule(rows: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """``(sampling_rate, steps)`` for ``epochs`` expected passes with ``batch_size`` rows a step.

    ``q = min(1, batch_size / rows)`` and ``ceil(rows / batch_size)`` steps per epoch, as many
    as :func:`sigmax_fl.task.train` takes, so the two are compared step for step.
    """
    if rows < 1 or batch_size < 1 or epochs < 1:
        raise ValueError(
            f"rows, batch_size and epochs must be >= 1 ({rows}, {batch_size}, {epochs})"
        )
    q = min(1.0, batch_size / rows)
    return q, epochs * math.ceil(rows / batch_size)


def train_dp_sgd(
    model: nn.Module,
    X: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    clip_norm: float,
    noise_multiplier: float,
    seed: int | None = None,
    optimizer: str = "adam",
) -> tuple[float, int, float]:
    """Train in place with DP-SGD; return ``(train_loss, steps, sampling_rate)``.

    Per step: Poisson-sample rows with ``q = batch_size / rows``, compute each row's gradient
    (:func:`per_sample_gradients`), clip it to ``clip_norm``, sum, add ``N(0, (z C)^2)`` per
    coordinate, divide by the expected batch size ``q * rows``, and let the optimiser step.
    Adam or SGD-with-momentum only post-process the privatised gradients, so they cost no
    privacy. Account the round with ``LocalAccountant.step(noise_multiplier, sampling_rate,
    steps)``.

    Parameters
    ----------
    model : nn.Module
        Trained in place; must not contain BatchNorm.
    X, y : np.ndarray
        Training rows and targets.
    epochs, batch_size, learning_rate, optimizer
        As in :func:`sigmax_fl.task.train`; ``epochs`` counts expected passes.
    clip_norm : float
        Per-row gradient bound ``C``.
    noise_multiplier : float
        ``z``: the noise std on the summed gradient is ``z * C``. 0 trains without privacy.
    seed : int or None
        None in a real run: the batches and the noise then come from OS entropy. A seed known
        to anyone else (the run seed, the round, the instance id: all known to the server) lets
        them regenerate and subtract the noise. The batches are
        ``poisson_batches(rows, q, steps, torch.Generator().manual_seed(seed))``; the noise
        uses a second generator seeded with ``seed + 1``.

    Returns
    -------
    train_loss : float
        Mean loss of the rows sampled in the last epoch, before each step's update. It is
        computed from the raw rows without noise: sending it to the server is outside epsilon.
    steps : int
        Optimiser steps taken.
    sampling_rate : float
        ``q``, the Poisson rate the accountant needs.
    """
    if len(X) == 0:
        raise ValueError("no training rows")
    if len(X) != len(y):
        raise ValueError(f"{len(X)} rows but {len(y)} targets")
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be positive and finite, got {clip_norm}")
    _check_noise(noise_multiplier)
    _check_model(model)
    rows = len(X)
    q, steps = dp_sgd_schedule(rows, batch_size, epochs)
    denominator = q * rows
    features = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    targets = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))
    if seed is None:
        sample_gen = torch.Generator().manual_seed(secrets.randbits(63))
        noise_gen = torch.Generator().manual_seed(secrets.randbits(63))
    else:
        sample_gen = torch.Generator().manual_seed(seed)
        noise_gen = torch.Generator().manual_seed(seed + 1)
    batches = poisson_batches(rows, q, steps, sample_gen)
    params = [p for p in model.parameters() if p.requires_grad]
    named = dict(model.named_parameters())
    opt = make_optimizer(optimizer, params, learning_rate)
    model.train()
    per_epoch = steps // epochs
    loss_sum, loss_rows = 0.0, 0
    for i, batch in enumerate(batches):
        if i % per_epoch == 0:
            loss_sum, loss_rows = 0.0, 0
        gradient, losses = private_gradient(
            model,
            features[batch],
            targets[batch],
            clip_norm=clip_norm,
            noise_multiplier=noise_multiplier,
            denominator=denominator,
            generator=noise_gen,
        )
        opt.zero_grad(set_to_none=True)
        for name, g in gradient.items():
            named[name].grad = g.to(named[name].dtype)
        opt.step()
        loss_sum += float(losses.sum())
        loss_rows += len(batch)
    return (loss_sum / loss_rows if loss_rows else float("nan")), steps, q

"""Synthetic multi-venue bars for scale tests and demos: always labelled synthetic.

Selecting it
------------
In ``data-sources``, an entry ``synthetic:N`` expands to N instances with ids
``synthetic-0000 .. synthetic-<N-1>`` (venue ``synthetic``). Options follow as ``:key=value``::

    synthetic:1000
    synthetic:8:seed=7:signal=0.05
    synthetic:4:bar=1h:start=2018-01-01:end=2019-06-30

=========  ============  ==========================================================
key        default       meaning
=========  ============  ==========================================================
seed       0             the shared latent price path; instances differ by index
signal     0             R^2 of the planted signal on the latent next-bar return
bar        1d            ``1d`` or ``1h`` (each has its own calibrated dynamics)
start      2016-01-01    first bar (UTC); the default fits the default calendar
end        2019-12-31    last day (inclusive)
=========  ============  ==========================================================

One instance is ``synthetic:instance=K[:key=value]...``: the SuperNode form
(``--node-config "data-path='synthetic:instance=7:seed=3'"``), and the path a
:class:`~sigmax_fl.data.DataSource` carries. Instance K is the same series whatever N is.

The model
---------
A latent log price shared by all venues of a seed: returns ``r_t = sigma_t * e_t`` with
Student-t innovations ``e_t`` (fat tails) and a stochastic volatility ``sigma_t`` whose
log-variance is a calm/stressed Markov regime plus an AR(1) (volatility clustering, the
GARCH-like persistence of |returns|). ``E[sigma_t^2]`` is set exactly to the calibrated bar
variance. Each venue sees that path through its own microstructure: a close noise of
``k * sigma_t`` (``k`` rises with the venue's fee tier), its own intrabar highs and lows
around the latent range, volume that rises with volatility, flat zero-volume bars (the
close stays put), and outages (bars missing: gaps, never filled).

The planted signal
------------------
With ``signal = rho`` the latent return is
``r_{t+1} = sigma_{t+1} * (sqrt(rho) * s_t + sqrt(1 - rho) * e_{t+1})`` where
``s_t = (e_t + e_{t-1} + e_{t-2}) / sqrt(3)`` is the vol-standardised momentum of the last
three bars: a function of recent bars that ``ret_1..ret_3`` and the volatility features
see. ``s_t`` has unit variance and is independent of ``sigma_{t+1}``, so the oracle
``E[r_{t+1} | past] = sqrt(rho) * sigma_{t+1} * s_t`` explains exactly ``rho`` of the latent
return's variance. A venue's target is its own close-to-close log return, which adds its
close noise, so its true out-of-sample R^2 is, analytically::

    true_r2 = rho / (1 + 2 k^2)          (k in [0.0025, 0.03]: at least 0.998 rho)

on bars that follow one another; the ~0.5 % of targets next to a gap or a flat bar dilute
it a little (``--calibration`` measures the oracle's R^2 on all usable rows of a large
sample to show both). Predicting the venue's own close noise could add at most
``k^2 / (1 + 2 k^2)`` (< 0.001) to any model's R^2. ``attrs["synthetic"]["true_r2"]``
holds the value for each loaded instance; :func:`generate` also returns the oracle series.

Calibration
-----------
``python -m sigmax_fl.data.calibration`` prints the excess kurtosis and the
autocorrelation of |log returns| of the bundled real series next to the synthetic ones
(median over seeds), and the planted signal's analytic and simulated R^2.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from sigmax_fl.data.errors import DataError
from sigmax_fl.dates import parse_date

if TYPE_CHECKING:
    import pandas as pd

PREFIX = "synthetic"
VENUE = "synthetic"
GENERATOR_VERSION = 1
"""Bumped whenever the generated numbers change, so cached features are rebuilt."""

_FIELD = "data-sources"


@dataclass(frozen=True)
class Dynamics:
    """The latent process of one bar size, calibrated to the bundled real series."""

    vol: float
    """Unconditional standard deviation of one bar's log return."""
    tail_dof: float
    """Degrees of freedom of the Student-t innovations (fat tails)."""
    persistence: float
    """AR(1) coefficient of the log-variance per bar (clustering that fades in days)."""
    vol_of_vol: float
    """Stationary standard deviation of that AR(1) log-variance."""
    stress_jump: float
    """Log-variance added in the stressed regime (clustering that lasts for months)."""
    calm_bars: float
    """Mean length of a calm regime, in bars."""
    stress_bars: float
    """Mean length of a stressed regime, in bars."""


PRESETS: dict[str, Dynamics] = {
    # Coinbase / Bitstamp BTC-USD daily, 2016-2019.
    "1d": Dynamics(0.040, 16.0, 0.97, 0.75, 1.4, 150.0, 30.0),
    # Coinbase BTC-USD hourly, 2017-07 .. 2019-10.
    "1h": Dynamics(0.0098, 6.0, 0.985, 1.05, 1.5, 24 * 120.0, 24 * 45.0),
}
START_PRICE = 430.0  # BTC-USD on 2016-01-01, so prices look like the real series


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything that decides a synthetic series except the instance index."""

    seed: int = 0
    signal: float = 0.0
    bar: str = "1d"
    start: str = "2016-01-01"
    end: str = "2019-12-31"

    def path(self, instance: int) -> str:
        """The canonical one-instance path: what a DataSource carries and caches key on."""
        options = ":".join(f"{k}={v}" for k, v in asdict(self).items())
        return f"{PREFIX}:instance={instance}:{options}"

    def index(self) -> pd.DatetimeIndex:
        """Bar open times from ``start`` to the end of day ``end``, in UTC."""
        import pandas as pd

        last = pd.Timestamp(self.end, tz="UTC") + pd.Timedelta(days=1)
        return pd.date_range(
            pd.Timestamp(self.start, tz="UTC"),
            last,
            freq=_bar_step(self.bar),
            inclusive="left",
            unit="ns",
        )


def instance_id(instance: int) -> str:
    """``synthetic-0007``, zero-padded so that the first 10,000 ids sort in order.

    The same in simulation (``synthetic:N``) and deployment (``synthetic:instance=7``),
    because the history keys everything by instance id.
    """
    return f"{PREFIX}-{instance:04d}"


def is_synthetic(path: object) -> bool:
    """Whether a data path names generated bars rather than a file."""
    return str(path).strip().lower().startswith(f"{PREFIX}:")


def _option(key: str, value: str, text: str) -> object:
    """One ``key=value`` of a spec, checked, with a message naming what was expected."""
    try:
        if key in ("seed", "instance"):
            number = int(value)
            if number < 0:
                raise ValueError
            return number
        if key == "signal":
            rho = float(value)
            if not 0.0 <= rho < 1.0:
                raise ValueError
            return rho
        if key == "bar":
            if value not in PRESETS:
                raise ValueError
            return value
        return parse_date(value).date().isoformat()  # start, end
    except ValueError:
        expected = {
            "seed": "an integer >= 0",
            "instance": "an integer >= 0",
            "signal": "a number in [0, 1)",
            "bar": f"one of {sorted(PRESETS)}",
        }.get(key, "a date like 2016-01-01")
        raise DataError(
            _FIELD, f"in '{text}': {key}={value!r} is not {expected}", field=_FIELD
        ) from None


def parse_spec(text: str) -> tuple[SyntheticSpec, range]:
    """``synthetic:N[:k=v]...`` or ``synthetic:instance=K[:k=v]...`` -> (spec, instances).

    Raises
    ------
    DataError
        For anything else, naming the entry and what was expected.
    """
    parts = [p.strip() for p in text.strip().split(":")]
    if parts[0].lower() != PREFIX or len(parts) < 2:
        raise DataError(_FIELD, f"'{text}': expected synthetic:N[:key=value]...", field=_FIELD)
    count = None
    if re.fullmatch(r"\d+", parts[1]):
        count, parts = int(parts[1]), parts[2:]
        if count < 1:
            raise DataError(_FIELD, f"'{text}': N must be at least 1", field=_FIELD)
    else:
        parts = parts[1:]
    known = {"instance", *SyntheticSpec.__dataclass_fields__}
    options: dict[str, object] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or key not in known:
            raise DataError(
                _FIELD,
                f"'{text}': '{part}' is not one of {sorted(known)} as key=value",
                field=_FIELD,
            )
        options[key] = _option(key, value, text)
    instance = options.pop("instance", None)
    if (count is None) == (instance is None):
        raise DataError(
            _FIELD, f"'{text}': give either a count N or instance=K, not both", field=_FIELD
        )
    spec = SyntheticSpec(**options)  # type: ignore[arg-type]
    if parse_date(spec.start) > parse_date(spec.end):
        raise DataError(_FIELD, f"'{text}': start is after end", field=_FIELD)
    return spec, range(count) if count is not None else range(instance, instance + 1)


def spec_digest(path: str) -> str:
    """What a feature cache keys a synthetic series on: its canonical spec and the version."""
    spec, instances = parse_spec(path)
    text = f"{spec.path(instances.start)}|generator-v{GENERATOR_VERSION}"
    return hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------------------
# The latent path, shared by every venue of a seed


@dataclass(frozen=True)
class Latent:
    """The shared price path on the full bar grid (arrays of one value per bar)."""

    index: pd.DatetimeIndex
    log_close: np.ndarray
    sigma: np.ndarray
    """Conditional standard deviation of each bar's return."""
    log_var: np.ndarray
    """Centred log-variance (regime + AR(1)), which also drives volume."""
    innovation: np.ndarray
    """Unit-variance Student-t shock of each bar (its size also drives volume)."""
    up: np.ndarray
    """Highest latent log price in the bar, above its open."""
    down: np.ndarray
    """Lowest latent log price in the bar, below its open (negative)."""
    oracle: np.ndarray
    """E[next bar's latent return | now]: the planted signal (0 without one; NaN last)."""


def _regimes(rng: np.random.Generator, n: int, d: Dynamics) -> np.ndarray:
    """1 in stressed bars, 0 in calm ones: a two-state Markov chain, started stationary."""
    stressed = rng.random() < d.stress_bars / (d.calm_bars + d.stress_bars)
    state = np.empty(n)
    at = 0
    while at < n:
        length = rng.geometric(1.0 / (d.stress_bars if stressed else d.calm_bars))
        state[at : at + length] = float(stressed)
        at, stressed = at + length, not stressed
    return state


def _ar1(rng: np.random.Generator, n: int, phi: float, sd: float) -> np.ndarray:
    """A stationary AR(1) with standard deviation ``sd``."""
    shocks = rng.standard_normal(n) * sd * math.sqrt(1 - phi**2)
    out = np.empty(n)
    level = rng.standard_normal() * sd
    for i in range(n):
        level = phi * level + shocks[i]
        out[i] = level
    return out


def _student(rng: np.random.Generator, size: int, dof: float) -> np.ndarray:
    """Student-t draws scaled to unit variance."""
    return rng.standard_t(dof, size) * math.sqrt((dof - 2) / dof)


def _bridge_extremes(
    rng: np.random.Generator, move: np.ndarray, sigma: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Max and min of a Brownian bridge from 0 to ``move`` with variance ``sigma^2``.

    Exact marginals (the reflection principle): M = (x + sqrt(x^2 - 2 s^2 ln U)) / 2.
    """
    spread = -2 * sigma**2
    up = (move + np.sqrt(move**2 + spread * np.log(rng.random(len(move))))) / 2
    down = (move - np.sqrt(move**2 + spread * np.log(rng.random(len(move))))) / 2
    return up, down


@lru_cache(maxsize=8)
def latent(spec: SyntheticSpec) -> Latent:
    """The shared path of a spec (cached: every venue of a seed reuses it)."""
    d = PRESETS[spec.bar]
    index = spec.index()
    n = len(index)
    rng = np.random.default_rng([spec.seed, 0])
    stress = _regimes(rng, n, d) * d.stress_jump
    log_var = stress + _ar1(rng, n, d.persistence, d.vol_of_vol)
    p_stress = d.stress_bars / (d.calm_bars + d.stress_bars)
    mean_var = (1 - p_stress + p_stress * math.exp(d.stress_jump)) * math.exp(d.vol_of_vol**2 / 2)
    sigma = d.vol * np.sqrt(np.exp(log_var) / mean_var)
    e = _student(rng, n + 3, d.tail_dof)  # three innovations before the first bar
    momentum = (e[2:] + e[1:-1] + e[:-2]) / math.sqrt(3)  # s_t for t = -1 .. n-1
    beta = math.sqrt(spec.signal)
    returns = sigma * (beta * momentum[:-1] + math.sqrt(1 - spec.signal) * e[3:])
    log_close = math.log(START_PRICE) + np.cumsum(returns)
    up, down = _bridge_extremes(rng, returns, sigma)
    oracle = np.append(beta * sigma[1:] * momentum[1:-1], np.nan)
    return Latent(index, log_close, sigma, log_var - log_var.mean(), e[3:], up, down, oracle)


# ----------------------------------------------------------------------------------------
# One venue


@dataclass(frozen=True)
class VenueParams:
    """What makes one synthetic venue differ from the others of its seed."""

    fee_bps: float
    """Taker fee, basis points (for cost-aware metrics; higher fees go with wider quotes)."""
    noise: float
    """Close noise as a fraction of the bar's volatility (the ``k`` of the module docs)."""
    volume_scale: float
    """Typical volume per bar, in the base asset."""
    zero_volume_rate: float
    """Chance that a bar is flat with no trade."""
    outages_per_year: float
    """Mean number of outages (missing bars) per year."""


def _bar_step(bar: str) -> pd.Timedelta:
    """``"1d"`` / ``"1h"`` as a Timedelta, without pandas' deprecated lower-case day alias."""
    import pandas as pd

    unit = {"d": "days", "h": "hours"}[bar[-1]]
    return pd.Timedelta(**{unit: int(bar[:-1])})


_FEE_TIERS_BPS = (10.0, 15.0, 20.0, 25.0, 40.0, 50.0, 60.0)


def _venue_params(rng: np.random.Generator, bar: str) -> VenueParams:
    import pandas as pd

    fee = float(rng.choice(_FEE_TIERS_BPS))
    bars_per_day = pd.Timedelta(days=1) / _bar_step(bar)
    return VenueParams(
        fee_bps=fee,
        noise=fee / 2000 * float(rng.uniform(0.5, 1.0)),
        volume_scale=float(np.exp(rng.uniform(np.log(50), np.log(5000)))) / bars_per_day,
        zero_volume_rate=float(rng.uniform(0.0, 0.004)),
        outages_per_year=float(rng.uniform(0.25, 2.0)),
    )


def _outages(rng: np.random.Generator, index: pd.DatetimeIndex, rate: float) -> np.ndarray:
    """Bars whose open time falls in an outage: hours to days long (log-normal)."""
    import pandas as pd

    span = (index[-1] - index[0]) / pd.Timedelta(days=365.25)
    missing = np.zeros(len(index), dtype=bool)
    stamps = index.asi8
    for _ in range(rng.poisson(rate * span)):
        start = rng.integers(stamps[0], stamps[-1])
        hours = float(np.exp(rng.normal(np.log(12.0), 1.2)))
        missing |= (stamps >= start) & (stamps < start + int(hours * 3.6e12))
    missing[0] = False  # the series starts where the spec says
    return missing


def _stale_forward(values: np.ndarray, stale: np.ndarray) -> np.ndarray:
    """``values`` with each stale position holding the last fresh value before it."""
    last_fresh = np.maximum.accumulate(np.where(stale, 0, np.arange(len(values))))
    return values[last_fresh]


@dataclass(frozen=True)
class SyntheticVenue:
    """One generated instance: its bars, its parameters and its planted signal."""

    bars: pd.DataFrame
    """Timestamp column and OHLCV, as a reader's raw frame (gaps already missing)."""
    params: VenueParams
    oracle: pd.Series
    """The planted conditional mean of the next latent return, per bar."""
    true_r2: float
    """Out-of-sample R^2 of the oracle on this venue's next-bar log return."""


def generate(spec: SyntheticSpec, instance: int) -> SyntheticVenue:
    """Generate venue ``instance`` of ``spec``, deterministically from (seed, instance)."""
    import pandas as pd

    from sigmax_fl.data.parsing import OHLCV

    path = latent(spec)
    rng = np.random.default_rng([spec.seed, 1, instance])
    params = _venue_params(rng, spec.bar)
    n = len(path.index)
    noise = params.noise * path.sigma
    close = path.log_close + noise * rng.standard_normal(n)
    flat = rng.random(n) < params.zero_volume_rate
    flat[0] = False
    close = _stale_forward(close, flat)
    latent_open = np.concatenate([[math.log(START_PRICE)], path.log_close[:-1]])
    opening = np.concatenate([latent_open[:1], close[:-1]])
    high = np.maximum.reduce(
        [opening, close, latent_open + path.up + noise * rng.standard_normal(n)]
    )
    low = np.minimum.reduce(
        [opening, close, latent_open + path.down + noise * rng.standard_normal(n)]
    )
    log_volume = 0.5 * path.log_var + 0.35 * np.abs(path.innovation)
    volume = params.volume_scale * np.exp(log_volume + 0.25 * rng.standard_normal(n) - 0.4)
    high, low, volume = np.where(flat, close, high), np.where(flat, close, low), volume * ~flat
    opening = np.where(flat, close, opening)
    keep = ~_outages(rng, path.index, params.outages_per_year)
    bars = pd.DataFrame(
        {
            "timestamp": path.index[keep],
            **dict(zip(OHLCV[:4], np.exp([opening, high, low, close])[:, keep], strict=True)),
            "volume": volume[keep],
        }
    )
    oracle = pd.Series(path.oracle[keep], index=path.index[keep], name="oracle")
    true_r2 = spec.signal / (1 + 2 * params.noise**2)
    return SyntheticVenue(bars, params, oracle, true_r2)


def load(path: str, policy: str = "strict") -> pd.DataFrame:
    """The canonical frame of one synthetic instance (what :func:`load_ohlcv` returns).

    The bars go through :func:`sigmax_fl.data.validate.validate_bars` like a file's, so
    gaps and flat bars are reported the same way; ``attrs["synthetic"]`` says what it is.
    """
    from sigmax_fl.data.validate import validate_bars

    spec, instances = parse_spec(path)
    if len(instances) != 1:
        raise DataError(
            path,
            f"names {len(instances)} instances; load one with synthetic:instance=K",
            field=_FIELD,
        )
    venue = generate(spec, instances.start)
    bars = validate_bars(venue.bars, source=spec.path(instances.start), policy=policy)
    bars.attrs["synthetic"] = {
        "venue": VENUE,
        "instance_id": instance_id(instances.start),
        "spec": asdict(spec),
        "params": asdict(venue.params),
        "true_r2": venue.true_r2,
        "generator_version": GENERATOR_VERSION,
    }
    return bars

"""The 50 market features, the target, the shared calendar splits and the scaler.

Every feature at bar t uses bars at or before t only, computed in trading time: windows
run over the bars that exist, and missing bars are never filled in. The target
(:mod:`sigmax_fl.targets`) is the log return, or the log realised volatility, over the bars
t + 1 .. t + horizon; a row whose target spans a gap longer
than ``max_gap`` is dropped (an exchange outage would otherwise look like a huge one-bar move),
and the count is reported.

pandas is imported where features are computed, not with this module: an instance whose
features are cached reads only the names, the version and its :class:`Scaler` here, in every
ClientApp process (:mod:`sigmax_fl.dates` says what that import costs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sigmax_fl.data import DataError
from sigmax_fl.settings import parse_duration
from sigmax_fl.targets import make_target

if TYPE_CHECKING:
    import pandas as pd

FEATURE_VERSION = 2
"""Bumped whenever a feature's definition changes, so instance caches are rebuilt.

2: RSI, ATR and the EMAs (MACD, distance to EMA) seeded with the simple mean of their first
window, as Wilder and TA-Lib define them; MACD's signal line is the EMA of the MACD line
itself (normalised by the close afterwards); Bollinger bands use the population standard
deviation; RSI of a window without any change is neutral (0), not the maximum.
"""

RETURN_HORIZONS = (1, 2, 3, 5, 10, 20, 60)
RETURN_LAGS = (1, 2, 3, 4, 5)
VOL_WINDOWS = (5, 10, 20, 60)
RANGE_VOL_WINDOWS = (10, 20)
SMA_WINDOWS = (5, 10, 20, 60)
EMA_SPANS = (12, 26)
VOLUME_WINDOWS = (5, 20, 60)

FEATURE_NAMES: tuple[str, ...] = (
    *(f"ret_{k}" for k in RETURN_HORIZONS),
    *(f"ret_1_lag_{k}" for k in RETURN_LAGS),
    *(f"vol_cc_{n}" for n in VOL_WINDOWS),
    *(f"vol_parkinson_{n}" for n in RANGE_VOL_WINDOWS),
    *(f"vol_garman_klass_{n}" for n in RANGE_VOL_WINDOWS),
    "candle_body",
    "candle_upper_wick",
    "candle_lower_wick",
    "candle_range",
    "close_location",
    "rsi_7",
    "rsi_14",
    "macd",
    "macd_signal",
    "macd_hist",
    "bollinger_position_20",
    "bollinger_width_20",
    "stochastic_k_14",
    "stochastic_d_3",
    *(f"dist_sma_{n}" for n in SMA_WINDOWS),
    *(f"dist_ema_{n}" for n in EMA_SPANS),
    "atr_14",
    *(f"volume_z_{n}" for n in VOLUME_WINDOWS),
    "illiquidity_20",
    "hour_sin",
    "hour_cos",
    "weekday_sin",
    "weekday_cos",
    "us_session",
)
assert len(FEATURE_NAMES) == 50

WARMUP_BARS = 61
"""The longest window (60 returns, so 61 closes); earlier rows have incomplete features."""


def _safe_div(num: pd.Series, den: pd.Series, fill: float) -> pd.Series:
    """Num / den, with ``fill`` where den is zero (a flat window has no defined ratio)."""
    return (num / den.where(den != 0)).fillna(fill).where(num.notna() & den.notna())


def _seeded_ewm(series: pd.Series, n: int, alpha: float) -> pd.Series:
    """Exponential smoothing whose first value is the mean of the first ``n`` values.

    The standard seed (Wilder; TA-Lib): starting from the first value alone, as pandas does,
    would give that one bar the weight of a whole window for dozens of bars.
    """
    import pandas as pd

    values = series.to_numpy(dtype="float64", copy=True)
    valid = np.flatnonzero(~np.isnan(values))
    if len(valid) < n:
        return pd.Series(np.nan, index=series.index)
    first, seed_at = valid[0], valid[0] + n - 1
    seed = values[first : seed_at + 1].mean()
    values[:seed_at] = np.nan
    values[seed_at] = seed
    return pd.Series(values, index=series.index).ewm(alpha=alpha, adjust=False).mean()


def _wilder(series: pd.Series, n: int) -> pd.Series:
    """Wilder's smoothing (RSI, ATR): weight 1/n, seeded with the mean of the first n."""
    return _seeded_ewm(series, n, 1.0 / n)


def _ema(series: pd.Series, span: int) -> pd.Series:
    """EMA of ``span`` bars (weight 2/(span+1)), seeded with the mean of the first span."""
    return _seeded_ewm(series, span, 2.0 / (span + 1))


def _rsi(close: pd.Series, n: int) -> pd.Series:
    """Wilder's RSI scaled to [-1, 1]; a window without any change is neutral (0)."""
    delta = close.diff()
    gain = _wilder(delta.clip(lower=0), n)
    loss = _wilder(-delta.clip(upper=0), n)
    return 2 * _safe_div(gain, gain + loss, 0.5) - 1


def compute_features(bars: pd.DataFrame) -> pd.DataFrame:
    """All 50 features for every bar (NaN during warm-up), in :data:`FEATURE_NAMES` order."""
    import pandas as pd

    o, h, lo, c, v = (bars[k].astype("float64") for k in ("open", "high", "low", "close", "volume"))
    log_c = np.log(c)
    r1 = log_c.diff()
    hl2 = np.log(h / lo) ** 2
    co2 = np.log(c / o) ** 2
    f: dict[str, pd.Series] = {}
    for k in RETURN_HORIZONS:
        f[f"ret_{k}"] = log_c.diff(k)
    for k in RETURN_LAGS:
        f[f"ret_1_lag_{k}"] = r1.shift(k)
    for n in VOL_WINDOWS:
        f[f"vol_cc_{n}"] = r1.rolling(n).std()
    for n in RANGE_VOL_WINDOWS:
        f[f"vol_parkinson_{n}"] = np.sqrt(hl2.rolling(n).mean() / (4 * np.log(2)))
    for n in RANGE_VOL_WINDOWS:
        gk = (0.5 * hl2 - (2 * np.log(2) - 1) * co2).rolling(n).mean()
        f[f"vol_garman_klass_{n}"] = np.sqrt(gk.clip(lower=0))
    f["candle_body"] = np.log(c / o)
    f["candle_upper_wick"] = np.log(h / np.maximum(o, c))
    f["candle_lower_wick"] = np.log(np.minimum(o, c) / lo)
    f["candle_range"] = np.log(h / lo)
    f["close_location"] = _safe_div(c - lo, h - lo, 0.5)
    f["rsi_7"] = _rsi(c, 7)
    f["rsi_14"] = _rsi(c, 14)
    ema = {n: _ema(c, n) for n in (12, 26, *EMA_SPANS)}  # MACD(12, 26) and dist_ema_n
    macd = ema[12] - ema[26]
    signal = _ema(macd, 9)
    f["macd"], f["macd_signal"], f["macd_hist"] = macd / c, signal / c, (macd - signal) / c
    sma20, std20 = c.rolling(20).mean(), c.rolling(20).std(ddof=0)
    f["bollinger_position_20"] = _safe_div(c - sma20, 2 * std20, 0.0)
    f["bollinger_width_20"] = 4 * std20 / sma20
    low14, high14 = lo.rolling(14).min(), h.rolling(14).max()
    f["stochastic_k_14"] = _safe_div(c - low14, high14 - low14, 0.5)
    f["stochastic_d_3"] = f["stochastic_k_14"].rolling(3).mean()
    for n in SMA_WINDOWS:
        f[f"dist_sma_{n}"] = log_c - np.log(c.rolling(n).mean())
    for n in EMA_SPANS:
        f[f"dist_ema_{n}"] = log_c - np.log(ema[n])
    prev_c = c.shift(1)
    true_range = pd.concat([h - lo, (h - prev_c).abs(), (lo - prev_c).abs()], axis=1).max(
        axis=1, skipna=False
    )
    f["atr_14"] = _wilder(true_range, 14) / c
    log_v = np.log1p(v)
    for n in VOLUME_WINDOWS:
        f[f"volume_z_{n}"] = _safe_div(log_v - log_v.rolling(n).mean(), log_v.rolling(n).std(), 0.0)
    dollar_volume = (c * v).rolling(20).sum()
    # Amihud: |return| per unit of turnover. A window without any trade has no price impact
    # to measure; it is NaN and the row is dropped, not set to a made-up number.
    f["illiquidity_20"] = np.log1p(
        1e9 * r1.abs().rolling(20).sum() / dollar_volume.where(dollar_volume > 0)
    )
    stamps = bars.index
    hour = pd.Series(stamps.hour + stamps.minute / 60.0, index=stamps)
    weekday = pd.Series(stamps.day_of_week.astype("float64"), index=stamps)
    f["hour_sin"] = np.sin(2 * np.pi * hour / 24)
    f["hour_cos"] = np.cos(2 * np.pi * hour / 24)
    f["weekday_sin"] = np.sin(2 * np.pi * weekday / 7)
    f["weekday_cos"] = np.cos(2 * np.pi * weekday / 7)
    f["us_session"] = ((hour >= 13.5) & (hour < 20)).astype("float64")
    frame = pd.DataFrame(f, index=bars.index)[list(FEATURE_NAMES)]
    return frame.replace([np.inf, -np.inf], np.nan)


def target_spans_gap(index: pd.DatetimeIndex, horizon: int, max_gap: pd.Timedelta) -> np.ndarray:
    """True where the bars t..t+horizon contain a step longer than ``max_gap``."""
    import pandas as pd

    steps = pd.Series(index).diff().shift(-1)  # step from bar i to bar i+1
    too_long = (steps > max_gap).to_numpy()
    spans = np.zeros(len(index), dtype=bool)
    for j in range(horizon):
        spans |= np.roll(too_long, -j) & (np.arange(len(index)) + j < len(index))
    return spans


def make_features(
    bars: pd.DataFrame,
    horizon: int = 1,
    *,
    max_gap: str | pd.Timedelta = "3d",
    target: str = "return",
) -> tuple[pd.DataFrame, pd.Series]:
    """Features and target for every usable bar of one instance.

    Parameters
    ----------
    bars : pandas.DataFrame
        The canonical frame of :func:`sigmax_fl.data.load_ohlcv`.
    horizon : int
        Bars ahead the target looks.
    max_gap : str or Timedelta
        Longest step between bars a target may span (``"3d"`` lets an FX weekend pass and
        drops a row whose next close comes after an exchange outage).
    target : str
        ``"return"`` or ``"volatility"`` (:mod:`sigmax_fl.targets`); the features are the same.

    Returns
    -------
    X : pandas.DataFrame
        float32, shape (n, 50), columns :data:`FEATURE_NAMES`, indexed by bar time.
        ``X.attrs["dropped"]`` counts rows lost to warm-up, to long gaps and to an undefined
        target (a volatility window of flat bars).
    y : pandas.Series
        float64 target over the next ``horizon`` bars, same index.
    """
    import pandas as pd

    source = bars.attrs.get("source", "bars")
    if horizon < 1:
        raise DataError(
            source, f"horizon must be a positive number of bars, got {horizon}", field="horizon"
        )
    if len(bars) < WARMUP_BARS + horizon + 1:
        raise DataError(
            source,
            f"{len(bars)} bars are too few: the longest feature window needs {WARMUP_BARS} "
            f"bars, plus {horizon} for the target",
        )
    gap = max_gap if isinstance(max_gap, pd.Timedelta) else parse_duration(max_gap)
    features = compute_features(bars)
    y = make_target(bars, target, horizon)
    warm = features.isna().any(axis=1).to_numpy()
    no_target = y.isna().to_numpy()
    tail = np.arange(len(bars)) >= len(bars) - horizon
    gapped = target_spans_gap(bars.index, horizon, gap) & ~no_target
    keep = ~(warm | no_target | gapped)
    X = features.loc[keep].astype("float32")
    X.attrs["dropped"] = {
        "warm_up_or_undefined": int((warm & ~tail).sum()),
        "no_future_bar": int(tail.sum()),
        "target_spans_gap": int((gapped & ~warm).sum()),
        "target_undefined": int((no_target & ~tail & ~warm).sum()),
    }
    return X, y.loc[keep]


@dataclass(frozen=True)
class Calendar:
    """The split dates every instance shares, so no one trains on another's test period."""

    train_end: pd.Timestamp
    val_end: pd.Timestamp
    embargo: int

    @classmethod
    def from_strings(cls, train_end: str, val_end: str, embargo: int) -> Calendar:
        import pandas as pd

        t, v = pd.Timestamp(train_end, tz="UTC"), pd.Timestamp(val_end, tz="UTC")
        if not t < v:
            raise ValueError(f"train-end ({train_end}) must come before val-end ({val_end})")
        # Inclusive end-of-day: a date means "up to and including that day".
        day = pd.Timedelta(days=1) - pd.Timedelta(1, "ns")
        return cls(t + day, v + day, embargo)

    def split(self, index: pd.DatetimeIndex) -> dict[str, np.ndarray]:
        """Positions of train / val / test rows, with ``embargo`` rows dropped at each boundary.

        A training row's target reaches ``embargo`` (= horizon) bars ahead, so the last rows
        before a boundary would learn from the next period's prices; the first rows after it
        are dropped too, so the two sides are separated by the embargo in both directions.
        """
        period = np.where(index <= self.train_end, 0, np.where(index <= self.val_end, 1, 2))
        positions = {
            name: np.flatnonzero(period == p) for p, name in enumerate(("train", "val", "test"))
        }
        e = self.embargo
        out = {
            "train": positions["train"][: len(positions["train"]) - e] if e else positions["train"],
            "val": positions["val"][e : len(positions["val"]) - e] if e else positions["val"],
            "test": positions["test"][e:],
        }
        return out


@dataclass(frozen=True)
class Scaler:
    """Per-feature mean and scale of training rows.

    One instance's own (it never leaves it), or the pooled one of ``scaler = "federated"``
    (:mod:`sigmax_fl.scaling`).
    """

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, X: np.ndarray) -> Scaler:
        if len(X) == 0:
            raise ValueError("cannot fit a scaler on zero training rows")
        return cls.of(X.mean(axis=0, dtype=np.float64), X.std(axis=0, dtype=np.float64))

    @classmethod
    def of(cls, mean: np.ndarray, std: np.ndarray) -> Scaler:
        """From a mean and standard deviation, the local fit's or the federated pooled one."""
        # A constant column (time of day on daily bars) carries no information: scale 1 maps
        # it to exactly 0 instead of 0/0.
        return cls(mean, np.where(std > 1e-12, std, 1.0))

    def transform(self, X: np.ndarray) -> np.ndarray:
        return ((X - self.mean) / self.scale).astype(np.float32)

    def inverse(self, X: np.ndarray) -> np.ndarray:
        """Back to raw feature values, in float64 (exact up to the float32 rounding of ``X``)."""
        return np.asarray(X, dtype=np.float64) * self.scale + self.mean

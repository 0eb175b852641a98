"""What a model learns to forecast at the close of bar t: the next return or the next volatility.

Both targets are functions of the one-bar log returns ``r_{t+1} .. r_{t+horizon}`` only (with
``r_j = ln(C_j / C_{j-1})``), so the realised window starts *after* t: whatever a feature knows
at t (bars up to and including t) is never part of the target it is paired with.

- ``return``: ``ln(C_{t+h} / C_t) = r_{t+1} + ... + r_{t+h}``, the multi-market use case's target;
- ``volatility``: ``ln sqrt(mean(r_{t+1}^2 .. r_{t+h}^2))``, the log of the realised volatility
  (root mean square of the log returns, not demeaned: over a few bars the mean return is noise
  and risk is about the size of moves, whatever their sign). The log makes the target roughly
  Gaussian and MSE a sensible loss; a window whose returns are all exactly zero (flat bars of a
  halted market) has no log volatility, and its row is dropped rather than given -inf.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

if TYPE_CHECKING:
    import pandas as pd

TARGETS = ("return", "volatility")
VALIDATION_METRICS = {"return": ("hit_rate", "ic", "rank_ic"), "volatility": ("qlike", "vol_corr")}
"""Besides the loss, what an instance reports on validation for each target (if it shares
metrics at all): a volatility forecast has no sign to hit, so no hit rate or IC."""


def log_returns(bars: pd.DataFrame) -> pd.Series:
    """One-bar log returns ``r_t = ln(C_t / C_{t-1})``, NaN at the first bar."""
    return np.log(bars["close"].astype("float64")).diff()


def forward_return(bars: pd.DataFrame, horizon: int) -> pd.Series:
    """Log return from the close of t to the close of t + horizon (NaN for the last bars)."""
    log_c = np.log(bars["close"].astype("float64"))
    return (log_c.shift(-horizon) - log_c).rename(f"log_return_{horizon}")


def _log_rms(returns: np.ndarray, horizon: int) -> np.ndarray:
    """Log root mean square of each window of ``horizon`` returns, at the window's last bar.

    Each window is summed on its own (not a running sum), so a window of zero returns is
    exactly zero and becomes NaN, never a rounding residue's log.
    """
    out = np.full(len(returns), np.nan)
    if len(returns) >= horizon:
        mean_sq = sliding_window_view(returns**2, horizon).mean(axis=1)
        with np.errstate(divide="ignore"):
            out[horizon - 1 :] = np.where(mean_sq > 0, 0.5 * np.log(mean_sq), np.nan)
    return out


def realised_volatility(bars: pd.DataFrame, horizon: int) -> pd.Series:
    """Log realised volatility of ``r_{t+1} .. r_{t+horizon}``, at t (NaN: last bars, flat)."""
    import pandas as pd  # here, not at the top: settings.py imports this module in every ClientApp

    trailing = _log_rms(log_returns(bars).to_numpy(), horizon)
    # The window ending at t + h belongs to row t.
    ahead = np.full(len(trailing), np.nan)
    ahead[: len(trailing) - horizon] = trailing[horizon:]
    return pd.Series(ahead, index=bars.index, name=f"log_volatility_{horizon}")


def trailing_volatility(bars: pd.DataFrame, horizon: int) -> pd.Series:
    """Log realised volatility of ``r_{t-horizon+1} .. r_t``: known at t (the naive forecast)."""
    import pandas as pd

    trailing = _log_rms(log_returns(bars).to_numpy(), horizon)
    return pd.Series(trailing, index=bars.index, name=f"log_volatility_last_{horizon}")


def make_target(bars: pd.DataFrame, target: str, horizon: int) -> pd.Series:
    """The run config's ``target`` for every bar; NaN where it is not defined."""
    if target == "return":
        return forward_return(bars, horizon)
    if target == "volatility":
        return realised_volatility(bars, horizon)
    raise ValueError(f"unknown target '{target}', expected one of {list(TARGETS)}")

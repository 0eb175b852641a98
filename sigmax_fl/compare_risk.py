"""Cross-portfolio risk model: federated vs local-only vs pooled volatility forecasts.

The risk use case: instances (portfolios, desks, venues) learn one model of the next
``horizon`` bars' realised volatility without pooling their returns. The three kinds, their
training, the choice of learning rate and round on validation loss alone, and the single test
prediction per kept model are :mod:`sigmax_fl.compare`'s, reused here unchanged; what differs
is the target, the log realised volatility (:func:`sigmax_fl.targets.realised_volatility`),
and the yardsticks risk forecasts are judged by:

- MSE of the log volatility (the training loss), QLIKE on variances, and the correlation of
  predicted and realised volatility (:mod:`sigmax_fl.metrics`);
- two naive baselines per instance: the last realised volatility (over the ``horizon`` bars
  ending at t) and a GARCH(1,1) fitted on that instance's training split only, then run
  through the later bars with its parameters fixed (filtered, never refitted), forecasting
  ``horizon`` bars ahead from each bar.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from arch import arch_model

from sigmax_fl import compare, metrics
from sigmax_fl.data import load_ohlcv
from sigmax_fl.targets import log_returns, trailing_volatility

COLUMNS = {"mse": "MSE (log vol)", "qlike": "QLIKE", "vol_corr": "vol correlation"}
"""The metrics reported, in table order, with their headers."""
FNS: dict[str, compare.Metric] = {
    "mse": metrics.mse,
    "qlike": metrics.qlike,
    "vol_corr": metrics.vol_correlation,
}
BASELINES = ("last_vol", "garch")
LABELS = {
    "federated": compare.LABELS["federated"],
    "pooled": compare.LABELS["pooled"],
    "local": compare.LABELS["local"],
    "last_vol": "last realised volatility",
    "garch": "GARCH(1,1), fitted on train",
}
DIFFERENCES = (("federated", "local"), ("federated", "pooled"), ("federated", "garch"))
GARCH_SCALE = 100.0
"""Returns enter the GARCH fit in percent: arch's optimiser is tuned for that scale."""
GARCH_SPEC = {"mean": "Zero", "vol": "GARCH", "p": 1, "q": 1, "dist": "normal", "rescale": False}
"""Zero mean: the target is the root mean square of returns, not their standard deviation."""


def garch_log_vol(
    returns: pd.Series, train_until: pd.Timestamp, horizon: int
) -> tuple[pd.Series, dict[str, float]]:
    """GARCH(1,1) log-volatility forecast over bars t+1 .. t+horizon, made at every bar t.

    Parameters
    ----------
    returns : pandas.Series
        One-bar log returns of the instance (NaN at the first bar is skipped).
    train_until : pandas.Timestamp
        The last bar whose return the fit may see: the end of the instance's training rows'
        targets. Later bars only update the conditional variance with the fitted parameters.
    horizon : int
        Bars ahead; the forecast is the log root of the mean of the 1..horizon-step variance
        forecasts, the same definition as the target.

    Returns
    -------
    forecast : pandas.Series
        Log volatility forecast indexed by origin bar t.
    params : dict
        The fitted omega, alpha, beta (percent^2 units) and the persistence alpha + beta.
    """
    scaled = returns.dropna() * GARCH_SCALE
    train = scaled[scaled.index <= train_until]
    fit = arch_model(train, **GARCH_SPEC).fit(disp="off")
    if fit.convergence_flag != 0:
        raise RuntimeError(f"GARCH(1,1) fit on {len(train)} returns did not converge")
    fixed = arch_model(scaled, **GARCH_SPEC).fix(fit.params)
    variance = fixed.forecast(horizon=horizon, start=0, reindex=False).variance
    forecast = 0.5 * np.log(variance.mean(axis=1) / GARCH_SCALE**2)
    params = {k: float(fit.params[k]) for k in ("omega", "alpha[1]", "beta[1]")}
    params["persistence"] = params["alpha[1]"] + params["beta[1]"]
    params["train_returns"] = len(train)
    return forecast, params


def baselines(
    market: compare.Market, bars: pd.DataFrame, horizon: int
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The instance's two naive test forecasts, and its GARCH parameters.

    The last realised volatility is undefined after ``horizon`` flat bars (zero returns);
    there the last defined value is carried forward, which is what a desk would use.
    """
    times = market.times("test")
    last = trailing_volatility(bars, horizon).ffill()
    # The training rows' targets reach ``horizon`` bars past the last training row.
    last_train = pd.Timestamp(market.data.arrays["t_train"][-1], tz="UTC")
    end = bars.index[min(bars.index.get_loc(last_train) + horizon, len(bars) - 1)]
    garch, params = garch_log_vol(log_returns(bars), end, horizon)
    return {
        "last_vol": last.reindex(times).to_numpy(),
        "garch": garch.reindex(times).to_numpy(),
    }, params


def risk(request: compare.Request) -> dict[str, Any]:
    """The three kinds and both baselines on the log realised volatility target."""
    started = time.monotonic()
    recipe = replace(request.recipe, target="volatility")
    horizon = recipe.horizon
    markets = compare.load_markets(request.sources, recipe)
    fits = compare.fit_seeds(markets, request.training, request.seeds, request.workers)
    trained = time.monotonic()
    naive, garch_params = {}, {}
    for source, market in zip(request.sources, markets, strict=True):
        bars = load_ohlcv(source.path, policy=recipe.data_policy)
        naive[market.instance_id], garch_params[market.instance_id] = baselines(
            market, bars, horizon
        )
    scopes = compare.build_scopes(markets, fits, naive)
    return {
        "use_case": "risk",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "note": compare.FEDERATION_NOTE,
        "config": {
            "data_sources": [s.instance_id for s in request.sources],
            "target": recipe.target,
            **request.training.record(),
            "seeds": list(request.seeds),
            "horizon": horizon,
            "train_end": recipe.train_end,
            "val_end": recipe.val_end,
            "bootstrap": {"resamples": request.n_boot, "mean_block": "ceil(sqrt(test bars))"},
        },
        "instances": {
            m.instance_id: {
                "rows": m.data.report["rows"],
                "dates": m.data.report["dates"],
                "bar_interval": str(m.bar_interval),
                "dropped_rows": m.data.report["dropped_rows"],
            }
            for m in markets
        },
        "garch": garch_params,
        "log_vol_correlation": {
            "all splits": compare.target_correlation(markets),
            "test": compare.target_correlation(markets, ("test",)),
        },
        "selection": compare._selection_summary(fits),
        "val_loss_per_round": compare._val_curves(fits, markets),
        "scopes": {
            s.name: compare.score_scope(
                s,
                0.0,
                horizon,
                request.n_boot,
                fns=FNS,
                differences=DIFFERENCES,
                not_applicable={},
            )
            for s in scopes
        },
        "seconds": {
            "training": round(trained - started, 1),
            "scoring": round(time.monotonic() - trained, 1),
        },
    }


def render_markdown(result: dict[str, Any]) -> str:
    """compare.md for the risk use case: set-up, tables per instance and overall, GARCH fits."""
    c = result["config"]
    seeds = c["seeds"]
    lines = [
        "# Federated vs local-only vs pooled: risk (realised volatility)",
        "",
        f"Instances: {', '.join(c['data_sources'])}. Target: log realised volatility of the "
        f"next {c['horizon']} bar(s), ln sqrt(mean r²) over bars t+1 .. t+{c['horizon']}. "
        f"Split: train to {c['train_end']}, validation to {c['val_end']}, test after (embargo "
        f"{c['horizon']} bar(s) at each boundary). Every model: {c['rounds']} rounds x "
        f"{c['local_epochs']} local epochs over each instance's training rows, batch "
        f"{c['batch_size']}, {c['optimizer']}, learning rate chosen from {c['learning_rates']} "
        f"and round kept chosen on validation loss (MSE of the log volatility) only; "
        f"{len(seeds)} seeds ({seeds[0]}..{seeds[-1]}); the test split is predicted once per "
        f"model. Wall time {result['seconds']['total']:.0f} s.",
        "",
        result["note"],
        "",
        "Cells: mean over seeds [95 % stationary block-bootstrap interval over test bars, mean "
        f"block ceil(sqrt(bars)), {c['bootstrap']['resamples']} resamples]. MSE is on the log "
        "volatility; QLIKE = RV/PV - ln(RV/PV) - 1 on variances (PV = exp(2 x forecast)), 0 "
        "for a perfect forecast, lower is better; vol correlation: Pearson correlation of "
        "predicted and realised volatility. Baselines: the realised volatility of the last "
        f"{c['horizon']} bar(s), and GARCH(1,1) (zero mean, normal) fitted on each instance's "
        "training split and filtered through the later bars with fixed parameters.",
        "",
    ]
    lines += compare.scope_sections(result, LABELS, columns=COLUMNS)
    lines += compare.selection_lines(result, LABELS)
    lines += [
        "",
        "## GARCH(1,1) fits (training split, returns in percent)",
        "",
        "| instance | returns | omega | alpha | beta | alpha + beta |",
        "|---|---|---|---|---|---|",
    ]
    for instance, p in result["garch"].items():
        lines.append(
            f"| {instance} | {p['train_returns']} | {p['omega']:.4f} | {p['alpha[1]']:.4f} | "
            f"{p['beta[1]']:.4f} | {p['persistence']:.4f} |"
        )
    for period, corr in result["log_vol_correlation"].items():
        what = f"the instances' realised log volatility ({period})"
        lines += compare.correlation_table(what, corr)
    return "\n".join([*lines, ""])


def write_outputs(result: dict[str, Any], out_dir: Path) -> None:
    """compare.json and compare.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.json").write_text(json.dumps(compare._json_safe(result), indent=1))
    (out_dir / "compare.md").write_text(render_markdown(result))

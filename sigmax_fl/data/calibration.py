"""How close the synthetic venues come to the bundled real series, and their planted signal.

Run ``python -m sigmax_fl.data.calibration``; the tables it prints are the ones quoted in
README (Data, "Synthetic venues") (about 5 s). Both sides go through the same code: bars from
:func:`sigmax_fl.data.load_ohlcv`, statistics from :func:`return_stats`.
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from sigmax_fl.data import synthetic
from sigmax_fl.data.formats import load_ohlcv
from sigmax_fl.paths import project_root

ACF_LAGS = (1, 5, 20)
REAL_SERIES = {
    # name: (file in data/, first day): daily from 2016, the synthetic default window.
    "real coinbase btc-usd 1d": ("Coinbase_BTCUSD_d.csv", "2016-01-01"),
    "real bitstamp btc-usd 1d": ("bitstamp_BTC_ETH_LTC_USD_d.csv#BTC", "2016-01-01"),
    "real coinbase btc-usd 1h": ("Coinbase_BTCUSD_1h.csv", None),
}


def return_stats(bars: pd.DataFrame) -> dict[str, float]:
    """Fat tails and volatility clustering of a series' log returns (bar to bar).

    Returns
    -------
    dict
        ``bars``, ``sd`` (of log returns), ``excess_kurtosis`` (0 for a normal law) and
        ``acf_abs_<k>``: the autocorrelation of |log return| at lag k, which is near 0 for
        independent returns and stays positive for days when volatility clusters.
    """
    r = np.diff(np.log(bars["close"].to_numpy(dtype="float64")))
    centred = r - r.mean()
    stats = {
        "bars": float(len(bars)),
        "sd": float(r.std()),
        "excess_kurtosis": float((centred**4).mean() / (centred**2).mean() ** 2 - 3),
    }
    size = np.abs(r) - np.abs(r).mean()
    for lag in ACF_LAGS:
        stats[f"acf_abs_{lag}"] = float((size[lag:] * size[:-lag]).mean() / (size**2).mean())
    return stats


def _real(file: str, start: str | None) -> pd.DataFrame:
    root = project_root()
    if root is None:
        raise FileNotFoundError("the bundled data/ folder is needed to compare with real data")
    bars = load_ohlcv(root / "data" / file, policy="repair")
    return bars if start is None else bars.loc[start:]


def calibration_table(seeds: int = 16) -> pd.DataFrame:
    """Real series next to synthetic ones: median, 10th and 90th percentile over seeds.

    A synthetic row is instance 0 of seeds ``0 .. seeds-1`` (each seed is an independent
    latent path; instances of one seed share it, so they would not show the spread).
    """
    rows = {name: return_stats(_real(file, start)) for name, (file, start) in REAL_SERIES.items()}
    for bar in synthetic.PRESETS:
        per_seed = pd.DataFrame(
            [
                return_stats(synthetic.load(synthetic.SyntheticSpec(seed=s, bar=bar).path(0)))
                for s in range(seeds)
            ]
        )
        for label, q in (("median", 0.5), ("p10", 0.1), ("p90", 0.9)):
            rows[f"synthetic {bar} {label}"] = per_seed.quantile(q).to_dict()
    return pd.DataFrame(rows).T


def oracle_r2(spec: synthetic.SyntheticSpec, instances: range) -> tuple[float, float]:
    """(stated true R^2, R^2 of the oracle measured on every usable feature row), pooled.

    Uses the rows :func:`sigmax_fl.features.make_features` keeps, so gaps, flat bars and
    the dropped long-gap targets count as they do in training.
    """
    from sigmax_fl.features import make_features  # features imports this package

    stated, ys, predictions = [], [], []
    for i in instances:
        venue = synthetic.generate(spec, i)
        _, y = make_features(synthetic.load(spec.path(i)))
        ys.append(y.to_numpy())
        predictions.append(venue.oracle.reindex(y.index).to_numpy())
        stated.append(venue.true_r2)
    y, p = np.concatenate(ys), np.concatenate(predictions)
    return float(np.mean(stated)), float(1 - ((y - p) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def signal_table(signals: tuple[float, ...] = (0.01, 0.05)) -> pd.DataFrame:
    """The planted signal's stated R^2 next to a large-sample measurement of it."""
    rows = []
    for bar, seeds in (("1d", 40), ("1h", 8)):
        for rho in signals:
            stated, measured, bars = [], [], 0
            for seed in range(seeds):
                spec = synthetic.SyntheticSpec(seed=seed, signal=rho, bar=bar)
                s, m = oracle_r2(spec, range(1))
                stated.append(s)
                measured.append(m)
                bars += len(spec.index())
            rows.append(
                {
                    "bar": bar,
                    "signal": rho,
                    "stated true R^2": float(np.mean(stated)),
                    "oracle R^2 measured": float(np.mean(measured)),
                    "+- (s.e. over seeds)": float(np.std(measured) / np.sqrt(seeds)),
                    "bars simulated": bars,
                }
            )
    return pd.DataFrame(rows)


_FORMATS = {
    "bars": "{:.0f}".format,
    "sd": "{:.4f}".format,
    "excess_kurtosis": "{:.2f}".format,
    **{f"acf_abs_{lag}": "{:.3f}".format for lag in ACF_LAGS},
}


def main(argv: list[str] | None = None) -> None:
    """Print the calibration and planted-signal tables (``--seeds`` per synthetic row)."""
    parser = argparse.ArgumentParser(prog="python -m sigmax_fl.data.calibration")
    parser.add_argument("--seeds", type=int, default=16, help="seeds per synthetic row")
    args = parser.parse_args(argv)
    print("Log returns bar to bar: real series vs synthetic venues\n")
    print(calibration_table(args.seeds).to_string(formatters=_FORMATS))
    print("\nPlanted signal: stated true R^2 vs the oracle's R^2 measured on usable rows\n")
    with pd.option_context("display.float_format", "{:.4f}".format):
        print(signal_table().to_string(index=False))


if __name__ == "__main__":
    main()

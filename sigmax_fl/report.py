"""``sigmax-fl report RUN_DIR``: plots and ``report.md`` from a run folder's history.

Reads only what the ServerApp writes (``history.jsonl``, else ``history.json``, and
``summary.json`` if the run finished), so it also works on a run that is still going or that
crashed: every finished round is in the JSONL.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

HISTORY_FILES = ("history.jsonl", "history.json")
QUALITY = {
    "return": (
        ("evaluate", "ic", "IC"),
        ("evaluate", "rank_ic", "rank IC"),
        ("evaluate", "hit_rate", "hit rate"),
    ),
    "volatility": (("evaluate", "qlike", "QLIKE"), ("evaluate", "vol_corr", "vol corr")),
}
"""(phase, metric key, title) of the validation forecast quality each target reports."""
LOSSES = (("train", "train_loss", "train loss"), ("evaluate", "val_loss", "val loss"))
REASON_CHARS = 160
"""A rejected reply's reason is cut to this length in report.md (tracebacks run long)."""

Record = dict[str, Any]


def load_history(run_dir: Path) -> list[Record]:
    """The run's rounds, in order, from history.jsonl (crash-safe) or history.json."""
    jsonl, whole = (run_dir / name for name in HISTORY_FILES)
    if jsonl.is_file():
        history = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    elif whole.is_file():
        history = json.loads(whole.read_text())
    else:
        raise FileNotFoundError(f"{run_dir}: no {' or '.join(HISTORY_FILES)}; is it a run folder?")
    if not history:
        raise ValueError(f"{run_dir}: the history holds no round yet")
    return sorted(history, key=lambda r: r["round"])


def _number(value: object) -> float:
    """A metric as float, NaN when absent or not a number (a skipped round has none)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


def _series(history: list[Record], get: Callable[[Record], object]) -> np.ndarray:
    return np.array([_number(get(r)) for r in history])


def _instances(history: list[Record]) -> list[str]:
    """Every instance seen in any round, in order of first appearance."""
    seen: dict[str, None] = {}
    for record in history:
        seen.update(dict.fromkeys(record.get("instances", {})))
    return list(seen)


def _instance_metric(instance: str, phase: str, key: str) -> Callable[[Record], object]:
    return lambda r: r.get("instances", {}).get(instance, {}).get(phase, {}).get(key)


def _plot_panels(
    history: list[Record], panels: list[tuple[str, str, str]], path: Path, title: str
) -> None:
    """One panel per (phase, key, label): the aggregate as a thick line, each instance thin."""
    rounds = [r["round"] for r in history]
    instances = _instances(history)
    fig = Figure(figsize=(5.2 * len(panels), 3.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (phase, key, label) in zip(axes, panels, strict=True):
        for instance in instances:
            values = _series(history, _instance_metric(instance, phase, key))
            if np.isfinite(values).any():
                ax.plot(rounds, values, marker=".", linewidth=1, alpha=0.8, label=instance)
        aggregate = _series(history, lambda r, p=phase, k=key: r.get(p, {}).get(k))
        if np.isfinite(aggregate).any():
            ax.plot(rounds, aggregate, color="black", linewidth=2.2, marker="o", label="all")
        ax.set_title(label)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:  # a run whose rounds all failed has no lines
        axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


def plot_losses(history: list[Record], path: Path) -> None:
    """Train and validation loss per round, aggregated and per instance."""
    _plot_panels(
        history,
        [("train", "train_loss", "train loss (MSE)"), ("evaluate", "val_loss", "val loss (MSE)")],
        path,
        "Losses per round (black: example-weighted over instances)",
    )


def target_of(history: list[Record], run_dir: Path | None = None) -> str:
    """The run's target: its ``run_config.json`` says; else QLIKE in the history means a risk model.

    The history alone can mislead: with ``share-instance-metrics = false`` no quality metric
    reaches the server.
    """
    config = run_dir / "run_config.json" if run_dir is not None else None
    if config is not None and config.is_file():
        return str(json.loads(config.read_text()).get("target", "return"))
    evaluated = (r.get("evaluate", {}) for r in history)
    return "volatility" if any("qlike" in e for e in evaluated) else "return"


def plot_ic(history: list[Record], path: Path) -> None:
    """Validation forecast quality per round (IC, rank IC, hit rate; or QLIKE, vol corr)."""
    _plot_panels(
        history,
        list(QUALITY[target_of(history, path.parent)]),
        path,
        "Validation forecast quality per round (black: example-weighted over instances)",
    )


def _bytes(history: list[Record]) -> dict[str, np.ndarray]:
    """Bytes per round that the history records: sent to and received from instances."""
    found = {
        "sent to instances": _series(history, lambda r: r.get("bytes_sent")),
        "received from instances": _series(
            history, lambda r: r.get("train", {}).get("bytes-received")
        ),
    }
    return {name: values for name, values in found.items() if np.isfinite(values).any()}


def plot_bytes(history: list[Record], path: Path) -> bool:
    """Megabytes per round, up and down; False (and no file) when no round records bytes."""
    series = _bytes(history)
    if not series:
        return False
    rounds = [r["round"] for r in history]
    fig = Figure(figsize=(6, 3.6), layout="constrained")
    ax = fig.subplots()
    for name, values in series.items():
        ax.plot(rounds, values / 1e6, marker="o", label=name)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("MB")
    ax.set_title("Model bytes per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    return True


def _fmt(value: object) -> str:
    x = _number(value)
    return "n/a" if not math.isfinite(x) else f"{x:.4g}"


def _best_round(history: list[Record], summary: dict[str, Any] | None) -> str:
    if summary and "best_round" in summary:
        return (
            f"Best round: {summary['best_round']} by {summary.get('best_metric', 'val_loss')} "
            f"= {_fmt(summary.get('best_value'))}; final model from round "
            f"{summary.get('final_model_round', '?')} of {summary.get('rounds_run', '?')} run"
            + (" (stopped early)." if summary.get("stopped_early") else ".")
        )
    if history and all(r.get("skipped") for r in history):
        return (
            "No summary.json, and every round so far was skipped: nothing trained (a run that "
            "ends so fails and writes no final model)."
        )
    losses = _series(history, lambda r: r.get("evaluate", {}).get("val_loss"))
    if not np.isfinite(losses).any():
        return "No round has a validation loss yet."
    best = int(np.nanargmin(losses))
    return (
        f"No summary.json (run unfinished?). Lowest validation loss so far: round "
        f"{history[best]['round']} ({_fmt(losses[best])})."
    )


def render_report(
    run_dir: Path, history: list[Record], summary: dict[str, Any] | None, plots: list[str]
) -> str:
    """report.md: headline, one row per round, per-instance last round, rejections, plots."""
    byte_series = _bytes(history)
    columns = (*LOSSES, *QUALITY[target_of(history, run_dir)])
    header = ["round", "seconds", "skipped", *(c[2] for c in columns)]
    header += ["replies ok", "rejected", *(f"MB {name}" for name in byte_series)]
    lines = [
        f"# Run report: {run_dir.name}",
        "",
        f"{len(history)} round(s) recorded in `{run_dir}`. "
        "Aggregated metrics are weighted by each instance's examples.",
        "",
        _best_round(history, summary),
        "",
        "## Per round",
        "",
        "| " + " | ".join(header) + " |",
        "|---" * len(header) + "|",
    ]
    for i, r in enumerate(history):
        cells = [str(r["round"]), _fmt(r.get("seconds")), "yes" if r.get("skipped") else ""]
        cells += [_fmt(r.get(phase, {}).get(key)) for phase, key, _ in columns]
        train = r.get("train", {})
        cells += [_fmt(train.get("replies-ok")), _fmt(train.get("replies-rejected"))]
        cells += [_fmt(values[i] / 1e6) for values in byte_series.values()]
        lines.append("| " + " | ".join(cells) + " |")

    last, quality = history[-1], QUALITY[target_of(history, run_dir)]
    lines += [
        "",
        f"## Per instance, round {last['round']}",
        "",
        "| instance | accepted | train loss | val loss | "
        + " | ".join(title for _, _, title in quality)
        + " |",
        "|---" * (4 + len(quality)) + "|",
    ]
    for instance, entry in last.get("instances", {}).items():
        train, evaluate = entry.get("train", {}), entry.get("evaluate", {})
        accepted = {True: "yes", False: "no"}.get(train.get("accepted"), "n/a")
        cells = [accepted, _fmt(train.get("train_loss"))]
        cells += [_fmt(evaluate.get(k)) for k in ("val_loss", *(key for _, key, _ in quality))]
        lines.append(f"| {instance} | " + " | ".join(cells) + " |")

    rejected = [
        (r["round"], instance, phase, entry[phase]["reason"])
        for r in history
        for instance, entry in r.get("instances", {}).items()
        for phase in ("train", "evaluate")
        if entry.get(phase, {}).get("reason")
    ]
    if rejected:
        lines += ["", "## Replies left out", "", "| round | instance | phase | reason |"]
        lines.append("|---|---|---|---|")
        for server_round, instance, phase, reason in rejected:
            text = " ".join(str(reason).split()).replace("|", "/")
            if len(text) > REASON_CHARS:
                text = text[: REASON_CHARS - 1] + "…"
            lines.append(f"| {server_round} | {instance} | {phase} | {text} |")

    lines += ["", "## Plots", ""]
    lines += [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def report(run_dir: str | Path) -> Path:
    """Draw the run's PNG plots and write ``report.md`` next to them; return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: not a folder")
    history = load_history(run_dir)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    plot_losses(history, run_dir / "losses.png")
    plot_ic(history, run_dir / "ic.png")
    plots = ["losses.png", "ic.png"]
    if plot_bytes(history, run_dir / "bytes.png"):
        plots.append("bytes.png")
    path = run_dir / "report.md"
    path.write_text(render_report(run_dir, history, summary, plots))
    return path

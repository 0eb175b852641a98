"""sigmax-fl ServerApp: rounds of weighted FedAvg over the trading instances.

Each round: send the global model to the sampled instances, screen and average their
updates, have them score the new model on their validation rows, record the round, and
checkpoint the server state so that a killed run resumes exactly where it stopped.
"""

from __future__ import annotations

import json
import logging
import pickle
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from sigmax_fl import exchange, personal, runs, scaling, secagg
from sigmax_fl.model import build_model
from sigmax_fl.privacy import CentralAccountant, central_noise_std
from sigmax_fl.settings import STOPPING_METRICS, Settings
from sigmax_fl.strategy import (
    EPSILON_KEY,
    EVALUATE_RECEIVED_KEY,
    EVALUATION_KEY,
    Screened,
    WeightedFedAvg,
    as_numpy,
)

log = logging.getLogger(f"flwr.{__name__}")

app = ServerApp()

RESUME_MAY_CHANGE = {
    "num-server-rounds",
    "resume-from",
    "round-timeout",
    "wait-for-nodes-timeout",
    "run-name",
}
"""Run-config keys a resumed run may set differently from the run it continues."""


@dataclass(frozen=True)
class ServerState:
    """Everything the next round depends on (FedJAX style): a checkpoint is this object.

    Its history is named there by line count and digest (:func:`runs.rewind`).
    """

    round: int
    arrays: dict[str, np.ndarray]
    best_round: int = 0
    best_score: float | None = None
    best_arrays: dict[str, np.ndarray] | None = None
    stale_rounds: int = 0
    rng: dict[str, Any] = field(default_factory=dict)
    privacy: dict[str, Any] = field(default_factory=dict)
    """The central-DP accountant's state: a resumed run keeps spending the same budget."""
    scaler: dict[str, Any] = field(default_factory=dict)
    """``scaler = "federated"``: the pooled mean and scale every instance normalises with
    (:func:`sigmax_fl.scaling.collect`); a resumed run sends the same ones."""
    history: tuple[dict[str, Any], ...] = ()
    """Rounds whose global model has been scored, oldest first."""
    history_digest: str = ""
    """:func:`runs.chain_digest` of the history as written to ``history.jsonl``: a checkpoint
    names its rounds there instead of holding them."""
    unscored: dict[str, Any] | None = None
    """The record of round ``round`` while its model awaits its scores: with
    ``evaluate-on-receipt`` they come with the next round's train replies (or the closing
    evaluate phase), so a resumed run asks for them first."""

    def to_checkpoint(self, run_config: dict[str, Any]) -> dict[str, Any]:
        def tensors(arrays: dict[str, np.ndarray] | None) -> dict[str, torch.Tensor]:
            return {k: torch.from_numpy(np.array(v)) for k, v in (arrays or {}).items()}

        return {
            "round": self.round,
            "arrays": tensors(self.arrays),
            "best_round": self.best_round,
            "best_score": self.best_score,
            "best_arrays": tensors(self.best_arrays),
            "stale_rounds": self.stale_rounds,
            "rng": json.dumps(self.rng),
            "privacy": json.dumps(self.privacy),
            "scaler": json.dumps(self.scaler),
            "history_rounds": len(self.history),
            "history_digest": self.history_digest,
            "unscored": json.dumps(self.unscored, default=str),
            "run_config": json.dumps(run_config),
        }

    @classmethod
    def from_checkpoint(cls, payload: dict[str, Any]) -> ServerState:
        """The state a checkpoint holds, but for its history (:func:`runs.rewind`)."""

        def arrays(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
            return {k: v.numpy() for k, v in tensors.items()}

        return cls(
            round=int(payload["round"]),
            arrays=arrays(payload["arrays"]),
            best_round=int(payload["best_round"]),
            best_score=payload["best_score"],
            best_arrays=arrays(payload["best_arrays"]) or None,
            stale_rounds=int(payload["stale_rounds"]),
            rng=json.loads(payload["rng"]),
            privacy=json.loads(payload["privacy"]),
            scaler=json.loads(payload.get("scaler", "{}")),  # none before the federated scaler
            unscored=json.loads(payload.get("unscored", "null")),  # none before on-receipt
        )


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _verdict(s: Screened) -> dict[str, Any]:
    """A reply's metrics and whether it was accepted (and if not, why)."""
    return {**s.metrics, "accepted": s.ok, **({"reason": s.reason} if s.reason else {})}


def _trained_instances(train: list[Screened]) -> dict[str, dict[str, Any]]:
    """Per instance: its train verdict, metrics, update norm, weight and bytes."""
    return {
        s.instance_id: {
            "node_id": s.node_id,
            "train": {
                **_verdict(s),
                "update_norm": s.norm,
                "weight": s.weight,
                "bytes": s.payload_bytes,
            },
        }
        for s in train
    }


def _with_scores(
    instances: dict[str, dict[str, Any]], evaluate: list[Screened]
) -> dict[str, dict[str, Any]]:
    """``instances`` plus each scoring instance's validation verdict and metrics."""
    out = {name: dict(entry) for name, entry in instances.items()}
    for s in evaluate:
        out.setdefault(s.instance_id, {"node_id": s.node_id})["evaluate"] = _verdict(s)
    return out


def _improved(score: float | None, best: float | None, metric: str) -> bool:
    if score is None or not np.isfinite(score):
        return False
    if best is None:
        return True
    return score < best if STOPPING_METRICS[metric] == "min" else score > best


def _privacy(
    settings: Settings, accountant: CentralAccountant | None, train: list[Screened]
) -> dict[str, Any] | None:
    """Epsilon spent so far: per instance (central) or the largest per-row figure (local)."""
    if accountant is not None:
        return {"mode": "central", **accountant.report(settings.dp_delta)}
    if settings.dp == "local":
        spent = [s.metrics[EPSILON_KEY] for s in train if EPSILON_KEY in s.metrics]
        return {
            "mode": "local",
            "unit": "training row (largest over the instances that replied)",
            "epsilon": max(spent) if spent else None,
            "delta": settings.dp_delta,
        }
    return None


def run_round(
    state: ServerState,
    strategy: WeightedFedAvg,
    grid: Grid,
    settings: Settings,
    accountant: CentralAccountant | None = None,
) -> ServerState:
    """One federated round; returns the next state, leaving the given one untouched.

    ``accountant`` (central DP) is charged one Gaussian release for a round that changed the
    global model; a skipped round released nothing. With ``evaluate-on-receipt`` the round's
    model stays unscored (:attr:`ServerState.unscored`) until the next round's train replies,
    which score the previous one; otherwise an evaluate phase scores it at once.
    """
    server_round = state.round + 1
    started = time.monotonic()
    config = ConfigRecord(scaling.to_config(state.scaler))
    # evaluate-on-receipt: the previous round's scores come with this round's replies
    scoring = state.unscored is not None and strategy.fraction_evaluate > 0
    if scoring:
        config[EVALUATE_RECEIVED_KEY] = True

    # Train: send the global model, screen and average the replies
    train_replies = exchange.send_and_receive(
        grid,
        strategy.configure_train(server_round, _record(state.arrays), config, grid),
        timeout=settings.round_timeout,
    )
    _not_sent(strategy, train_replies)
    new_arrays, train_metrics = strategy.aggregate_train(server_round, train_replies)
    arrays = state.arrays if new_arrays is None else {k: as_numpy(a) for k, a in new_arrays.items()}
    if accountant is not None and new_arrays is not None:
        accountant.step(settings.dp_noise_multiplier, sampling_rate=1.0)
    if state.unscored is not None:
        # The replies also scored the model they received: the previous round's
        scores, scorers = None, []
        if scoring:
            scores = strategy.aggregate_evaluate(state.round, train_replies, EVALUATION_KEY)
            scorers = strategy.last_evaluate
        state = _scored(state, scores, scorers, settings.early_stopping_metric, seconds=0.0)

    # Record the round; its model's scores follow
    trained = round(time.monotonic() - started, 3)
    record: dict[str, Any] = {
        "round": server_round,
        "seconds": trained,
        "phase_seconds": {"train": trained, "evaluate": 0.0},
        "skipped": new_arrays is None,
        "bytes_sent": strategy.last_sent_bytes,
        "train": dict(train_metrics or {}),
        "evaluate": {},
        "instances": _trained_instances(strategy.last_train),
    }
    if (privacy := _privacy(settings, accountant, strategy.last_train)) is not None:
        record["privacy"] = privacy
    state = replace(
        state,
        round=server_round,
        arrays=arrays,
        privacy=accountant.state_dict() if accountant is not None else {},
        unscored=record,
    )
    if not settings.evaluate_on_receipt:
        state = evaluate_round(state, strategy, grid, settings)
    # After the round's train and evaluate samples: a resumed run draws its next from here
    return replace(state, rng=strategy.rng.bit_generator.state)


def _not_sent(strategy: WeightedFedAvg, replies: exchange.Replies) -> None:
    """Tell the strategy which of a phase's messages never left, and why."""
    strategy.not_sent(
        replies.unsent,
        "round-timeout ran out while its message waited for the simulation's in-flight window",
    )
    strategy.not_sent(replies.refused, "the SuperLink did not take the message")


def evaluate_round(
    state: ServerState, strategy: WeightedFedAvg, grid: Grid, settings: Settings
) -> ServerState:
    """Score the global model of round ``state.round`` in an evaluate phase of its own."""
    started = time.monotonic()
    strategy.last_sent_bytes = 0
    evaluate_replies = exchange.send_and_receive(
        grid,
        strategy.configure_evaluate(
            state.round,
            _record(state.arrays),
            ConfigRecord(scaling.to_config(state.scaler)),
            grid,
        ),
        timeout=settings.round_timeout,
    )
    _not_sent(strategy, evaluate_replies)
    scores = strategy.aggregate_evaluate(state.round, evaluate_replies)
    return _scored(
        state,
        scores,
        strategy.last_evaluate,
        settings.early_stopping_metric,
        seconds=time.monotonic() - started,
        bytes_sent=strategy.last_sent_bytes,
    )


def _scored(
    state: ServerState,
    scores: MetricRecord | None,
    evaluated: list[Screened],
    metric: str,
    seconds: float,
    bytes_sent: int = 0,
) -> ServerState:
    """The state with its unscored round scored, recorded and weighed for the best round.

    ``seconds`` and ``bytes_sent`` are those of the exchange that scored it (none when the
    scores came with train replies). The best round is kept by the validation metric, which
    early stopping restores.
    """
    record = dict(state.unscored or {})
    evaluate = dict(scores or {})
    record["evaluate"] = evaluate
    record["instances"] = _with_scores(record["instances"], evaluated)
    record["phase_seconds"] = {**record["phase_seconds"], "evaluate": round(seconds, 3)}
    record["seconds"] = round(record["seconds"] + seconds, 3)
    record["bytes_sent"] += bytes_sent
    score = evaluate.get(metric)
    better = _improved(score, state.best_score, metric)
    return replace(
        state,
        best_round=record["round"] if better else state.best_round,
        best_score=score if better else state.best_score,
        best_arrays=state.arrays if better else state.best_arrays,
        stale_rounds=0 if better else state.stale_rounds + 1,
        history=(*state.history, record),
        unscored=None,
    )


PROGRESS_METRICS = {
    "return": ("val_loss", "hit_rate", "ic"),
    "volatility": ("val_loss", "qlike", "vol_corr"),
}
"""The validation metrics the progress line shows, by target."""


def _progress(
    record: dict[str, Any], total: int, elapsed: float, done_here: int, target: str
) -> str:
    train, evaluate = record["train"], record["evaluate"]
    eta = elapsed / max(done_here, 1) * (total - record["round"])

    def fmt(value: object) -> str:
        return f"{value:.6g}" if isinstance(value, float) else "n/a"

    privacy = record.get("privacy")
    epsilon = f" epsilon={fmt(privacy['epsilon'])}" if privacy else ""
    return (
        f"round {record['round']}/{total} elapsed {elapsed:.1f}s ETA {eta:.0f}s: "
        f"train_loss={fmt(train.get('train_loss'))} "
        + "".join(f"{name}={fmt(evaluate.get(name))} " for name in PROGRESS_METRICS[target])
        + f"replies ok={train.get('replies-ok', 0)} rejected={train.get('replies-rejected', 0)}"
        + epsilon
        + (" SKIPPED (global model kept)" if record["skipped"] else "")
    )


def _report(
    run_dir: Path,
    state: ServerState,
    scored: int,
    settings: Settings,
    elapsed: float,
    first_round: int,
) -> ServerState:
    """Append the rounds scored after the first ``scored`` to the history file.

    Logs their progress lines; returns ``state`` with the history's new digest.
    """
    digest = state.history_digest
    for record in state.history[scored:]:
        digest = runs.chain_digest(digest, runs.append_history(run_dir, record))
        log.info(
            "sigmax-fl: %s",
            _progress(
                record,
                settings.num_server_rounds,
                elapsed,
                record["round"] - first_round,
                settings.target,
            ),
        )
    return replace(state, history_digest=digest)


def _central_noise_std(settings: Settings) -> float:
    """Noise std z * 2 * s_max * C: shares are renormalised over replies (sigmax_fl.privacy)."""
    if settings.dp != "central":
        return 0.0
    return central_noise_std(
        settings.dp_clip_norm,
        settings.dp_noise_multiplier,
        settings.max_weight_share,
        renormalised=True,
    )


def _budget_spent(settings: Settings, accountant: CentralAccountant | None) -> bool:
    """True if one more round would take central epsilon past ``dp-target-epsilon``."""
    if accountant is None or not settings.dp_target_epsilon:
        return False
    return accountant.would_exceed(
        settings.dp_target_epsilon,
        settings.dp_delta,
        noise_multiplier=settings.dp_noise_multiplier,
        sampling_rate=1.0,
    )


def _start(settings: Settings, context: Context) -> tuple[Path, ServerState]:
    """A fresh run folder and initial model, or the folder and state of the run resumed."""
    if settings.resume_from:
        checkpoint = runs.find_checkpoint(
            settings.resume_from, settings.outputs_dir, settings.run_name
        )
        payload = runs.read_checkpoint(checkpoint)
        # A key the checkpoint predates ran with that key's default.
        before = {**Settings().to_run_config(), **json.loads(payload["run_config"])}
        now = settings.to_run_config()
        # One exchange or two: the same run here (a checkpoint from before "auto" says false)
        free = RESUME_MAY_CHANGE | (
            {"evaluate-on-receipt"} if settings.one_exchange_equivalent() else set()
        )
        changed = sorted(k for k in now if k not in free and before[k] != now[k])
        if changed:
            raise ValueError(
                f"resume-from {checkpoint}: run-config keys {changed} differ from the run "
                f"being resumed ({ {k: before.get(k) for k in changed} }); a resumed run "
                "must train the same way"
            )
        history, digest = runs.rewind(checkpoint, payload)
        run_dir = checkpoint.parent.parent
        state = replace(
            ServerState.from_checkpoint(payload), history=tuple(history), history_digest=digest
        )
        log.info("sigmax-fl: resuming %s after round %d", run_dir, state.round)
        return run_dir, state
    run_dir = runs.create_run_dir(settings.outputs_dir, settings.run_name, context.run_id)
    model = build_model(settings.model, seed=settings.seed)
    if settings.initial_model:
        try:
            model.load_state_dict(torch.load(settings.initial_model, weights_only=True))
        except (OSError, RuntimeError, pickle.UnpicklingError) as err:
            raise ValueError(
                f"run-config 'initial-model' = {settings.initial_model!r}: not a state dict "
                f"of model '{settings.model}': {err}"
            ) from None
    # Under local-head the heads stay on the instances: the global model is the body alone.
    shared = personal.shared_keys(settings)
    if settings.initial_model and len(shared) < len(model.state_dict()):
        log.warning(
            "sigmax-fl: initial-model %s: its head is not used under personalisation = "
            "'local-head'; each instance starts its own head (seeded by seed and instance id)",
            settings.initial_model,
        )
    arrays = {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if k in shared}
    return run_dir, ServerState(round=0, arrays=arrays)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the rounds, checkpointing each, and write model, history and summary."""
    settings = Settings.from_run_config(context.run_config)
    run_dir, state = _start(settings, context)
    runs.write_json(run_dir / "run_config.json", settings.to_run_config())
    log.info("sigmax-fl: outputs of this run go to %s", run_dir)
    if settings.secure_aggregation:
        secagg.main(grid, context, settings, run_dir, state.arrays)
        return

    strategy = settings.strategy(noise_std=_central_noise_std(settings))
    strategy.run_key = runs.run_key(run_dir)
    if state.rng:
        strategy.rng.bit_generator.state = state.rng
    accountant = CentralAccountant() if settings.dp == "central" else None
    if accountant is not None and state.privacy:
        accountant.load_state_dict(state.privacy)
    # Deployment: count only SuperNodes that answer (a restarted SuperLink lists ghosts)
    strategy.roll_call(grid)
    if settings.scaler == "federated" and not state.scaler:
        # Round 0: pooled feature statistics, once per run (a resumed run keeps its own)
        scaler = scaling.collect(
            grid,
            min_available_nodes=settings.min_available_nodes,
            min_replies=settings.min_train_replies,
            wait_for_nodes_timeout=settings.wait_for_nodes_timeout,
            timeout=settings.round_timeout,
            names=strategy.node_names,
        )
        state = replace(state, scaler=scaler)
        runs.write_json(run_dir / "scaler.json", scaler)

    started, first_round = time.monotonic(), state.round
    stopped_early = stopped_for_budget = False
    while state.round < settings.num_server_rounds:
        if _budget_spent(settings, accountant):
            log.info(
                "sigmax-fl: stopping before round %d: it would take epsilon past "
                "dp-target-epsilon %.4g (delta %.2g)",
                state.round + 1,
                settings.dp_target_epsilon,
                settings.dp_delta,
            )
            stopped_for_budget = True
            break
        scored = len(state.history)
        state = run_round(state, strategy, grid, settings, accountant)
        # History and audit first: a checkpoint follows every line of its rounds (a resume
        # drops the lines of later ones)
        state = _report(run_dir, state, scored, settings, time.monotonic() - started, first_round)
        runs.append_jsonl(
            run_dir / runs.AUDIT_JSONL, [s.audit(state.round) for s in strategy.last_train]
        )
        runs.write_checkpoint(
            run_dir,
            state.round,
            state.to_checkpoint(settings.to_run_config()),
            settings.keep_checkpoints,
        )
        if (
            settings.early_stopping_patience
            and state.stale_rounds >= settings.early_stopping_patience
        ):
            log.info(
                "sigmax-fl: early stop after round %d: %s has not improved for %d rounds",
                state.round,
                settings.early_stopping_metric,
                state.stale_rounds,
            )
            stopped_early = True
            break
    if state.unscored is not None:
        # evaluate-on-receipt: no next round brings the last model's scores
        scored = len(state.history)
        state = evaluate_round(state, strategy, grid, settings)
        state = _report(run_dir, state, scored, settings, time.monotonic() - started, first_round)

    final = (
        state.best_arrays
        if settings.early_stopping_patience and state.best_arrays
        else state.arrays
    )
    final_round = state.best_round if final is state.best_arrays else state.round
    runs.write_json(run_dir / runs.HISTORY_JSON, list(state.history))
    skipped = runs.check_trained(run_dir, state.history, final_round)
    path = runs.save_model(
        run_dir,
        {k: torch.from_numpy(np.array(v)) for k, v in final.items()},
        personal.final_artefact(settings),
    )
    summary = {
        "rounds_run": state.round,
        "rounds_skipped": skipped,
        "stopped_early": stopped_early,
        "stopped_for_privacy_budget": stopped_for_budget,
        "privacy": state.history[-1].get("privacy") if state.history else None,
        "best_round": state.best_round,
        "best_metric": settings.early_stopping_metric,
        "best_value": state.best_score,
        "final_model_round": final_round,
        "final_model": str(path),
    }
    runs.write_json(run_dir / runs.SUMMARY_JSON, summary)
    log.info(
        "sigmax-fl: best round %d (%s=%s); final model %s",
        state.best_round,
        settings.early_stopping_metric,
        state.best_score,
        path,
    )
    log.info("sigmax-fl: history %s", run_dir / runs.HISTORY_JSON)

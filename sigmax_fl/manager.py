"""The SIGMAX Python API, kept for existing code, on Flower's SuperLink and SuperNodes.

::

    from sigmax_fl import FederatedConfig, create_fl_manager

    manager = create_fl_manager(FederatedConfig(server_address="0.0.0.0:8080", num_rounds=10))
    history = await manager.start_server(initial_model=model)   # runs the federation to its end
    client = manager.start_client(model=model, train_loader=train, val_loader=val)
    client.fit(parameters, config={})       # -> (updated_params, num_examples, {"train_loss": ..})
    client.evaluate(parameters, config={})  # -> (loss, num_examples, {"val_loss": ..})
    client.stop()

The old API sat on Flower's legacy ``start_server`` / ``NumPyClient``, where the server
process ran the rounds and each client object trained in its own process. Flower 1.42 runs a
federation as a SuperLink plus one SuperNode per instance, which start a fresh ServerApp or
ClientApp process per run or message. The manager therefore starts those processes (TLS,
keys and timeouts from the ``FL_*`` variables of :mod:`sigmax_fl.deploy.env`, read when the
manager is created) and hands the instance's data to its SuperNode as a file on the
instance's own disk. The few behaviours that cannot map one to one are listed in
README.md, "Deployment", "Python API".
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sigmax_fl import task
from sigmax_fl.deploy.env import (
    INSTANCE_ID,
    address,
    client_options,
    number,
    server_options,
)
from sigmax_fl.deploy.federation import RunOutcome, Server, SuperNodeRunner
from sigmax_fl.deploy.flwr_cli import ConfigValue, FlwrError
from sigmax_fl.model import MODELS
from sigmax_fl.paths import PRIVATE, PRIVATE_FOLDER, make_folders, write_durably
from sigmax_fl.settings import ConfigError, Settings

log = logging.getLogger("sigmax_fl.manager")

_RUN_CONFIG_KEYS = {
    "num_rounds": "num-server-rounds",
    "min_fit_clients": "min-train-nodes",
    "min_available_clients": "min-available-nodes",
    "local_epochs": "local-epochs",
    "batch_size": "batch-size",
    "learning_rate": "learning-rate",
    "fraction_fit": "fraction-train",
    "fraction_evaluate": "fraction-evaluate",
}
"""FederatedConfig field -> the app's run-config key."""

_CLIENTS: weakref.WeakSet[FederatedClient] = weakref.WeakSet()


@dataclass
class FederatedConfig:
    """The original SIGMAX federation settings, names and defaults unchanged.

    ``server_address`` is where the server listens and where clients connect; a bind-all
    host (``0.0.0.0``) means loopback to a client. ``min_fit_clients`` has Flower 1.42's
    meaning of ``min-train-nodes``: at least that many instances are sampled per round.
    """

    server_address: str = "0.0.0.0:8080"
    num_rounds: int = 10
    min_fit_clients: int = 2
    min_available_clients: int = 2
    client_id: str = "sigmax_instance_1"
    local_epochs: int = 5
    batch_size: int = 32
    learning_rate: float = 0.001
    fraction_fit: float = 1.0
    fraction_evaluate: float = 1.0

    def run_config(self) -> dict[str, ConfigValue]:
        """The run-config overrides these settings stand for.

        Raises
        ------
        ValueError
            Naming the field, for a value the app rejects.
        """
        values = {key: getattr(self, name) for name, key in _RUN_CONFIG_KEYS.items()}
        try:
            Settings.from_run_config(values)
        except ConfigError as err:
            field = next(n for n, k in _RUN_CONFIG_KEYS.items() if f"'{k}'" in str(err))
            raise ValueError(f"FederatedConfig.{field}: {err}") from None
        return values


@dataclass(frozen=True)
class FederatedHistory:
    """What ``start_server`` returns: the run's rounds as the ServerApp recorded them.

    Attributes
    ----------
    run_id : int
        Flower's run id.
    run_dir : Path
        The run folder (history, audit log, checkpoints, final model).
    final_model : Path
        State dict of the final global model (``model.load_state_dict(torch.load(...))``); the
        shared body only (``final_body.pt``) when ``personalisation = "local-head"``.
    rounds : tuple[dict[str, Any], ...]
        One record per round (``history.json``): ``train`` and ``evaluate`` metrics,
        per-instance verdicts, bytes sent, seconds.
    """

    run_id: int
    run_dir: Path
    final_model: Path
    rounds: tuple[dict[str, Any], ...]

    @classmethod
    def from_outcome(cls, outcome: RunOutcome) -> FederatedHistory:
        """Read the history the ServerApp wrote for a completed run."""
        if outcome.run_dir is None or outcome.final_model is None:
            raise FlwrError(f"run {outcome.run_id} completed but wrote no final model")
        rounds = json.loads((outcome.run_dir / "history.json").read_text())
        return cls(outcome.run_id, outcome.run_dir, outcome.final_model, tuple(rounds))

    @property
    def losses_distributed(self) -> list[tuple[int, float]]:
        """``(round, weighted validation loss)``, as in Flower's legacy ``History``."""
        return [
            (r["round"], r["evaluate"]["val_loss"])
            for r in self.rounds
            if "val_loss" in r["evaluate"]
        ]

    @property
    def metrics_distributed_fit(self) -> dict[str, list[tuple[int, float]]]:
        """Aggregated training metrics per round, as in Flower's legacy ``History``."""
        return _series(self.rounds, "train")

    @property
    def metrics_distributed(self) -> dict[str, list[tuple[int, float]]]:
        """Aggregated validation metrics per round, as in Flower's legacy ``History``."""
        return _series(self.rounds, "evaluate")


def _series(rounds: Iterable[dict[str, Any]], phase: str) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for record in rounds:
        for name, value in record[phase].items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                out.setdefault(name, []).append((record["round"], value))
    return out


def registered_architecture(model: nn.Module) -> str:
    """The registered name of ``model``'s architecture, by state-dict shapes (class breaks ties).

    The ServerApp and every ClientApp build the model from its registered name in their own
    processes, so an unregistered architecture could never be trained there.

    Raises
    ------
    ValueError
        If no registered architecture has these shapes; says how to register one.
    """
    shapes = _shapes(model)
    matches = [name for name, factory in MODELS.items() if _shapes(factory()) == shapes]
    if len(matches) > 1:
        matches = [n for n in matches if MODELS[n] is type(model)] or matches[:1]
    if not matches:
        described = ", ".join(f"{k} {list(v)}" for k, v in list(shapes.items())[:4])
        raise ValueError(
            f"model {type(model).__name__} ({described}, ...) is no registered architecture "
            f"({sorted(MODELS)}): register it in sigmax_fl/model.py with "
            "register(name, factory), code the ServerApp and every ClientApp import, and "
            "set run config model=name"
        )
    return matches[0]


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def get_parameters(model: nn.Module) -> list[np.ndarray]:
    """The model's weights as numpy arrays in state-dict order (the ``parameters`` format)."""
    return [v.detach().cpu().numpy().copy() for v in model.state_dict().values()]


def set_parameters(model: nn.Module, parameters: list[np.ndarray]) -> None:
    """Load arrays in state-dict order into ``model``; a count or shape mismatch is an error."""
    state = model.state_dict()
    if len(parameters) != len(state):
        raise ValueError(
            f"parameters: {len(parameters)} arrays, but the model's state dict has "
            f"{len(state)} (one per entry, in state-dict order)"
        )
    loaded = {}
    for i, ((key, current), array) in enumerate(zip(state.items(), parameters, strict=True)):
        tensor = torch.as_tensor(np.asarray(array))
        if tuple(tensor.shape) != tuple(current.shape):
            raise ValueError(
                f"parameters[{i}] ({key}): shape {tuple(tensor.shape)}, "
                f"expected {tuple(current.shape)}"
            )
        loaded[key] = tensor.to(current.dtype)
    model.load_state_dict(loaded)


def loader_arrays(loader: Iterable[Any], name: str) -> tuple[np.ndarray, np.ndarray]:
    """All ``(features, targets)`` batches of a loader as two float32 arrays.

    Raises
    ------
    ValueError
        If a batch is not a pair, targets are not one per row, or a value is not finite.
    """
    xs, ys = [], []
    for batch in loader:
        if not isinstance(batch, tuple | list) or len(batch) != 2:
            raise ValueError(f"{name}: each batch must be (features, targets)")
        x = torch.as_tensor(batch[0]).detach().cpu().float().numpy()
        y = torch.as_tensor(batch[1]).detach().cpu().float().numpy()
        if y.size != len(x):
            raise ValueError(f"{name}: one target per row expected, got shape {y.shape}")
        xs.append(x)
        ys.append(y.reshape(len(x)))
    if not xs:
        raise ValueError(f"{name}: no batches")
    X, y = np.concatenate(xs), np.concatenate(ys)
    if len(X) == 0 or not (np.isfinite(X).all() and np.isfinite(y).all()):
        raise ValueError(f"{name}: empty, or holds NaN or infinite values")
    return X, y


def _write_private(path: Path, **arrays: np.ndarray) -> None:
    """An ``.npz`` readable by this user only (it is trading data), written durably."""
    make_folders(path.parent, PRIVATE_FOLDER)
    write_durably(path, lambda handle: np.savez(handle, **arrays), PRIVATE)


class FederatedClient:
    """One instance: local ``fit`` / ``evaluate``, and a SuperNode in the federation.

    Created by :meth:`FederatedManager.start_client`; its SuperNode runs in a background
    thread until :meth:`stop` (or interpreter exit).
    """

    def __init__(
        self,
        config: FederatedConfig,
        model: nn.Module,
        train: tuple[np.ndarray, np.ndarray],
        val: tuple[np.ndarray, np.ndarray],
        runner: SuperNodeRunner,
        data_path: Path,
    ) -> None:
        self.config = config
        self.model = model
        self.data_path = data_path
        """The ``.npz`` of the loaders' rows the SuperNode's ClientApps train on."""
        self.error: BaseException | None = None
        """Why the SuperNode stopped by itself (e.g. refused), if it did."""
        self._train, self._val = train, val
        self._fits = 0
        self._runner = runner
        self._thread = threading.Thread(
            target=self._run, name=f"supernode-{config.client_id}", daemon=True
        )
        self._thread.start()
        _CLIENTS.add(self)

    def _run(self) -> None:
        try:
            status = self._runner.run()
            if status != 0:
                self.error = RuntimeError(f"the SuperNode exited with status {status}")
        except Exception as err:  # kept for the caller: a thread cannot raise to it
            self.error = err
        if self.error is not None:
            log.error("%s: %s", self.config.client_id, self.error)

    @property
    def connected(self) -> bool:
        """True once the SuperLink has accepted this instance's SuperNode."""
        return self._runner.connected

    @property
    def running(self) -> bool:
        """True while the SuperNode is kept running."""
        return self._thread.is_alive()

    def get_parameters(self) -> list[np.ndarray]:
        """The local model's weights, in state-dict order."""
        return get_parameters(self.model)

    def fit(
        self, parameters: list[np.ndarray], config: Mapping[str, Any] | None = None
    ) -> tuple[list[np.ndarray], int, dict[str, float]]:
        """Train the local model from ``parameters`` on the training loader's rows.

        The same loop as the ClientApp (:func:`sigmax_fl.task.train`: MSE, Adam, shuffled
        mini-batches). ``config`` may set ``local_epochs``, ``batch_size``,
        ``learning_rate``; other keys are ignored, as by a legacy ``NumPyClient``.

        Returns
        -------
        tuple[list[np.ndarray], int, dict[str, float]]
            Updated weights, training rows, ``{"train_loss": last epoch's mean MSE}``.
        """
        settings = dict(config or {})
        set_parameters(self.model, parameters)
        self._fits += 1
        loss = task.train(
            self.model,
            *self._train,
            epochs=int(settings.get("local_epochs", self.config.local_epochs)),
            batch_size=int(settings.get("batch_size", self.config.batch_size)),
            learning_rate=float(settings.get("learning_rate", self.config.learning_rate)),
            seed=self._fits,
        )
        return get_parameters(self.model), len(self._train[1]), {"train_loss": loss}

    def evaluate(
        self, parameters: list[np.ndarray], config: Mapping[str, Any] | None = None
    ) -> tuple[float, int, dict[str, float]]:
        """Score ``parameters`` on the validation loader's rows (``config`` is ignored).

        Returns
        -------
        tuple[float, int, dict[str, float]]
            MSE, validation rows, ``{"val_loss", "hit_rate", "ic", "rank_ic"}``.
        """
        del config
        set_parameters(self.model, parameters)
        scores = task.evaluate(self.model, *self._val)
        metrics = {"val_loss": scores["loss"]}
        metrics.update({k: scores[k] for k in ("hit_rate", "ic", "rank_ic")})
        return scores["loss"], len(self._val[1]), metrics

    def stop(self, timeout: float = 60.0) -> None:
        """Stop this instance's SuperNode and wait until it is gone; idempotent."""
        self._runner.stop()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError(f"{self.config.client_id}: SuperNode still running after stop")

    def __enter__(self) -> FederatedClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@atexit.register
def _stop_clients() -> None:
    # Daemon threads die with the interpreter; their SuperNodes would not.
    for client in list(_CLIENTS):
        with contextlib.suppress(Exception):
            client.stop()


class FederatedManager:
    """Starts the server or a client of a federation, as the original SIGMAX manager did.

    Parameters
    ----------
    config : FederatedConfig
        Federation settings.
    env : Mapping[str, str]
        The ``FL_*`` variables (TLS files, node key, authorized keys, wait, state folder),
        copied now: a later change of ``os.environ`` does not affect this manager.
    """

    def __init__(self, config: FederatedConfig, env: Mapping[str, str]) -> None:
        self.config = config
        self._env = dict(env)
        self._address = address(config.server_address, "server_address")
        config.run_config()

    def _role_env(self, folder: str) -> dict[str, str]:
        """The variables with ``FL_STATE_DIR`` narrowed to one role's subfolder.

        One SIGMAX process may run the server and clients side by side; each needs its own
        Flower home, database and logs.
        """
        base = Path(self._env.get("FL_STATE_DIR") or "~/.sigmax-fl").expanduser()
        return {**self._env, "FL_STATE_DIR": str(base / folder)}

    async def start_server(self, initial_model: nn.Module | None = None) -> FederatedHistory:
        """Start a SuperLink at ``server_address`` and run the federation to its end.

        The run starts from ``initial_model``'s weights (its architecture must be a
        registered one), else from the app's seeded initial model. Rounds begin once
        ``min_available_clients`` instances are connected; if they never are, the run
        fails after ``FL_WAIT_TIMEOUT`` seconds (default 300). Cancelling the coroutine
        stops every process it started.

        Returns
        -------
        FederatedHistory
            The completed run's rounds and final model.

        Raises
        ------
        FlwrError
            If the run does not end ``finished:completed`` (the ServerApp's error included).
        ProcessError
            If the SuperLink cannot start (e.g. the port is taken).
        EnvError
            For a missing or malformed ``FL_*`` variable.
        """
        options = server_options(self._role_env("server"), bind=self._address)
        run_config: dict[str, ConfigValue] = {
            **self.config.run_config(),
            "wait-for-nodes-timeout": number(self._env, "FL_WAIT_TIMEOUT", 300.0, float),
        }
        if initial_model is not None:
            run_config["model"] = registered_architecture(initial_model)
            stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
            path = options.state_dir / "initial-models" / f"{stamp}.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(initial_model.state_dict(), path)
            run_config["initial-model"] = str(path)
        server = Server(options)
        future = asyncio.get_running_loop().run_in_executor(None, server.run, run_config)
        try:
            outcome = await asyncio.shield(future)
        except asyncio.CancelledError:
            server.stop()
            with contextlib.suppress(Exception):
                await future
            raise
        return FederatedHistory.from_outcome(outcome)

    def start_client(
        self,
        model: nn.Module,
        train_loader: Iterable[Any],
        val_loader: Iterable[Any],
    ) -> FederatedClient:
        """Join the federation at ``server_address`` as ``client_id``; returns at once.

        The loaders' rows are written to this instance's own disk
        (``FL_STATE_DIR/client-ID/data/ID.npz``, readable by this user only) and a SuperNode
        is started whose ClientApps train on them; they never leave the machine.

        Raises
        ------
        ValueError
            If the model's architecture is not registered, or a loader is unusable.
        EnvError
            For a missing or malformed ``FL_*`` variable.
        """
        client_id = self.config.client_id
        if not INSTANCE_ID.match(client_id):
            raise ValueError(
                f"FederatedConfig.client_id={client_id!r}: expected {INSTANCE_ID.pattern}"
            )
        registered_architecture(model)
        train = loader_arrays(train_loader, "train_loader")
        val = loader_arrays(val_loader, "val_loader")
        try:
            with torch.no_grad():
                model.eval()
                model(torch.from_numpy(train[0][:2]))
        except RuntimeError as err:
            raise ValueError(
                f"train_loader: features of shape {train[0].shape[1:]} do not fit the model: {err}"
            ) from None
        options = client_options(self._role_env(f"client-{client_id}"), client_id, self._address)
        data_path = options.state_dir / "data" / f"{client_id}.npz"
        _write_private(data_path, X_train=train[0], y_train=train[1], X_val=val[0], y_val=val[1])
        runner = SuperNodeRunner(
            options, {"instance-id": client_id, "data-path": str(data_path)}, client_id
        )
        return FederatedClient(self.config, model, train, val, runner, data_path)


def create_fl_manager(config: FederatedConfig | None = None) -> FederatedManager:
    """A manager for ``config`` (defaults if None), reading ``FL_*`` variables now.

    Raises
    ------
    ValueError
        For a field the app would reject, naming it (``EnvError`` for ``server_address``).
    """
    return FederatedManager(config or FederatedConfig(), os.environ)

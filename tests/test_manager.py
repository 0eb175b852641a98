"""The SIGMAX Python API example, end to end: a server and two clients on bundled data.

The server and both clients live in this process, as SIGMAX code would write them; each
client gets its own key through ``FL_NODE_KEY`` as it is created, and TLS with SuperNode
authentication is on. Fast tests cover the local ``fit`` / ``evaluate`` contract and the
errors for an unregistered architecture and a bad loader.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sigmax_fl
from sigmax_fl import TradingModel
from sigmax_fl.data import resolve_source
from sigmax_fl.dataset import Recipe, load_instance
from sigmax_fl.deploy.credentials import ensure_credentials
from sigmax_fl.deploy.processes import TAG_ENV, free_port, tagged_processes
from sigmax_fl.manager import (
    FederatedConfig,
    create_fl_manager,
    get_parameters,
    registered_architecture,
)
from sigmax_fl.settings import Settings

from .conftest import RUN_TIMEOUT

INSTANCES = ("coinbase-btc-usd-1d", "bitstamp-eth-usd-1d")


def loaders(series: str) -> tuple[DataLoader, DataLoader]:
    """Train and validation loaders from the app's own features of a bundled series."""
    s = Settings()
    recipe = Recipe.of(s)
    data = load_instance(resolve_source(series), recipe)

    def loader(split: str, shuffle: bool) -> DataLoader:
        dataset = TensorDataset(torch.from_numpy(data.X(split)), torch.from_numpy(data.y(split)))
        return DataLoader(dataset, batch_size=64, shuffle=shuffle)

    return loader("train", True), loader("val", False)


@pytest.fixture
def tag(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Every process the managers start inherits this tag; none may outlive the test."""
    value = uuid.uuid4().hex
    monkeypatch.setenv(TAG_ENV, value)
    yield value
    assert tagged_processes(value) == [], "processes survived the test"


# --- fast: the local contract -------------------------------------------------------


def test_the_api_is_importable_from_the_package() -> None:
    # `from sigmax_fl import FederatedConfig, create_fl_manager`, as SIGMAX code writes it
    assert sigmax_fl.FederatedConfig is FederatedConfig
    assert sigmax_fl.create_fl_manager is create_fl_manager


def test_config_fields_and_defaults_are_the_original_ones() -> None:
    assert dataclasses.asdict(FederatedConfig()) == {
        "server_address": "0.0.0.0:8080",
        "num_rounds": 10,
        "min_fit_clients": 2,
        "min_available_clients": 2,
        "client_id": "sigmax_instance_1",
        "local_epochs": 5,
        "batch_size": 32,
        "learning_rate": 0.001,
        "fraction_fit": 1.0,
        "fraction_evaluate": 1.0,
    }


def test_bad_config_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"FederatedConfig\.fraction_fit"):
        create_fl_manager(FederatedConfig(fraction_fit=2.0))
    with pytest.raises(ValueError, match="server_address='8080'"):
        create_fl_manager(FederatedConfig(server_address="8080"))


def test_architecture_is_matched_by_state_dict_shapes() -> None:
    class Renamed(TradingModel):
        pass

    assert registered_architecture(TradingModel()) == "trading-mlp"
    assert registered_architecture(Renamed()) == "trading-mlp"
    with pytest.raises(ValueError, match=r"no registered architecture.*register\(name, factory\)"):
        registered_architecture(nn.Linear(50, 1))


def test_unusable_loader_is_refused_before_anything_starts(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FL_INSECURE", "1")
    monkeypatch.setenv("FL_STATE_DIR", str(tmp_path))
    manager = create_fl_manager(FederatedConfig())
    bad = [(torch.zeros(4, 50), torch.zeros(4, 3))]
    with pytest.raises(ValueError, match="train_loader: one target per row"):
        manager.start_client(model=TradingModel(), train_loader=bad, val_loader=bad)
    wrong_width = [(torch.zeros(4, 7), torch.zeros(4))]
    with pytest.raises(ValueError, match="do not fit the model"):
        manager.start_client(model=TradingModel(), train_loader=wrong_width, val_loader=wrong_width)
    assert not list(tmp_path.rglob("*.npz"))


# --- integration: the example, end to end ------------------------------------------


@pytest.mark.integration
def test_python_api_example_runs_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tag: str
) -> None:
    # Prepare: TLS + authentication from the FL_* variables, outputs in tmp_path
    creds = ensure_credentials(tmp_path / "creds", ["sigmax_instance_1", "sigmax_instance_2"])
    monkeypatch.setenv("FL_CA_CERT", str(creds.ca_cert))
    monkeypatch.setenv("FL_SERVER_CERT", str(creds.server_cert))
    monkeypatch.setenv("FL_SERVER_KEY", str(creds.server_key))
    monkeypatch.setenv(
        "FL_AUTHORIZED_KEYS", ",".join(str(k.public_key) for k in creds.nodes.values())
    )
    monkeypatch.setenv("FL_WAIT_TIMEOUT", "120")
    monkeypatch.setenv("SIGMAX_FL_OUTPUTS_DIR", str(tmp_path / "outputs"))
    config = FederatedConfig(
        server_address=f"0.0.0.0:{free_port()}",
        num_rounds=1,
        min_fit_clients=2,
        min_available_clients=2,
        client_id="sigmax_instance_1",
        local_epochs=1,
        batch_size=32,
        learning_rate=0.001,
        fraction_fit=1.0,
        fraction_evaluate=1.0,
    )
    model = TradingModel()

    def manager_for(client_id: str):
        monkeypatch.setenv("FL_STATE_DIR", str(tmp_path / client_id))
        monkeypatch.setenv("FL_NODE_KEY", str(creds.nodes[client_id].private_key))
        return create_fl_manager(dataclasses.replace(config, client_id=client_id))

    async def example() -> tuple:
        monkeypatch.setenv("FL_STATE_DIR", str(tmp_path / "server"))
        manager = create_fl_manager(config)
        server = asyncio.ensure_future(manager.start_server(initial_model=model))
        clients = []
        try:
            for client_id, series in zip(creds.nodes, INSTANCES, strict=True):
                train_loader, val_loader = loaders(series)
                clients.append(
                    manager_for(client_id).start_client(
                        model=TradingModel(), train_loader=train_loader, val_loader=val_loader
                    )
                )
            # Local fit / evaluate, while the federation runs
            parameters = get_parameters(model)
            fitted = clients[0].fit(parameters, config={})
            scored = clients[0].evaluate(parameters, config={})
            history = await asyncio.wait_for(server, timeout=RUN_TIMEOUT)
        finally:
            for client in clients:
                client.stop()
            server.cancel()
        return parameters, fitted, scored, history, clients

    # Execute
    parameters, fitted, scored, history, clients = asyncio.run(example())

    # Assert: fit and evaluate keep the documented tuples
    updated, n_train, fit_metrics = fitted
    assert [a.shape for a in updated] == [a.shape for a in parameters]
    assert any(not np.array_equal(a, b) for a, b in zip(updated, parameters, strict=True))
    assert n_train > 1000 and np.isfinite(fit_metrics["train_loss"])
    loss, n_val, eval_metrics = scored
    assert n_val > 100 and loss == eval_metrics["val_loss"] and np.isfinite(loss)
    # Assert: the federation ran on both clients, from the initial model's weights
    assert len(history.rounds) == 1
    assert history.rounds[0]["train"]["replies-ok"] == 2
    assert set(history.rounds[0]["instances"]) == set(creds.nodes)
    assert [r for r, _ in history.losses_distributed] == [1]
    assert "train_loss" in history.metrics_distributed_fit
    final = TradingModel()
    final.load_state_dict(torch.load(history.final_model, weights_only=True))
    run_config = json.loads((history.run_dir / "run_config.json").read_text())
    initial = torch.load(run_config["initial-model"], weights_only=True)
    assert all(torch.equal(initial[k], v) for k, v in model.state_dict().items())
    # Assert: the loaders' rows stayed on each instance's disk, private to its user
    for client in clients:
        assert not client.running and client.error is None
        assert client.data_path.stat().st_mode & 0o077 == 0
        with np.load(client.data_path) as stored:
            assert set(stored.files) == {"X_train", "y_train", "X_val", "y_val"}

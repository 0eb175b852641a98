"""The real sigmax-fl app on a TLS + SuperNode-authentication deployment, on loopback.

One run serves every assertion, because a deployed round costs seconds: three authenticated
SuperNodes train two rounds on bundled data (one of them joins only after its key is
registered late, as an operator would), while a SuperNode without TLS, one with an
unregistered key and one with no key are each refused.
"""

from __future__ import annotations

import io
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sigmax_fl.deploy.credentials import ensure_credentials, write_node_key
from sigmax_fl.deploy.env import Address, ClientOptions
from sigmax_fl.deploy.federation import REFUSED_UNREGISTERED, SuperNodeRunner
from sigmax_fl.deploy.flwr_cli import (
    FINISHED_OK,
    SUPERNODE_CONNECTED,
    FlwrHome,
    start_superlink,
    start_supernode,
)
from sigmax_fl.deploy.processes import TAG_ENV, Supervisor, tagged_processes
from sigmax_fl.model import TradingModel

from .conftest import DATA, ROOT, RUN_TIMEOUT

pytestmark = pytest.mark.integration

BITSTAMP = DATA / "bitstamp_BTC_ETH_LTC_USD_d.csv"
INSTANCES = {
    "alpha": (str(DATA / "Coinbase_BTCUSD_d.csv"), "coinbase", "coinbase-btc"),
    "beta": (f"{BITSTAMP}#BTC", "bitstamp", "bitstamp-btc"),
    "gamma": (f"{BITSTAMP}#ETH", "bitstamp", "bitstamp-eth"),
}


def _node_config(name: str) -> dict[str, str]:
    path, venue, instance = INSTANCES[name]
    return {"data-path": path, "venue": venue, "instance-id": instance}


@pytest.fixture
def supervisor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Supervisor]:
    """Supervisor whose teardown proves nothing started in the test survived, pass or fail.

    The tag reaches the processes the client runner starts under its own supervisor too.
    """
    tag = uuid.uuid4().hex
    monkeypatch.setenv(TAG_ENV, tag)
    sup = Supervisor(tmp_path / "logs", grace=3.0)
    with sup:
        yield sup
    assert sup.remaining() == [], "processes survived the test"
    assert tagged_processes(tag) == [], "processes survived the test"


def _wait(condition: object, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_real_app_on_tls_and_authenticated_supernodes(
    tmp_path: Path, supervisor: Supervisor
) -> None:
    # Prepare: credentials, a TLS + auth SuperLink with a database, two keys registered
    creds = ensure_credentials(tmp_path / "creds", list(INSTANCES))
    home = FlwrHome(tmp_path / "flwr-home")
    link = start_superlink(
        supervisor, home, tmp_path / "superlink.db", tls=creds, enable_supernode_auth=True
    )
    home.add_connection("local", link.address, root_certificates=creds.ca_cert)
    ids = home.register_supernodes([creds.nodes[n].public_key for n in ("alpha", "beta")], "local")
    assert all(isinstance(i, int) for i in ids)
    members = [
        start_supernode(
            supervisor,
            home,
            link.address,
            _node_config(name),
            root_certificates=creds.ca_cert,
            private_key=creds.nodes[name].private_key,
            name=f"supernode-{name}",
            wait_connected=False,
        )
        for name in ("alpha", "beta")
    ]
    stranger = write_node_key(tmp_path / "stranger.key")
    refused = {
        "no key": start_supernode(
            supervisor, home, link.address, _node_config("alpha"), creds.ca_cert,
            max_retries=1, name="no-key", wait_connected=False,
        ),
        "unregistered": start_supernode(
            supervisor, home, link.address, _node_config("alpha"), creds.ca_cert,
            stranger.private_key, max_retries=1, name="unregistered", wait_connected=False,
        ),
        "no tls": start_supernode(
            supervisor, home, link.address, _node_config("alpha"), insecure=True,
            max_retries=1, name="no-tls", wait_connected=False,
        ),
    }  # fmt: skip

    # Prepare: gamma is kept running by the client runner; refused until registered
    gamma_log = io.StringIO()
    gamma = SuperNodeRunner(
        ClientOptions(
            superlink=Address("127.0.0.1", link.port),
            root_certificates=creds.ca_cert,
            node_key=creds.nodes["gamma"].private_key,
            state_dir=tmp_path / "gamma",
        ),
        _node_config("gamma"),
        "gamma",
        sink=gamma_log,
        retry_interval=1.0,
    )
    runner = threading.Thread(target=gamma.run, daemon=True)
    runner.start()
    try:
        _wait(lambda: REFUSED_UNREGISTERED in gamma_log.getvalue(), "gamma's refusal", 60)
        home.register_supernode(creds.nodes["gamma"].public_key, "local")
        _wait(lambda: gamma.connected, "gamma to join once registered", 60)
        for member in members:
            member.wait_for_log(SUPERNODE_CONNECTED, timeout=60)
        outputs = tmp_path / "outputs"

        # Execute: the real app, 2 rounds on the 3 registered instances
        with (tmp_path / "run.log").open("w") as sink:
            run_id = home.run_app(
                ROOT,
                "local",
                run_config={
                    "num-server-rounds": 2,
                    "local-epochs": 1,
                    "min-available-nodes": 3,
                    "min-train-nodes": 3,
                    "outputs-dir": str(outputs),
                    "run-name": "deployed",
                },
                sink=sink,
                timeout=RUN_TIMEOUT,
            )
    finally:
        gamma.stop()
        runner.join(timeout=30)

    # Assert: completed on exactly the three registered instances, final model written
    assert home.run_status(run_id, "local") == FINISHED_OK
    assert not runner.is_alive()
    run_dir = outputs / "deployed"
    model = TradingModel()
    model.load_state_dict(torch.load(run_dir / "final_model.pt", weights_only=True))
    history = json.loads((run_dir / "history.json").read_text())
    assert [r["round"] for r in history] == [1, 2]
    expected = {instance for _, _, instance in INSTANCES.values()}
    for record in history:
        assert record["train"]["replies-ok"] == 3
        assert set(record["instances"]) == expected
    # Assert: each stranger was refused, with Flower's reason, and never got a node id
    reasons = {
        "no key": "[code: 2001] SuperNode authentication is enabled",
        "unregistered": "[code: 2004] Failed to activate SuperNode",
        "no tls": "could not establish a connection to the SuperLink",
    }
    for case, node in refused.items():
        assert node.wait(timeout=30) == 1, case
        assert reasons[case] in node.log_text(), case
        assert SUPERNODE_CONNECTED not in node.log_text(), case

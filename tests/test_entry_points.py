"""The SIGMAX entry points, configured by environment variables alone.

Fast: every missing or malformed variable is one line naming it, before Flower starts.
Integration: a TLS + authenticated server and two clients, each a process given nothing but
its environment, complete a round; a server whose instances never come fails with the
strategy's message after the configured wait, and exits non-zero.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sigmax_fl.deploy import client, server
from sigmax_fl.deploy.credentials import ensure_credentials
from sigmax_fl.deploy.env import CLIENT_VARIABLES, SERVER_VARIABLES, server_options
from sigmax_fl.deploy.processes import Supervisor, free_port

from .conftest import DATA, ROOT, RUN_TIMEOUT

BITSTAMP_ETH = f"{DATA / 'bitstamp_BTC_ETH_LTC_USD_d.csv'}#ETH"


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory):
    return ensure_credentials(tmp_path_factory.mktemp("creds"), ["desk-a", "desk-b"])


def _base_env(tmp_path: Path) -> dict[str, str]:
    """What any process has: PATH and HOME, and this test session's private feature cache."""
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path / "home"),
        "SIGMAX_FL_CACHE_DIR": os.environ["SIGMAX_FL_CACHE_DIR"],
    }


def _client_env(tmp_path: Path, creds, name: str = "desk-a") -> dict[str, str]:
    return {
        "FL_SERVER": "localhost:8080",
        "FL_CLIENT_ID": name,
        "DATA_SOURCE": "coinbase-btc-usd-1d",
        "FL_CA_CERT": str(creds.ca_cert),
        "FL_NODE_KEY": str(creds.nodes[name].private_key),
        "FL_STATE_DIR": str(tmp_path / f"state-{name}"),
    }


def _server_env(tmp_path: Path, creds) -> dict[str, str]:
    return {
        "FL_SERVER": "0.0.0.0:8080",
        "FL_NUM_ROUNDS": "1",
        "FL_MIN_CLIENTS": "2",
        "FL_CA_CERT": str(creds.ca_cert),
        "FL_SERVER_CERT": str(creds.server_cert),
        "FL_SERVER_KEY": str(creds.server_key),
        "FL_AUTHORIZED_KEYS": ",".join(str(k.public_key) for k in creds.nodes.values()),
        "FL_STATE_DIR": str(tmp_path / "state-server"),
    }


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if ": error: " in line]


# --- fast: one line naming the variable -----------------------------------------------


def _exits_with_one_error_line(
    main: Callable[[list[str]], int], prog: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``main`` exits 2 with exactly one ``PROG: error:`` line matching ``message``."""
    status = main([])
    errors = _error_lines(capsys.readouterr().err)
    assert status == 2
    assert len(errors) == 1
    assert errors[0].startswith(f"{prog}: error: ")
    assert re.search(message, errors[0]), errors[0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"FL_CLIENT_ID": None}, "FL_CLIENT_ID is not set"),
        ({"FL_CLIENT_ID": "desk a"}, "FL_CLIENT_ID='desk a': expected"),
        ({"FL_SERVER": None}, "FL_SERVER is not set"),
        ({"FL_SERVER": "fl-server"}, "FL_SERVER='fl-server': expected HOST:PORT"),
        ({"FL_SERVER": "fl-server:70000"}, "FL_SERVER='fl-server:70000': port"),
        ({"FL_INSECURE": "maybe"}, "FL_INSECURE='maybe': expected 1 or 0"),
        ({"FL_CA_CERT": None}, "FL_CA_CERT is not set: TLS needs"),
        ({"FL_CA_CERT": "/nonexistent/ca.crt"}, "FL_CA_CERT='/nonexistent/ca.crt': no such"),
        ({"FL_NODE_KEY": "CA"}, "FL_NODE_KEY=.*not an unencrypted OpenSSH ECDSA private key"),
        ({"DATA_SOURCE": None}, "DATA_SOURCE is not set"),
        ({"DATA_SOURCE": "binance"}, "DATA_SOURCE='binance': a venue name is not data.*"
         "data.binance.vision"),
        ({"DATA_SOURCE": "/nonexistent/btc.csv"}, "DATA_SOURCE='/nonexistent/btc.csv': no "),
        ({"DATA_SOURCE": "CA"}, "DATA_SOURCE=.*ca.crt"),
    ],
)  # fmt: skip
def test_client_variable_errors_are_one_line_naming_it(
    tmp_path: Path,
    creds,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    change: dict[str, str | None],
    message: str,
) -> None:
    # Prepare: a good environment, then one variable missing or malformed
    env = _client_env(tmp_path, creds)
    for name, value in change.items():
        env[name] = str(creds.ca_cert) if value == "CA" else value  # type: ignore[assignment]
    monkeypatch.setattr(os, "environ", {k: v for k, v in env.items() if v is not None})

    # Execute / Assert
    _exits_with_one_error_line(client.main, "sigmax-fl-client", message, capsys)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"FL_NUM_ROUNDS": "ten"}, "FL_NUM_ROUNDS='ten': expected a whole number >= 1"),
        ({"FL_MIN_CLIENTS": "0"}, "FL_MIN_CLIENTS='0': expected a whole number >= 1"),
        ({"FL_WAIT_TIMEOUT": "-5"}, "FL_WAIT_TIMEOUT='-5': expected a positive number"),
        ({"FL_SERVER": "0.0.0.0:http"}, "FL_SERVER='0.0.0.0:http': expected HOST:PORT"),
        ({"FL_SERVER_KEY": None}, "FL_SERVER_KEY is not set: TLS needs it"),
        ({"FL_SERVER_CERT": "KEY"}, "FL_SERVER_CERT=.*not a PEM certificate"),
        ({"FL_AUTHORIZED_KEYS": "/nonexistent/a.pub"}, "FL_AUTHORIZED_KEYS='/nonexistent"),
        ({"FL_AUTHORIZED_KEYS": "CA"}, "FL_AUTHORIZED_KEYS=.*not an OpenSSH ECDSA public"),
        ({"FL_SUPERNODE_AUTH": "1", "FL_INSECURE": "1"}, "FL_SUPERNODE_AUTH='1': needs TLS"),
        ({"FL_RUN_CONFIG": "num-server-rounds=3"}, "FL_RUN_CONFIG=.*FL_NUM_ROUNDS"),
        ({"FL_RUN_CONFIG": "local-epochs=zero"}, "FL_RUN_CONFIG='local-epochs=zero'"),
        ({"FL_RUN_CONFIG": "local-epoch=1"}, "FL_RUN_CONFIG=.*unknown run-config key"),
        ({"FL_KEEP_RUNNING": "forever"}, "FL_KEEP_RUNNING='forever': expected 1 or 0"),
        ({"FL_APP_DIR": "/nonexistent"}, "FL_APP_DIR='/nonexistent': no pyproject.toml"),
    ],
)  # fmt: skip
def test_server_variable_errors_are_one_line_naming_it(
    tmp_path: Path,
    creds,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    change: dict[str, str | None],
    message: str,
) -> None:
    # Prepare
    env = _server_env(tmp_path, creds)
    special = {"CA": str(creds.ca_cert), "KEY": str(creds.server_key)}
    for name, value in change.items():
        env[name] = special.get(value, value)  # type: ignore[arg-type]
    monkeypatch.setattr(os, "environ", {k: v for k, v in env.items() if v is not None})

    # Execute / Assert
    _exits_with_one_error_line(server.main, "sigmax-fl-server", message, capsys)


def test_server_certificate_must_name_the_loopback_it_dials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a certificate for the service name only
    only_service = ensure_credentials(tmp_path / "svc", [], hosts=["fl-server"])
    env = {**_server_env(tmp_path, only_service), "FL_AUTHORIZED_KEYS": ""}
    monkeypatch.setattr(os, "environ", env)

    # Execute
    status = server.main([])

    # Assert
    (error,) = _error_lines(capsys.readouterr().err)
    assert status == 2
    assert re.search(r"FL_SERVER_CERT=.*subjectAltName lacks 127\.0\.0\.1", error), error


def test_blank_flag_keeps_its_secure_default(tmp_path: Path, creds) -> None:
    env = {**_server_env(tmp_path, creds), "FL_SUPERNODE_AUTH": " ", "FL_INSECURE": ""}
    options = server_options(env, app_dir=ROOT)
    assert options.tls is not None and options.supernode_auth


def test_bad_variable_from_a_real_process_is_its_last_line(tmp_path: Path, creds) -> None:
    # Execute: a real process, the environment alone
    env = {**_base_env(tmp_path), **_client_env(tmp_path, creds), "DATA_SOURCE": "binance"}
    done = subprocess.run(
        [sys.executable, "-m", "sigmax_fl.deploy.client"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    # Assert
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("sigmax-fl-client: error: DATA_SOURCE='binance': a venue name")


def test_help_lists_every_variable(capsys: pytest.CaptureFixture[str]) -> None:
    for main, variables in ((server.main, SERVER_VARIABLES), (client.main, CLIENT_VARIABLES)):
        with pytest.raises(SystemExit) as done:
            main(["--help"])
        assert done.value.code == 0
        text = capsys.readouterr().out
        assert all(name in text for name in variables)


# --- integration: processes given nothing but their environment ----------------------


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[Supervisor]:
    """Supervisor whose teardown proves nothing it started survived, pass or fail."""
    sup = Supervisor(tmp_path / "logs", grace=5.0)
    with sup:
        yield sup
    assert sup.remaining() == [], "processes survived the test"


@pytest.mark.integration
def test_server_and_two_clients_from_the_environment_alone(
    tmp_path: Path, supervisor: Supervisor, creds
) -> None:
    # Prepare: a TLS + auth server on a free port, and one that will wait in vain
    port, lonely_port = free_port(), free_port()
    outputs = tmp_path / "outputs"
    server_env = {
        **_base_env(tmp_path),
        **_server_env(tmp_path, creds),
        "FL_SERVER": f"0.0.0.0:{port}",
        "FL_WAIT_TIMEOUT": "120",
        "FL_RUN_CONFIG": f"local-epochs=1 outputs-dir='{outputs}' run-name='from-env'",
    }
    lonely_env = {
        **_base_env(tmp_path),
        "FL_SERVER": f"127.0.0.1:{lonely_port}",
        "FL_INSECURE": "1",
        "FL_NUM_ROUNDS": "1",
        "FL_MIN_CLIENTS": "2",
        "FL_WAIT_TIMEOUT": "2",
        "FL_RUN_CONFIG": f"outputs-dir='{outputs}'",
        "FL_STATE_DIR": str(tmp_path / "state-lonely"),
    }
    argv = [sys.executable, "-m", "sigmax_fl.deploy.server"]
    fl_server = supervisor.start("fl-server", argv, env=server_env, cwd=ROOT)
    lonely = supervisor.start("lonely-server", argv, env=lonely_env, cwd=ROOT)
    # Clients could start first (they wait and retry), but Flower's connection backoff
    # grows to over 10 s: starting them once the keys are registered keeps the test short.
    fl_server.wait_for_log("registered as node", timeout=90)

    # Execute: two clients, one on a bundled name, one on a file with #ASSET
    clients = []
    for name, data in (("desk-a", "coinbase-btc-usd-1d"), ("desk-b", BITSTAMP_ETH)):
        env = {
            **_base_env(tmp_path),
            **_client_env(tmp_path, creds, name),
            "FL_SERVER": f"localhost:{port}",
            "DATA_SOURCE": data,
        }
        argv = [sys.executable, "-m", "sigmax_fl.deploy.client"]
        clients.append(supervisor.start(f"fl-client-{name}", argv, env=env, cwd=ROOT))
    status = fl_server.wait(timeout=RUN_TIMEOUT)

    # Assert: the run completed on both instances and wrote its final model
    assert status == 0, fl_server.log_tail(60)
    text = fl_server.log_text()
    assert "finished:completed" in text
    assert "replies ok=2" in text
    assert (outputs / "from-env" / "final_model.pt").is_file()
    for node in clients:  # SuperNodes keep serving after the run, as Flower's do
        assert node.returncode is None, node.log_tail()
        assert "SuperNode ID:" in node.log_text()
    # Assert: the lonely server gave up after its wait, with the strategy's reason
    assert lonely.wait(timeout=120) == 1
    last = lonely.log_text().strip().splitlines()[-1]
    assert last.startswith("sigmax-fl-server: error: run ")
    assert "finished:failed" in last
    assert "0 SuperNode(s) connected, 2 needed" in last
    assert "wait-for-nodes-timeout" in last
    assert "FL_INSECURE=1" in lonely.log_text()

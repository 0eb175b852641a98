"""Process orchestration on loopback with real Flower processes, no mocks.

A tiny numpy Flower app (written into ``tmp_path``) runs on a simulation-mode
SuperLink and on a TLS + SuperNode-authentication deployment; refused SuperNodes
are asserted on; every test ends with no process of what it started alive.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.common.config import parse_config_args

from sigmax_fl.deploy import flwr_cli
from sigmax_fl.deploy.credentials import ensure_credentials, write_node_key
from sigmax_fl.deploy.flwr_cli import (
    FINISHED_OK,
    HTTP_API_LISTENING,
    SIMULATION_RAY_ENV,
    SUPERNODE_CONNECTED,
    FlwrError,
    FlwrHome,
    format_config,
    start_superlink,
    start_supernode,
)
from sigmax_fl.deploy.processes import ProcessError, Supervisor, environ_of, free_port

ROOT = Path(__file__).resolve().parents[1]

TINY_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "tinyfl"
version = "1.0.0"
description = "Tiny numpy Flower app for orchestration tests"
license = "Apache-2.0"
dependencies = ["flwr[simulation]>=1.42,<1.43", "numpy>=1.26"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "sigmax"

[tool.flwr.app.components]
serverapp = "tinyfl.server_app:app"
clientapp = "tinyfl.client_app:app"

[tool.flwr.app.config]
num-server-rounds = 2
min-nodes = 2
result-file = ""
fail-now = false
"""

TINY_SERVER = '''\
"""FedAvg over one numpy array; writes the final array and node count as JSON."""

import json
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    if context.run_config["fail-now"]:
        raise RuntimeError("tiny app asked to fail")
    min_nodes = int(context.run_config["min-nodes"])
    strategy = FedAvg(
        fraction_evaluate=0.0, min_available_nodes=min_nodes, min_train_nodes=min_nodes
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord([np.zeros(3)]),
        num_rounds=int(context.run_config["num-server-rounds"]),
    )
    out = str(context.run_config["result-file"])
    if out:
        final = result.arrays.to_numpy_ndarrays()[0].tolist()
        nodes = len(list(grid.get_node_ids()))
        Path(out).write_text(json.dumps({"final": final, "nodes": nodes}))
'''

TINY_CLIENT = '''\
"""Adds one to every weight; records its node config if given an out-dir."""

from pathlib import Path

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    arrays = [a + 1.0 for a in msg.content["arrays"].to_numpy_ndarrays()]
    out_dir = context.node_config.get("out-dir")
    if out_dir:
        name = str(context.node_config["instance-id"])
        Path(str(out_dir), name).write_text(str(context.node_config["venue"]))
    content = RecordDict(
        {"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": 10})}
    )
    return Message(content=content, reply_to=msg)
'''


@pytest.fixture
def tiny_app(tmp_path: Path) -> Path:
    app = tmp_path / "tinyfl-app"
    (app / "tinyfl").mkdir(parents=True)
    (app / "pyproject.toml").write_text(TINY_PYPROJECT)
    (app / "tinyfl" / "__init__.py").write_text('"""Tiny app."""\n')
    (app / "tinyfl" / "server_app.py").write_text(TINY_SERVER)
    (app / "tinyfl" / "client_app.py").write_text(TINY_CLIENT)
    return app


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[Supervisor]:
    """Supervisor whose teardown proves nothing it started survived, pass or fail."""
    sup = Supervisor(tmp_path / "logs", grace=3.0)
    with sup:
        yield sup
    assert sup.remaining() == [], "processes survived the test"


@pytest.fixture
def home(tmp_path: Path) -> Iterator[FlwrHome]:
    with FlwrHome(tmp_path / "flwr-home") as flwr_home:
        yield flwr_home


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


# --- fast: helpers and credentials -------------------------------------------------


def test_free_port_can_be_bound() -> None:
    # Prepare
    port = free_port()

    # Execute / Assert
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_format_config_round_trips_through_flowers_parser() -> None:
    # Prepare
    values = {
        "data-path": "/data/My Files/btc 1d.csv",
        "venue": "coinbase's",
        "windows": r"C:\data\x.csv",
        "rounds": 3,
        "lr": 1e-05,
        "verbose": False,
    }

    # Execute
    parsed = parse_config_args([format_config(values)])

    # Assert
    assert parsed == values


@pytest.mark.parametrize("bad", ["a'b\"c", "two\nlines"])
def test_format_config_rejects_unrepresentable_strings(bad: str) -> None:
    with pytest.raises(ValueError, match="venue"):
        format_config({"venue": bad})


def test_credentials_verify_against_ca_and_are_reused(tmp_path: Path) -> None:
    # Execute
    creds = ensure_credentials(tmp_path / "creds", ["alpha", "beta"])
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "creds").iterdir()}
    again = ensure_credentials(tmp_path / "creds", ["alpha", "beta"])

    # Assert: the server certificate is signed by the CA and names both SANs
    ca = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(creds.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    # Assert: node keys are ECDSA P-384 in OpenSSH format, public matching private
    for key in creds.nodes.values():
        private = serialization.load_ssh_private_key(key.private_key.read_bytes(), None)
        public = serialization.load_ssh_public_key(key.public_key.read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(private.curve, ec.SECP384R1)
        assert private.public_key() == public
        assert key.private_key.stat().st_mode & 0o077 == 0
    # Assert: a second call reuses every file
    assert again == creds
    assert all(p.stat().st_mtime_ns == m for p, m in mtimes.items())


def test_credentials_replace_an_invalid_file(tmp_path: Path) -> None:
    # Prepare
    creds = ensure_credentials(tmp_path, ["alpha"])
    old_server = creds.server_cert.read_bytes()
    creds.ca_cert.write_text("garbage")

    # Execute
    ensure_credentials(tmp_path, ["alpha"])

    # Assert: a new CA, and the server certificate re-issued by it
    ca = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    x509.load_pem_x509_certificate(creds.server_cert.read_bytes()).verify_directly_issued_by(ca)
    assert creds.server_cert.read_bytes() != old_server


# --- fast: process supervision ---------------------------------------------------

# A child that, like the SuperLink, starts a helper in a new session; the helper
# starts a grandchild with an empty environment (like Ray agents after
# setproctitle) that ignores SIGTERM.
TREE = textwrap.dedent(
    """
    import signal, subprocess, sys, time
    if sys.argv[1] == "root":
        subprocess.Popen([sys.executable, __file__, "helper"], start_new_session=True)
    elif sys.argv[1] == "helper":
        subprocess.Popen([sys.executable, __file__, "agent"], env={})
    else:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(sys.argv[1], "ready", flush=True)
    time.sleep(120)
    """
)


def test_stop_reaches_new_sessions_and_sigterm_ignoring_grandchildren(
    tmp_path: Path, supervisor: Supervisor
) -> None:
    # Prepare
    script = tmp_path / "tree.py"
    script.write_text(TREE)
    root = supervisor.start("tree", [sys.executable, str(script), "root"])
    root.wait_until(lambda: len(root.remaining()) == 3, "start its tree", timeout=20)
    roles = sorted(_cmdline(pid).split()[-1] for pid in root.remaining())

    # Execute
    root.stop(grace=1.0)

    # Assert
    assert roles == ["agent", "helper", "root"]
    assert root.remaining() == []


def test_wait_reports_exit_status_and_log_tail(supervisor: Supervisor) -> None:
    # Prepare
    crash = "print('boom: bad flag'); raise SystemExit(3)"
    child = supervisor.start("crasher", [sys.executable, "-c", crash])

    # Execute / Assert
    with pytest.raises(ProcessError, match=r"(?s)status 3.*boom: bad flag"):
        child.wait_for_port(free_port(), timeout=20)


def test_a_condition_met_just_before_the_exit_is_not_an_exit(supervisor: Supervisor) -> None:
    # Prepare: a child that says its line and exits, as a refused SuperNode does once bound;
    # the waiter first looks at the log before the line was there, then finds the child gone
    child = supervisor.start("brief", [sys.executable, "-c", "print('bound', flush=True)"])
    child.wait(timeout=20)
    looks = iter([False])

    # Execute / Assert: it looks again and finds the line
    child.wait_until(lambda: next(looks, "bound" in child.log_text()), "log 'bound'", 5)


SUPERVISED = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from sigmax_fl.deploy.processes import Supervisor
    with Supervisor(Path(sys.argv[1])) as sup:
        child = sup.start("sleeper", [sys.executable, "-c", "import time; time.sleep(120)"])
        print(child.pid, flush=True)
        time.sleep(120)
    """
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_signal_to_supervising_process_stops_its_children(
    tmp_path: Path, supervisor: Supervisor, signum: signal.Signals
) -> None:
    # Prepare: a supervising Python process (itself supervised, for cleanup)
    script = tmp_path / "supervised.py"
    script.write_text(SUPERVISED)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    outer = supervisor.start("outer", [sys.executable, str(script), str(tmp_path)], env=env)
    outer.wait_until(lambda: outer.log_text().strip().isdigit(), "print its child", 30)
    child_pid = int(outer.log_text())

    # Execute
    outer.popen.send_signal(signum)
    status = outer.wait(timeout=20)

    # Assert
    # SIGTERM: our Terminated exit status; SIGINT: Python re-raises it after cleanup
    assert status == (128 + signal.SIGTERM if signum == signal.SIGTERM else -signal.SIGINT)
    assert "time.sleep(120)" not in _cmdline(child_pid)


# --- integration: real SuperLinks and SuperNodes ----------------------------------


def _busy_port_first(monkeypatch: pytest.MonkeyPatch, busy: int) -> None:
    """Make the next free port ``flwr_cli`` picks ``busy``, as if taken since, then real ones."""
    ports = iter([busy])
    monkeypatch.setattr(
        flwr_cli, "free_port", lambda host="127.0.0.1": next(ports, 0) or free_port(host)
    )


@pytest.mark.integration
def test_superlink_port_collision_is_reported_or_retried(
    tmp_path: Path,
    supervisor: Supervisor,
    home: FlwrHome,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]

        # An explicit busy port fails at once, with the cause from the log
        with pytest.raises(ProcessError, match="address already in use"):
            start_superlink(supervisor, home, tmp_path / "a.db", simulation=True, port=busy)

        # A free port that got taken meanwhile is replaced by another one
        _busy_port_first(monkeypatch, busy)
        link = start_superlink(supervisor, home, tmp_path / "b.db", simulation=True)

    assert link.port != busy
    assert link.process.returncode is None


@pytest.mark.integration
def test_supernode_port_collision_is_retried_even_when_refusal_is_expected(
    supervisor: Supervisor, home: FlwrHome, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A node started without waiting for its connection (one the SuperLink may refuse)
    # used to be handed back at once; a taken Runtime API port then passed for a refusal
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        _busy_port_first(monkeypatch, busy)
        node = start_supernode(
            supervisor, home, "127.0.0.1:1", {}, insecure=True,
            max_retries=1, name="refusable", wait_connected=False,
        )  # fmt: skip

    log_text = node.log_text()
    bound = re.search(rf"{HTTP_API_LISTENING} http://127\.0\.0\.1:(\d+)", log_text)
    assert bound is not None and int(bound.group(1)) != busy, log_text
    assert "address already in use" not in log_text


@pytest.mark.integration
def test_simulation_run_completes_and_stop_reaches_ray(
    tmp_path: Path, supervisor: Supervisor, home: FlwrHome, tiny_app: Path
) -> None:
    # Prepare: the runner's Ray environment (`make run`), which must reach Ray's raylet (not
    # inherited from this shell: the test would pass without extra_env)
    for key in SIMULATION_RAY_ENV:
        home.env.pop(key, None)
    link = start_superlink(
        supervisor, home, tmp_path / "sim.db", simulation=True, extra_env=SIMULATION_RAY_ENV
    )
    home.add_connection("sim", link.address)
    result = tmp_path / "result.json"

    # Execute: 2 rounds on 3 simulated SuperNodes
    with (tmp_path / "run.log").open("w") as sink:
        run_id = home.run_app(
            tiny_app,
            "sim",
            run_config={"num-server-rounds": 2, "result-file": str(result)},
            federation_config={"num-supernodes": 3, "client-resources-num-cpus": 1},
            sink=sink,
            timeout=60,
        )

    # Assert
    assert home.run_status(run_id, "sim") == FINISHED_OK
    assert json.loads(result.read_text()) == {"final": [2.0, 2.0, 2.0], "nodes": 3}
    # The SuperLink ran in the neutral directory, not in the project
    assert Path(f"/proc/{link.process.pid}/cwd").resolve() == home.workdir

    # Execute: a long run, left running until Ray is up; teardown must stop it
    home.flwr_run(tiny_app, "sim", {"num-server-rounds": 1000})
    link.process.wait_until(
        lambda: any("raylet" in _cmdline(pid) for pid in link.process.remaining()),
        "start Ray for the second run",
        timeout=30,
    )
    # Ray lives in the SuperExec's own session, outside the SuperLink's group
    ray_pids = [pid for pid in link.process.remaining() if "raylet" in _cmdline(pid)]
    assert all(p not in _group_members(link.process.pid) for p in ray_pids)
    # Ray's raylet (which starts the workers) got the runner's settings through Flower's chain
    for pid in ray_pids:
        assert SIMULATION_RAY_ENV.items() <= environ_of(pid).items(), f"raylet {pid}"


def _group_members(pgid: int) -> set[int]:
    members = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[2]) == pgid:
                members.add(int(proc.name))
    return members


@pytest.mark.integration
def test_tls_deployment_with_supernode_auth_refuses_strangers(
    tmp_path: Path, supervisor: Supervisor, home: FlwrHome, tiny_app: Path
) -> None:
    # Prepare: credentials, a TLS + auth SuperLink, two registered SuperNodes
    creds = ensure_credentials(tmp_path / "creds", ["alpha", "beta"])
    link = start_superlink(
        supervisor, home, tmp_path / "deploy.db", tls=creds, enable_supernode_auth=True
    )
    home.add_connection("local", link.address, root_certificates=creds.ca_cert)
    node_ids = {n: home.register_supernode(k.public_key, "local") for n, k in creds.nodes.items()}
    assert all(isinstance(i, int) for i in node_ids.values())
    assert home.register_supernode(creds.nodes["alpha"].public_key, "local") is None
    seen = tmp_path / "seen"
    seen.mkdir()
    members = [
        start_supernode(
            supervisor,
            home,
            link.address,
            {"out-dir": str(seen), "instance-id": f"inst {name}", "venue": "coin base"},
            root_certificates=creds.ca_cert,
            private_key=key.private_key,
            name=f"supernode-{name}",
            wait_connected=False,  # each bound its port; connections awaited below
        )
        for name, key in creds.nodes.items()
    ]
    stranger = write_node_key(tmp_path / "stranger.key")
    refused = {
        "no key": start_supernode(
            supervisor, home, link.address, {}, creds.ca_cert,
            max_retries=1, name="no-key", wait_connected=False,
        ),
        "unregistered": start_supernode(
            supervisor, home, link.address, {}, creds.ca_cert, stranger.private_key,
            max_retries=1, name="unregistered", wait_connected=False,
        ),
        "no tls": start_supernode(
            supervisor, home, link.address, {}, insecure=True,
            max_retries=1, name="no-tls", wait_connected=False,
        ),
    }  # fmt: skip
    for member in members:
        member.wait_for_log(SUPERNODE_CONNECTED, timeout=60)
    result = tmp_path / "result.json"

    # Execute
    with (tmp_path / "run.log").open("w") as sink:
        run_id = home.run_app(
            tiny_app, "local", run_config={"result-file": str(result)}, sink=sink, timeout=90
        )

    # Assert: the run completed on exactly the two registered nodes
    assert home.run_status(run_id, "local") == FINISHED_OK
    assert json.loads(result.read_text()) == {"final": [2.0, 2.0, 2.0], "nodes": 2}
    assert sorted(p.name for p in seen.iterdir()) == ["inst alpha", "inst beta"]
    assert {p.read_text() for p in seen.iterdir()} == {"coin base"}
    # Execute / Assert: a failing ServerApp is an error although `flwr run` exits 0
    with pytest.raises(FlwrError, match="finished:failed"):
        home.run_app(tiny_app, "local", {"fail-now": True}, stream=False, timeout=60)
    # Assert: each stranger was refused with Flower's reason and exit code 305
    # (Flower logs its code; the process status of every such error is 1)
    reasons = {
        "no key": "[code: 2001] SuperNode authentication is enabled",
        "unregistered": "[code: 2004] Failed to activate SuperNode",
        "no tls": "could not establish a connection to the SuperLink",
    }
    for case, node in refused.items():
        assert node.wait(timeout=30) == 1, case
        assert "Exit Code: 305" in node.log_text(), case
        assert reasons[case] in node.log_text(), case
        assert SUPERNODE_CONNECTED not in node.log_text(), case

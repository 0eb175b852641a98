"""One SuperLink that runs the app to the end, and one SuperNode that keeps an instance joined.

Shared by the SIGMAX entry points (:mod:`sigmax_fl.deploy.server`,
:mod:`sigmax_fl.deploy.client`) and the Python API (:mod:`sigmax_fl.manager`), so both
paths start, check and stop Flower's processes the same way. Facts of Flower 1.42 relied on
here, seen by running it:

* ``flwr ls`` reports a failed ServerApp as ``finished:failed`` with the exception's message
  in ``status-details`` (e.g. the strategy's ``NotEnoughNodesError``), so that message ends
  up in :class:`~sigmax_fl.deploy.flwr_cli.FlwrError`;
* a SuperNode refused by a SuperLink with SuperNode authentication exits at once with
  status 1 and logs ``[code: 2004]`` (its key is not registered) or ``[code: 2001]`` (it
  has no key); ``--max-retries`` does not apply to a refusal;
* a SuperNode that cannot reach its SuperLink retries forever, so clients may start first.
"""

from __future__ import annotations

import codecs
import io
import json
import logging
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from sigmax_fl.deploy.env import ClientOptions, ServerOptions, app_config
from sigmax_fl.deploy.flwr_cli import (
    SUPERNODE_CONNECTED,
    ConfigValue,
    FlwrError,
    FlwrHome,
    start_superlink,
    start_supernode,
)
from sigmax_fl.deploy.processes import ManagedProcess, ProcessError, Supervisor

log = logging.getLogger("sigmax_fl.deploy")

CONNECTION = "sigmax"
"""Name of the ``flwr`` connection written into the server's Flower home; an operator can use
it for ``FLWR_HOME=$FL_STATE_DIR/flwr-home flwr supernode register KEY.pub sigmax``."""

REFUSED_UNREGISTERED = "[code: 2004]"
"""Flower's log code for a SuperNode whose key the SuperLink does not know (yet)."""

REFUSED_NO_KEY = "[code: 2001]"
"""Flower's log code for a SuperNode without a key on a SuperLink that requires one."""

RETRY_INTERVAL = 1.0
"""Seconds before a SuperNode whose key is not registered yet tries again; doubled after each
refusal up to :data:`MAX_RETRY_INTERVAL`: quick when the client merely won the race with the
server's registration, quiet when the key waits for an operator."""

MAX_RETRY_INTERVAL = 30.0

STARTUP_ALLOWANCE = 600.0
"""Seconds a run may take beyond its rounds: FAB install, process starts, final writes."""

_OUTPUTS_LINE = re.compile(r"sigmax-fl: outputs of this run go to (.+?)\s*$", re.MULTILINE)


class NodeRefusedError(RuntimeError):
    """The SuperLink refused the SuperNode for good (it requires a key and none was given)."""


@dataclass(frozen=True)
class RunOutcome:
    """A completed run.

    Attributes
    ----------
    run_id : int
        Flower's run id.
    seconds : float
        Wall time from submission to the end.
    run_dir : Path | None
        The run folder the ServerApp wrote (history, checkpoints, final model), as it
        logged it; None if the log did not name one.
    """

    run_id: int
    seconds: float
    run_dir: Path | None

    @property
    def final_model(self) -> Path | None:
        """The final global artefact ``summary.json`` names, if it exists.

        ``final_model.pt``, or ``final_body.pt`` when ``personalisation = "local-head"`` keeps
        each head on its instance: the summary is the ServerApp's own word for which.
        """
        if self.run_dir is None:
            return None
        try:
            path = Path(json.loads((self.run_dir / "summary.json").read_text())["final_model"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return path if path.is_file() else None


class RunLog(io.TextIOBase):
    """Copies the streamed run log to ``out`` and remembers the run folder it names."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.run_dir: Path | None = None

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.out.write(text)
        if match := _OUTPUTS_LINE.search(text):
            self.run_dir = Path(match[1])
        return len(text)

    def flush(self) -> None:
        self.out.flush()


def run_timeout(app_dir: Path, run_config: dict[str, Any]) -> float:
    """Upper bound on a run's duration, so that no wait is endless.

    Every round has two phases (train, evaluate); each may wait ``wait-for-nodes-timeout``
    for nodes and ``round-timeout`` for replies, then the ServerApp fails or moves on.
    """
    from sigmax_fl.settings import Settings

    settings = Settings.from_run_config({**app_config(app_dir), **run_config})
    per_round = 2 * (settings.wait_for_nodes_timeout + settings.round_timeout)
    return settings.num_server_rounds * per_round + STARTUP_ALLOWANCE


class Server:
    """A SuperLink that runs the app once and stops (unless told to keep serving).

    Parameters
    ----------
    options : ServerOptions
        Address, TLS, SuperNode authentication, keys to register, state folder, app.
    """

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self._lock = threading.Lock()
        self._supervisor: Supervisor | None = None
        self._stopped = False

    def run(self, run_config: dict[str, ConfigValue], sink: TextIO | None = None) -> RunOutcome:
        """Start the SuperLink, register keys, submit the app, stream it to its end.

        Parameters
        ----------
        run_config : dict[str, ConfigValue]
            Overrides of ``[tool.flwr.app.config]``.
        sink : TextIO | None
            Where the run's log goes; stdout if None.

        Returns
        -------
        RunOutcome
            Of a run that ended ``finished:completed``.

        Raises
        ------
        FlwrError
            If the run ends otherwise (the message carries the ServerApp's error) or
            :meth:`stop` was called.
        ProcessError
            If the SuperLink does not start (e.g. its port is taken), or exits by itself
            while kept running.
        """
        opts = self.options
        logs = opts.state_dir / "logs" / time.strftime("%Y%m%d-%H%M%S")
        with self._lock:
            if self._stopped:
                raise FlwrError("the server was stopped before it started")
            self._supervisor = Supervisor(logs)
        with self._supervisor as supervisor:
            home = FlwrHome(opts.state_dir / "flwr-home")
            link = start_superlink(
                supervisor,
                home,
                opts.state_dir / "superlink.db",
                tls=opts.tls,
                enable_supernode_auth=opts.supernode_auth,
                host=opts.address.host,
                port=opts.address.port,
            )
            log.info(
                "SuperLink listening on %s (%s, SuperNode authentication %s); its log: %s",
                opts.address,
                "TLS" if opts.tls else "NO TLS",
                "on" if opts.supernode_auth else "off",
                link.process.log_path,
            )
            home.add_connection(
                CONNECTION,
                opts.address.connect,
                root_certificates=opts.tls.ca_cert if opts.tls else None,
            )
            ids = home.register_supernodes(list(opts.authorized_keys), CONNECTION)
            for key, node_id in zip(opts.authorized_keys, ids, strict=True):
                log.info(
                    "public key %s %s",
                    key,
                    "already registered" if node_id is None else f"registered as node {node_id}",
                )
            run_log = RunLog(sink or sys.stdout)
            started = time.monotonic()
            run_id = home.run_app(
                opts.app_dir,
                CONNECTION,
                run_config=run_config,
                sink=run_log,
                timeout=run_timeout(opts.app_dir, run_config),
            )
            outcome = RunOutcome(run_id, time.monotonic() - started, run_dir=run_log.run_dir)
            log.info(
                "run %d finished:completed in %.1f s; final model: %s",
                run_id,
                outcome.seconds,
                outcome.final_model,
            )
            if opts.keep_running:
                log.info("FL_KEEP_RUNNING=1: the SuperLink keeps serving until stopped")
                status = link.process.popen.wait()
                raise ProcessError(
                    f"the SuperLink exited by itself with status {status}; its log: "
                    f"{link.process.log_path}"
                )
        return outcome

    def stop(self) -> None:
        """Stop the SuperLink and everything it started; safe from another thread."""
        with self._lock:
            self._stopped = True
            supervisor = self._supervisor
        if supervisor is not None:
            supervisor.stop_all()


class SuperNodeRunner:
    """Keeps one instance's SuperNode running and copies its log to ``sink``.

    A SuperLink with SuperNode authentication refuses a key it does not know yet, and the
    operator may register it only after the SuperNode started (``flwr supernode register``,
    or ``FL_AUTHORIZED_KEYS`` at the server's start, racing the clients): such a refusal is
    retried after ``retry_interval`` seconds, doubling up to :data:`MAX_RETRY_INTERVAL`, each
    time logged. Any other exit ends the run.

    Parameters
    ----------
    options : ClientOptions
        SuperLink address, TLS, key, state folder.
    node_config : dict[str, ConfigValue]
        The node's ``context.node_config`` (``instance-id``, ``data-path``, ``venue``).
    name : str
        Instance name, for logs.
    sink : TextIO | None
        Where to copy the SuperNode's log as it grows; None: only to its log file under
        ``options.state_dir / "logs"``.
    retry_interval : float
        Seconds before the first new attempt while the key is not registered.
    """

    def __init__(
        self,
        options: ClientOptions,
        node_config: dict[str, ConfigValue],
        name: str,
        sink: TextIO | None = None,
        retry_interval: float = RETRY_INTERVAL,
    ) -> None:
        self.options = options
        self.node_config = node_config
        self.name = name
        self.sink = sink
        self.retry_interval = retry_interval
        self._stop = threading.Event()
        self._process: ManagedProcess | None = None

    @property
    def connected(self) -> bool:
        """True once the SuperLink has accepted the current SuperNode."""
        process = self._process
        return process is not None and SUPERNODE_CONNECTED in process.log_text()

    def run(self) -> int:
        """Run until the SuperNode exits for good or :meth:`stop` is called.

        Returns
        -------
        int
            The SuperNode's exit status; 0 after :meth:`stop`.

        Raises
        ------
        NodeRefusedError
            If the SuperLink requires a key and this node has none.
        """
        opts = self.options
        delay = self.retry_interval
        with Supervisor(opts.state_dir / "logs") as supervisor:
            home = FlwrHome(opts.state_dir / "flwr-home")
            while not self._stop.is_set():
                self._process = start_supernode(
                    supervisor,
                    home,
                    opts.superlink.connect,
                    self.node_config,
                    root_certificates=opts.root_certificates,
                    private_key=opts.node_key,
                    insecure=opts.root_certificates is None,
                    max_retries=None,
                    name=f"supernode-{self.name}",
                    wait_connected=False,
                )
                status = self._follow(self._process)
                if self._stop.is_set():
                    break
                text = self._process.log_text()
                if REFUSED_NO_KEY in text:
                    raise NodeRefusedError(
                        f"the SuperLink at {opts.superlink} requires SuperNode authentication: "
                        "set FL_NODE_KEY to this instance's private key and have its public "
                        "key registered"
                    )
                if REFUSED_UNREGISTERED not in text:
                    return status
                log.warning(
                    "%s: the SuperLink refused key %s.pub (not registered); the operator "
                    "registers it with `flwr supernode register`; retrying in %.0f s",
                    self.name,
                    opts.node_key,
                    delay,
                )
                self._stop.wait(delay)
                delay = min(2 * delay, MAX_RETRY_INTERVAL)
        return 0

    def stop(self) -> None:
        """Ask :meth:`run` to stop its SuperNode and return.

        It does so within 0.2 s, or, while a SuperNode is being started, once that
        node has bound its Runtime API port (seconds: Flower's imports).
        """
        self._stop.set()

    def _follow(self, process: ManagedProcess) -> int:
        """Copy the log while the SuperNode runs; its exit status, or -1 if stopped."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        with open(process.log_path, "rb") as log_file:
            while True:
                status = process.returncode
                if (chunk := log_file.read()) and self.sink is not None:
                    self.sink.write(decoder.decode(chunk))
                    self.sink.flush()
                if status is not None:
                    return status
                if self._stop.wait(0.2):
                    return -1

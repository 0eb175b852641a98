"""Drive Flower 1.42's own executables: SuperLink, SuperNodes and the ``flwr`` CLI.

Everything here shells out to the commands a user would type, so what the tests
and ``make deploy-local`` exercise is Flower's supported interface, not its
internals. Facts of Flower 1.42 this module depends on (verified by running it):

* ``flwr`` reads connections only from ``$FLWR_HOME/config.toml``
  (``[superlink] default = NAME`` and ``[superlink.NAME]`` tables with
  ``address`` and ``insecure = true`` or ``root-certificates = "/abs/ca.crt"``);
  a private ``FLWR_HOME`` keeps the user's ``~/.flwr`` and other runs out.
* ``options.*`` in a connection is deprecated in 1.42 (``flwr run`` warns); the
  number of simulated SuperNodes and their resources go per run through
  ``flwr run --federation-config "num-supernodes=N client-resources-num-cpus=1"``.
* The SuperLink and SuperNode start helpers by bare name (``flower-superexec``,
  ``flwr-serverapp``, ``flwr-simulation``, ``flwr-clientapp``): the directory of
  the running interpreter must be on ``PATH`` or the SuperLink dies at startup
  with ``FileNotFoundError: 'flower-superexec'``.
* The SuperLink installs each app's dependencies with ``uv sync`` unless
  ``--disable-runtime-dependency-installation`` (and the environment variable
  ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``) turn it off.
* Simulated ClientApps import from the SuperLink's working directory: it is
  started in an empty directory so stale project code cannot shadow the app.
* ``--format json`` makes ``flwr`` print one JSON document, but a failure is
  reported as ``{"success": false, "error-message": ...}`` with exit status 0,
  and ``flwr run`` exits 0 for a run that later fails: both are checked here.
* ``flwr run APP`` walks and resolves every file under ``APP`` before it applies
  ``.gitignore`` (``flwr.cli.utils.collect_files``); :func:`packed_files` hands it only the
  files it would pack.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from sigmax_fl.deploy.credentials import Credentials, ServerCertificates
from sigmax_fl.deploy.processes import ManagedProcess, ProcessError, Supervisor, free_port

ConfigValue = bool | int | float | str
"""Types Flower accepts in run config, node config and federation config."""

FINISHED_OK = "finished:completed"
"""Run status of a run whose ServerApp returned normally."""

SUPERNODE_CONNECTED = "SuperNode ID:"
"""Log line a SuperNode prints once the SuperLink has accepted it."""

HTTP_API_LISTENING = "Uvicorn running on"
"""Log line the SuperLink and each SuperNode print once their Runtime HTTP API is bound."""

_ADDRESS_IN_USE = re.compile(r"address already in use", re.IGNORECASE)
_CONFIG_KEY = re.compile(r"^[A-Za-z0-9_.-]+$")
_CONNECTION_NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # a TOML bare key: no dots


class FlwrError(RuntimeError):
    """A ``flwr`` CLI command failed or a run did not finish as required."""


@contextlib.contextmanager
def packed_files(app_dir: Path) -> Iterator[Path]:
    """A copy of just the files of the app folder that Flower packs, for ``flwr run``.

    ``flwr run`` walks and resolves every file under the app folder and only then applies
    ``.gitignore``: with this project's ``.venv`` inside it, about 48,000 files and 2.5 s of
    every run here. The copy holds the files Flower would pack, by its own patterns (the kinds
    of file it takes, minus its own exclusions and ``.gitignore``), so the FAB, whose hash is
    of paths and content only, is the same; it takes milliseconds. A ``.gitignore`` with a
    ``!`` pattern could re-include a file under an ignored folder, so then the folder is used
    as it is. Like Flower, a symlinked ``.gitignore`` counts for nothing.
    """
    from flwr.cli.utils import build_pathspec, load_gitignore_patterns
    from flwr.supercore.constant import APP_PUBLISH_EXCLUDE_PATTERNS, APP_PUBLISH_INCLUDE_PATTERNS

    gitignore = app_dir / ".gitignore"
    patterns = []
    if gitignore.is_file() and not gitignore.is_symlink():
        patterns = load_gitignore_patterns(gitignore)
    if any(p.lstrip().startswith("!") for p in patterns):
        yield app_dir
        return
    ignored = build_pathspec([*patterns, *APP_PUBLISH_EXCLUDE_PATTERNS])
    packed = build_pathspec(APP_PUBLISH_INCLUDE_PATTERNS)
    with tempfile.TemporaryDirectory(prefix="sigmax-fl-app-") as tmp:
        copy = Path(tmp) / app_dir.name
        for folder, dirnames, filenames in os.walk(app_dir):
            here = Path(folder).relative_to(app_dir)
            dirnames[:] = [
                d
                for d in dirnames
                if not ignored.match_file(f"{(here / d).as_posix()}/")
                and not (Path(folder) / d).is_symlink()
            ]
            for name in filenames:
                source, relative = Path(folder) / name, (here / name).as_posix()
                if source.is_symlink() or ignored.match_file(relative):
                    continue
                if packed.match_file(relative):
                    (copy / here).mkdir(parents=True, exist_ok=True)
                    shutil.copy2(source, copy / relative)
        yield copy


SIMULATION_RAY_ENV: Mapping[str, str] = {"RAY_prestart_worker_first_driver": "0"}
"""Environment of a simulation SuperLink for the Ray its simulation process starts.

When the first driver connects, Ray starts one idle worker process per CPU in advance.
Flower's ClientApp actors are not placed in them (their start-up took as long with them as
without), so on a small machine those extra Python processes only compete for the cores with
Ray's own start-up: the first round at 10 instances took 9.04 s instead of 10.09 s here
(medians of three alternated runs each). Ray reads ``RAY_<setting>`` from the environment
of the processes it starts, so the variable is set on the SuperLink and inherited by its
SuperExec, the simulation process and Ray.
"""


def simulation_federation_config(
    num_supernodes: int, actors: int | None = None
) -> dict[str, ConfigValue]:
    """``--federation-config`` for a simulated federation: one 1-CPU Ray actor per core.

    Flower 1.42 reads these keys per run (``flwr.simulation.app._run_simulation_settings``):
    ``client-resources-num-cpus`` (whole CPUs per ClientApp actor) and ``init-args-num-cpus``
    (CPUs Ray may use, ``ray.init(num_cpus=...)``), and Ray starts
    ``init-args-num-cpus // client-resources-num-cpus`` actors. Flower's default of 2 CPUs per
    client leaves a 2-core machine one serial actor whose 2 torch threads compete with the
    simulation process; 1-CPU actors run the instances side by side, and the ClientApp uses
    one torch thread each.

    Parameters
    ----------
    num_supernodes : int
        Simulated SuperNodes (instances).
    actors : int | None
        ClientApp actors running side by side; the machine's usable cores if None.

    Returns
    -------
    dict[str, ConfigValue]
        For :meth:`FlwrHome.flwr_run`'s ``federation_config``.
    """
    actors = actors or len(os.sched_getaffinity(0))
    if num_supernodes < 1 or actors < 1:
        raise ValueError(
            f"num-supernodes ({num_supernodes}) and actors ({actors}) must be at least 1"
        )
    return {
        "num-supernodes": num_supernodes,
        "client-resources-num-cpus": 1,
        "init-args-num-cpus": actors,
    }


def flower_executable(name: str) -> str:
    """Return the absolute path of a Flower console script.

    The interpreter's own ``bin`` directory comes first so the Flower of this
    virtual environment is used even when it is not activated.

    Raises
    ------
    FlwrError
        If the script is not installed.
    """
    found = shutil.which(name, path=os.pathsep.join([_bin_dir(), os.environ.get("PATH", "")]))
    if found is None:
        raise FlwrError(f"{name} not found: install flwr[simulation]==1.42.* in this environment")
    return found


def _bin_dir() -> str:
    # Not resolved: a venv's python is a symlink and its bin dir holds the scripts.
    return str(Path(sys.executable).parent)


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Return the environment for every Flower process and CLI call.

    Parameters
    ----------
    flwr_home : Path
        Private Flower home (CLI config, app cache, runtime environments).

    Returns
    -------
    dict[str, str]
        The current environment plus ``FLWR_HOME``, runtime dependency
        installation off, telemetry and update checks off (no network here), and
        this interpreter's ``bin`` directory first on ``PATH``.
    """
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PATH": os.pathsep.join([_bin_dir(), env.get("PATH", "")]),
        }
    )
    return env


def format_config(values: Mapping[str, ConfigValue]) -> str:
    """Encode a config mapping as Flower's ``"k1=v1 k2=v2"`` string.

    Flower splits the string with the pattern ``key=('...'|"..."|non-space)`` and
    parses each value as TOML. Strings become TOML literal strings (``'...'``,
    no escapes, so paths with backslashes survive) or, if they contain a single
    quote, basic strings with JSON-compatible escapes.

    Parameters
    ----------
    values : Mapping[str, ConfigValue]
        Keys (letters, digits, ``_``, ``-``, ``.``) to bool, int, float or str.

    Returns
    -------
    str
        The encoded string, for ``--run-config``, ``--node-config`` or
        ``--federation-config``.

    Raises
    ------
    ValueError
        For a key or value that the format cannot carry: a string holding both
        quote characters or a newline, or a non-finite float.
    """
    parts = []
    for key, value in values.items():
        if not _CONFIG_KEY.match(key):
            raise ValueError(f"config key {key!r} must match {_CONFIG_KEY.pattern}")
        if isinstance(value, bool):
            encoded = "true" if value else "false"
        elif isinstance(value, int):
            encoded = str(value)
        elif isinstance(value, float):
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError(f"config value of {key!r} must be finite, got {value}")
            encoded = repr(value)
        elif isinstance(value, str):
            encoded = _toml_string(key, value)
        else:
            raise ValueError(f"config value of {key!r} must be bool, int, float or str")
        parts.append(f"{key}={encoded}")
    return " ".join(parts)


def _toml_string(key: str, value: str) -> str:
    if "\n" in value or "\r" in value:
        raise ValueError(f"config value of {key!r} must be one line")
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return json.dumps(value)
    raise ValueError(f"config value of {key!r} cannot hold both ' and \"")


def _parse_json_output(stdout: str, command: list[str]) -> dict[str, Any]:
    """Parse the JSON document of ``--format json`` and check its ``success``."""
    start = stdout.find("{")
    try:
        payload = json.loads(stdout[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        payload = None
    if not isinstance(payload, dict):
        raise FlwrError(f"{' '.join(command)} printed no JSON document:\n{stdout}")
    if not payload.get("success", False):
        message = payload.get("error-message", stdout)
        raise FlwrError(f"{' '.join(command)} failed: {message}")
    return payload


def _copy_lines(source: TextIO, sink: TextIO) -> None:
    for line in source:
        sink.write(line)
        sink.flush()


@dataclass(frozen=True)
class SuperLink:
    """A running SuperLink and how to reach it.

    Attributes
    ----------
    process : ManagedProcess
        The ``flower-superlink`` child.
    host : str
        Interface it listens on.
    port : int
        Its single port for the Fleet, Control and Runtime APIs.
    root_certificates : Path | None
        CA certificate clients verify it with; None if it runs without TLS.
    """

    process: ManagedProcess
    host: str
    port: int
    root_certificates: Path | None

    @property
    def address(self) -> str:
        """``HOST:PORT`` for SuperNodes and CLI connections."""
        return f"{self.host}:{self.port}"


class FlwrHome:
    """A private ``FLWR_HOME`` with its ``config.toml``, and the ``flwr`` calls using it.

    Parameters
    ----------
    path : Path | None
        Directory to use (kept afterwards); a new temporary directory, removed by
        :meth:`close`, if None.
    """

    def __init__(self, path: Path | None = None) -> None:
        self._temporary = path is None
        self.path = Path(tempfile.mkdtemp(prefix="flwr-home-")) if path is None else path
        self.path = self.path.resolve()
        self.path.mkdir(parents=True, exist_ok=True)
        self.env = flower_env(self.path)
        self._connections: dict[str, dict[str, ConfigValue]] = {}
        self._default: str | None = None

    def close(self) -> None:
        """Remove the directory if it was created as a temporary one."""
        if self._temporary:
            shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> FlwrHome:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def workdir(self) -> Path:
        """Empty working directory for SuperLinks, so no stale code is importable."""
        path = self.path / "superlink-workdir"
        path.mkdir(exist_ok=True)
        return path

    def add_connection(
        self,
        name: str,
        address: str,
        root_certificates: Path | None = None,
        default: bool = False,
    ) -> None:
        """Add or replace a ``[superlink.NAME]`` connection and rewrite ``config.toml``.

        The file holds exactly the connections added through this object, so a
        reused directory never keeps a stale address from an earlier session.

        Parameters
        ----------
        name : str
            Connection name, as passed to ``flwr run APP NAME``.
        address : str
            ``HOST:PORT`` of the SuperLink.
        root_certificates : Path | None
            CA certificate for TLS (made absolute, as Flower requires); the
            connection is ``insecure = true`` if None.
        default : bool
            Make it ``[superlink] default`` (the first connection always is).
        """
        if not _CONNECTION_NAME.match(name):
            raise ValueError(f"connection name {name!r} must match {_CONNECTION_NAME.pattern}")
        table: dict[str, ConfigValue] = {"address": address}
        if root_certificates is None:
            table["insecure"] = True
        else:
            table["root-certificates"] = str(root_certificates.resolve())
        self._connections[name] = table
        if default or self._default is None:
            self._default = name
        lines = ["[superlink]", f"default = {json.dumps(self._default)}", ""]
        for conn_name, conn in self._connections.items():
            lines.append(f"[superlink.{conn_name}]")
            for key, value in conn.items():
                lines.append(f"{key} = {json.dumps(value)}")
            lines.append("")
        (self.path / "config.toml").write_text("\n".join(lines), encoding="utf-8")

    def flwr(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        """Run ``flwr ARGS --format json`` and return its JSON document.

        Raises
        ------
        FlwrError
            If the command exits non-zero, times out, or reports failure.
        """
        command = [flower_executable("flwr"), *args, "--format", "json"]
        try:
            done = subprocess.run(
                command,
                env=self.env,
                cwd=self.path,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as err:
            raise FlwrError(f"{' '.join(command)} timed out after {timeout:.0f} s") from err
        if done.returncode != 0:
            raise FlwrError(
                f"{' '.join(command)} exited with {done.returncode}:\n{done.stdout}{done.stderr}"
            )
        return _parse_json_output(done.stdout, command)

    def flwr_run(
        self,
        app_dir: Path,
        connection: str,
        run_config: Mapping[str, ConfigValue] | None = None,
        federation_config: Mapping[str, ConfigValue] | None = None,
    ) -> int:
        """Submit an app with ``flwr run APP CONNECTION`` and return the run id.

        It returns as soon as the SuperLink accepted the run; use
        :meth:`stream_logs` and :meth:`wait_for_run` (or :meth:`run_app`) to
        follow it. The exit status of ``flwr run`` says nothing about the run.

        Parameters
        ----------
        app_dir : Path
            Directory with the app's ``pyproject.toml``.
        connection : str
            Name of a connection added with :meth:`add_connection`.
        run_config : Mapping[str, ConfigValue] | None
            Overrides of ``[tool.flwr.app.config]``.
        federation_config : Mapping[str, ConfigValue] | None
            Simulation settings, e.g. ``{"num-supernodes": 3,
            "client-resources-num-cpus": 1}``; ignored by a deployment SuperLink.

        Returns
        -------
        int
            The run id.
        """
        options = []
        if run_config:
            options += ["--run-config", format_config(run_config)]
        if federation_config:
            options += ["--federation-config", format_config(federation_config)]
        with packed_files(app_dir.resolve()) as app:
            try:
                return int(self.flwr("run", str(app), connection, *options)["run-id"])
            except FlwrError as err:  # name the user's folder, not the copy (gone by then)
                raise FlwrError(str(err).replace(str(app), str(app_dir.resolve()))) from None

    def stream_logs(
        self, run_id: int, connection: str, sink: TextIO | None = None, timeout: float = 600.0
    ) -> None:
        """Copy the run's log into ``sink`` (stdout by default) until the run ends.

        Runs ``flwr log RUN_ID CONNECTION --stream``, which returns once the run
        has finished. Lines are copied by a thread so any text stream works as
        the sink, including pytest's captured stdout.

        Raises
        ------
        FlwrError
            If the stream does not end within ``timeout`` seconds or fails.
        """
        out = sys.stdout if sink is None else sink
        command = [flower_executable("flwr"), "log", str(run_id), connection, "--stream"]
        with subprocess.Popen(
            command,
            env=self.env,
            cwd=self.path,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        ) as proc:
            assert proc.stdout is not None
            pipe = proc.stdout
            copier = threading.Thread(target=_copy_lines, args=(pipe, out), daemon=True)
            copier.start()
            try:
                status = proc.wait(timeout=timeout)
            except BaseException:
                proc.kill()
                raise
            finally:
                copier.join(timeout=5.0)
        if status != 0:
            raise FlwrError(f"flwr log {run_id} exited with {status}")

    def run_status(self, run_id: int, connection: str) -> str:
        """Return the run's status, e.g. ``running`` or ``finished:failed``.

        From ``flwr ls CONNECTION --run-id ID --format json``.
        """
        return str(self.run_info(run_id, connection)["status"])

    def run_info(self, run_id: int, connection: str) -> dict[str, Any]:
        """Return the run's record from ``flwr ls`` (status, details, timings)."""
        runs = self.flwr("ls", connection, "--run-id", str(run_id))["runs"]
        if not runs:
            raise FlwrError(f"run {run_id} is unknown to connection {connection!r}")
        return dict(runs[0])

    def wait_for_run(
        self, run_id: int, connection: str, timeout: float, interval: float = 1.0
    ) -> str:
        """Poll the run until its status starts with ``finished`` and return it.

        Raises
        ------
        FlwrError
            If it has not finished after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while not (status := self.run_status(run_id, connection)).startswith("finished"):
            if time.monotonic() > deadline:
                raise FlwrError(f"run {run_id} still {status!r} after {timeout:.0f} s")
            time.sleep(interval)
        return status

    def run_app(
        self,
        app_dir: Path,
        connection: str,
        run_config: Mapping[str, ConfigValue] | None = None,
        federation_config: Mapping[str, ConfigValue] | None = None,
        stream: bool = True,
        sink: TextIO | None = None,
        timeout: float = 600.0,
    ) -> int:
        """Submit an app, optionally stream its log, and require it to complete.

        Parameters
        ----------
        app_dir, connection, run_config, federation_config
            As in :meth:`flwr_run`.
        stream : bool
            Copy the run's log to ``sink`` while waiting.
        sink : TextIO | None
            Destination of the log; stdout if None.
        timeout : float
            Seconds the whole run may take.

        Returns
        -------
        int
            The run id of a run with status ``finished:completed``.

        Raises
        ------
        FlwrError
            If the run ends with another status (the message carries the status
            details) or does not end in time.
        """
        deadline = time.monotonic() + timeout
        run_id = self.flwr_run(app_dir, connection, run_config, federation_config)
        if stream:
            self.stream_logs(run_id, connection, sink, timeout)
        status = self.wait_for_run(run_id, connection, max(deadline - time.monotonic(), 5.0))
        if status != FINISHED_OK:
            details = self.run_info(run_id, connection).get("status-details", "")
            raise FlwrError(f"run {run_id} ended {status!r}: {details}")
        return run_id

    def register_supernodes(self, public_keys: Sequence[Path], connection: str) -> list[int | None]:
        """Register several keys at once, like :meth:`register_supernode` each.

        Each ``flwr`` call is a Python start-up of about two seconds; run side by side
        they cost one.

        Returns
        -------
        list[int | None]
            Per key, in order: the new node id, or None if it was registered before.
        """
        if not public_keys:
            return []
        with ThreadPoolExecutor(max_workers=min(len(public_keys), 8)) as pool:
            return list(pool.map(lambda key: self.register_supernode(key, connection), public_keys))

    def register_supernode(self, public_key: Path, connection: str) -> int | None:
        """Register a SuperNode's public key with ``flwr supernode register``.

        Idempotent: a key that the SuperLink's database already holds (Flower's
        error code 23, "Public key already in use") is accepted as registered.

        Parameters
        ----------
        public_key : Path
            OpenSSH ECDSA public key file.
        connection : str
            Connection to a SuperLink started with ``--enable-supernode-auth``.

        Returns
        -------
        int | None
            The new node id, or None if the key was registered before.
        """
        try:
            payload = self.flwr("supernode", "register", str(public_key.resolve()), connection)
        except FlwrError as err:
            if "Public key already in use" in str(err):
                return None
            raise
        return int(payload["node-id"])


def start_superlink(
    supervisor: Supervisor,
    home: FlwrHome,
    database: Path,
    simulation: bool = False,
    tls: Credentials | ServerCertificates | None = None,
    enable_supernode_auth: bool = False,
    host: str = "127.0.0.1",
    port: int | None = None,
    attempts: int = 3,
    timeout: float = 60.0,
    extra_env: Mapping[str, str] | None = None,
) -> SuperLink:
    """Start ``flower-superlink`` and wait until it serves its API.

    Parameters
    ----------
    supervisor : Supervisor
        Owner that stops it (and its SuperExec, ServerApps and Ray) at the end.
    home : FlwrHome
        Private Flower home; also the source of the environment.
    database : Path
        SQLite file for runs and registered SuperNode keys (survives restarts).
    simulation : bool
        Run ClientApps in Flower's simulation engine instead of waiting for
        SuperNodes.
    tls : Credentials | ServerCertificates | None
        CA, certificate and key for TLS; ``--insecure`` if None.
    enable_supernode_auth : bool
        Accept only SuperNodes whose public key was registered (needs TLS).
    host : str
        Interface for the single Fleet/Control/Runtime port.
    port : int | None
        Port to use; a free one, retried on collision, if None.
    attempts : int
        Tries with a new free port when the chosen one was taken meanwhile.
    timeout : float
        Seconds to wait for the SuperLink to listen.
    extra_env : Mapping[str, str] | None
        Variables added to its environment, which its SuperExec, ServerApps and (in
        simulation) Ray inherit, e.g. :data:`SIMULATION_RAY_ENV`.

    Returns
    -------
    SuperLink
        The running SuperLink.

    Raises
    ------
    ValueError
        For SuperNode authentication without TLS.
    ProcessError
        If it does not start; the message carries the tail of its log.
    """
    if enable_supernode_auth and tls is None:
        raise ValueError("SuperNode authentication requires TLS credentials")
    argv = [flower_executable("flower-superlink")]
    if tls is None:
        argv.append("--insecure")
    else:
        argv += [
            "--ssl-ca-certfile", str(tls.ca_cert),
            "--ssl-certfile", str(tls.server_cert),
            "--ssl-keyfile", str(tls.server_key),
        ]  # fmt: skip
    if enable_supernode_auth:
        argv.append("--enable-supernode-auth")
    if simulation:
        argv.append("--simulation")
    argv += [
        "--database", str(database.resolve()),
        "--disable-runtime-dependency-installation",
        "--host", host,
    ]  # fmt: skip
    process, chosen = _start_on_free_port(
        supervisor,
        "superlink",
        lambda chosen: [*argv, "--port", str(chosen)],
        home,
        ready=lambda proc, chosen: (
            proc.wait_for_log(HTTP_API_LISTENING, timeout),
            proc.wait_for_port(chosen, host, timeout),
        ),
        host=host,
        port=port,
        attempts=attempts,
        env={**home.env, **(extra_env or {})},
    )
    return SuperLink(process, host, chosen, None if tls is None else tls.ca_cert)


def start_supernode(
    supervisor: Supervisor,
    home: FlwrHome,
    superlink_address: str,
    node_config: Mapping[str, ConfigValue],
    root_certificates: Path | None = None,
    private_key: Path | None = None,
    insecure: bool = False,
    port: int | None = None,
    max_retries: int | None = 10,
    name: str = "supernode",
    wait_connected: bool = True,
    timeout: float = 60.0,
) -> ManagedProcess:
    """Start ``flower-supernode`` connected to a SuperLink.

    Parameters
    ----------
    supervisor : Supervisor
        Owner that stops it (and its SuperExec and ClientApps) at the end.
    home : FlwrHome
        Source of the environment.
    superlink_address : str
        ``HOST:PORT`` of the SuperLink.
    node_config : Mapping[str, ConfigValue]
        The node's ``context.node_config`` (e.g. ``data-path``, ``venue``,
        ``instance-id``), encoded with :func:`format_config`.
    root_certificates : Path | None
        CA certificate to verify a TLS SuperLink.
    private_key : Path | None
        OpenSSH ECDSA key for SuperNode authentication.
    insecure : bool
        Connect without TLS (explicit, never implied).
    port : int | None
        Port of the node's own Runtime API (each node needs one); free if None.
    max_retries : int | None
        Connection attempts before the node gives up; None retries forever.
    name : str
        Name for errors and the log file.
    wait_connected : bool
        Wait until the SuperLink has accepted the node (its log shows its node
        id). Pass False for a node expected to be refused: it is then waited for
        only until its Runtime API is bound; :meth:`ManagedProcess.wait` for its exit.
    timeout : float
        Seconds to wait for the connection, or for the bind.

    Returns
    -------
    ManagedProcess
        The running SuperNode.

    Raises
    ------
    ValueError
        If neither TLS nor ``insecure`` is chosen.
    ProcessError
        If it exits or does not connect in time (with its log tail).
    """
    if root_certificates is None and not insecure:
        raise ValueError("give root_certificates for TLS or insecure=True explicitly")
    argv = [flower_executable("flower-supernode"), "--superlink", superlink_address]
    if insecure:
        argv.append("--insecure")
    if root_certificates is not None:
        argv += ["--root-certificates", str(root_certificates.resolve())]
    if private_key is not None:
        argv += ["--auth-supernode-private-key", str(private_key.resolve())]
    if max_retries is not None:
        argv += ["--max-retries", str(max_retries)]
    if node_config:
        argv += ["--node-config", format_config(node_config)]

    def ready(process: ManagedProcess, chosen: int) -> None:
        # The node binds its Runtime API port first (exiting with "address
        # already in use" if taken), then contacts the SuperLink. A node that may
        # be refused is still waited for until it is bound, so that a taken port
        # is retried instead of passing for the SuperLink's refusal.
        del chosen
        process.wait_for_log(SUPERNODE_CONNECTED if wait_connected else HTTP_API_LISTENING, timeout)

    process, _ = _start_on_free_port(
        supervisor,
        name,
        lambda chosen: [*argv, "--host", "127.0.0.1", "--port", str(chosen)],
        home,
        ready=ready,
        host="127.0.0.1",
        port=port,
    )
    return process


def _start_on_free_port(
    supervisor: Supervisor,
    name: str,
    argv_for: Callable[[int], list[str]],
    home: FlwrHome,
    ready: Callable[[ManagedProcess, int], object],
    host: str,
    port: int | None,
    attempts: int = 3,
    env: Mapping[str, str] | None = None,
) -> tuple[ManagedProcess, int]:
    """Start a server on ``port`` or on a free port, retrying if one gets taken.

    ``free_port`` cannot reserve the port, so another process may bind it first;
    the child then fails with "address already in use" and a new port is tried.
    Any other failure, or a failure on an explicit port, is raised at once. ``env`` is the
    server's whole environment, ``home.env`` if None.
    """
    attempt = 1
    while True:
        chosen = free_port(host) if port is None else port
        process = supervisor.start(
            name, argv_for(chosen), env=home.env if env is None else env, cwd=home.workdir
        )
        try:
            ready(process, chosen)
        except ProcessError:
            collided = bool(_ADDRESS_IN_USE.search(process.log_text()))
            if port is not None or not collided or attempt >= attempts:
                raise
            attempt += 1
            continue
        return process, chosen

"""Start, watch and stop the long-running child processes of a local federation.

Flower's SuperLink and SuperNodes are servers that never exit on their own, and
they start helpers of their own: the SuperLink launches ``flower-superexec`` with
``start_new_session=True`` (so it leaves the SuperLink's process group), that
SuperExec starts ``flwr-serverapp`` / ``flwr-simulation``, and a simulation
starts Ray (``gcs_server``, ``raylet``, ``ray::`` workers) in the SuperExec's
group. Killing the SuperLink's process group alone can therefore orphan a whole
Ray cluster. This module makes every such descendant findable and stoppable:

* each child starts in its own session and process group, so a terminal Ctrl-C
  reaches only the supervising Python process, which then stops the children in
  order instead of leaving them half-killed;
* each child gets a random tag in the environment variable ``SIGMAX_FL_TAGS``;
  environments are inherited, so every descendant carries it, also one that
  starts a new session or is re-parented to init when its parent dies;
* the process groups of tagged descendants are tracked too, because some Ray
  processes (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) overwrite their
  environment with their process title, outlive their raylet and ignore SIGTERM;
* stopping sends SIGTERM to the child's group, waits, then SIGTERMs and finally
  SIGKILLs whatever still runs in a tracked group or carries the tag.

Use :class:`Supervisor` as a context manager (or enter it on an
:class:`contextlib.ExitStack`): everything started through it is stopped when the
block ends, also on an exception, on Ctrl-C (SIGINT) and on SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType

TAG_ENV = "SIGMAX_FL_TAGS"
"""Environment variable holding the comma-separated tags of all supervising owners."""

DEFAULT_GRACE = 10.0
"""Seconds a child gets to exit after SIGTERM before it is killed."""

STRAGGLER_GRACE = 2.0
"""Seconds descendants left after the child exited get between SIGTERM and SIGKILL."""


class ProcessError(RuntimeError):
    """A child process failed to start, died early, or a wait on it timed out."""


class Terminated(SystemExit):
    """Raised in the main thread when the supervising process receives SIGTERM.

    It derives from :class:`SystemExit` so an uncaught one ends the program with
    the conventional status ``128 + SIGTERM`` after ``with`` blocks have unwound.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on ``host`` a moment ago.

    The kernel picks it by binding port 0. Another process can take it before
    the caller binds it, so callers retry with a new port when a start fails
    with "address already in use" (see ``flwr_cli.start_superlink``).

    Parameters
    ----------
    host : str
        Interface to bind; loopback by default.

    Returns
    -------
    int
        The port number.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_open(host: str, port: int, timeout: float = 0.25) -> bool:
    """Return True if something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _live_processes() -> Iterator[tuple[int, int]]:
    """Yield ``(pid, pgid)`` of every process that is not a zombie."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # exited while scanning
            continue
        # The command name in parentheses may contain spaces: split after it.
        fields = stat[stat.rindex(")") + 2 :].split()
        state, pgid = fields[0], int(fields[2])
        if state not in ("Z", "X"):
            yield int(entry.name), pgid


def environ_of(pid: int) -> dict[str, str]:
    """A live process's environment as it was started; empty if it exited or is not ours."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    items = (item.decode(errors="replace").split("=", 1) for item in raw.split(b"\0"))
    return {item[0]: item[1] for item in items if len(item) == 2}


def _tags_of(pid: int) -> list[str]:
    tags = environ_of(pid).get(TAG_ENV)
    return tags.split(",") if tags is not None else []


def tagged_processes(tag: str) -> list[int]:
    """Return the live pids whose environment carries ``tag`` in ``SIGMAX_FL_TAGS``.

    Set ``SIGMAX_FL_TAGS=TAG`` in a process's own environment and every child started
    through a :class:`Supervisor`, with all its descendants, inherits the tag: a test can
    then prove that nothing started by code it does not see (a runner's own supervisor)
    survived.
    """
    return sorted(pid for pid, _ in _live_processes() if tag in _tags_of(pid))


class ManagedProcess:
    """A child process in its own process group, with its output in a log file.

    Create it through :meth:`Supervisor.start`, which guarantees it is stopped.

    Parameters
    ----------
    name : str
        Human-readable name used in errors.
    argv : Sequence[str]
        Command line; ``argv[0]`` should be an absolute path.
    log_path : Path
        File receiving the child's stdout and stderr.
    env : Mapping[str, str]
        Complete environment of the child (the tag is added to it).
    cwd : Path | None
        Working directory of the child.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str],
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.tag = uuid.uuid4().hex
        inherited = env.get(TAG_ENV)
        tags = f"{inherited},{self.tag}" if inherited else self.tag
        with open(log_path, "wb") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**env, TAG_ENV: tags},
                cwd=cwd,
                start_new_session=True,
            )
        self.pid = self.popen.pid
        self._groups = {self.pid}
        # stop() may be called from a second thread (e.g. a cancelled coroutine stopping a
        # SuperLink another thread streams from): one stop at a time, the second a no-op.
        self._stop_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<ManagedProcess {self.name} pid={self.pid} rc={self.returncode}>"

    @property
    def returncode(self) -> int | None:
        """Exit status, or None while the child runs."""
        return self.popen.poll()

    def log_text(self) -> str:
        """Return the whole log written so far (undecodable bytes replaced)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        """Return the last ``lines`` lines of the log, for error messages."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _error(self, message: str) -> ProcessError:
        return ProcessError(
            f"{self.name} (pid {self.pid}) {message}\n"
            f"--- last lines of {self.log_path} ---\n{self.log_tail()}"
        )

    def wait_until(
        self,
        condition: Callable[[], bool],
        what: str,
        timeout: float,
        interval: float = 0.1,
    ) -> None:
        """Poll ``condition`` until it holds, failing fast if the child dies.

        Parameters
        ----------
        condition : Callable[[], bool]
            Health check, e.g. a port accepting connections or a log line.
        what : str
            Description of the condition for the error message ("listen on ...").
        timeout : float
            Seconds before giving up.
        interval : float
            Seconds between polls.

        Raises
        ------
        ProcessError
            If the child exits first or the timeout expires; the message carries
            the tail of the child's log, which usually names the cause.
        """
        deadline = time.monotonic() + timeout
        while not condition():
            if self.returncode is not None:
                if condition():  # done just before it exited, after the check above
                    return
                raise self._error(f"exited with status {self.returncode} before it could {what}")
            if time.monotonic() > deadline:
                raise self._error(f"did not {what} within {timeout:.0f} s")
            time.sleep(interval)

    def wait_for_port(self, port: int, host: str = "127.0.0.1", timeout: float = 30.0) -> None:
        """Wait until the child accepts TCP connections on ``host:port``.

        Raises
        ------
        ProcessError
            As :meth:`wait_until`.
        """
        self.wait_until(lambda: port_is_open(host, port), f"listen on {host}:{port}", timeout)

    def wait_for_log(self, marker: str, timeout: float = 30.0) -> None:
        """Wait until ``marker`` appears in the child's log.

        Raises
        ------
        ProcessError
            As :meth:`wait_until`.
        """
        self.wait_until(lambda: marker in self.log_text(), f"log {marker!r}", timeout)

    def wait(self, timeout: float) -> int:
        """Wait for the child itself to exit and return its status.

        Raises
        ------
        ProcessError
            If it still runs after ``timeout`` seconds.
        """
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise self._error(f"was still running after {timeout:.0f} s") from None

    def remaining(self) -> list[int]:
        """Return the pids still alive in the child's process groups or carrying its tag.

        The groups are the child's own and every group a tagged descendant was
        seen in: Ray's agents rewrite their environment area (setproctitle), so
        they lose the tag, but stay in the SuperExec's group. A group is
        forgotten once it has no members, so its number cannot be mistaken for
        an unrelated group after pid reuse. Zombies are not counted: they hold
        no resources and are reaped by their parent or by init.
        """
        processes = list(_live_processes())
        live_groups = {pgid for _, pgid in processes}
        tagged = {pgid for pid, pgid in processes if self.tag in _tags_of(pid)}
        self._groups = {g for g in self._groups if g in live_groups} | tagged
        self._groups.discard(os.getpgrp())
        me = os.getpid()
        return [pid for pid, pgid in processes if pid != me and pgid in self._groups]

    def _signal(self, signum: int, pids: Sequence[int]) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)

    def stop(self, grace: float = DEFAULT_GRACE) -> None:
        """Stop the child and every descendant; idempotent.

        SIGTERM goes to the child's process group first so Flower shuts down in
        its own order (the SuperLink terminates its SuperExec, which ends the
        ServerApp). Once the child has exited, whatever is left in a tracked
        group or carrying the tag (a simulation's Ray processes live in the
        SuperExec's own group) gets SIGTERM and at most ``STRAGGLER_GRACE``
        seconds, then SIGKILL: some Ray agents ignore SIGTERM, and waiting the
        full grace for them would only slow every shutdown down.

        Parameters
        ----------
        grace : float
            Seconds the child is allowed for a clean shutdown before killing.

        Raises
        ------
        ProcessError
            If some descendant survives SIGKILL (e.g. stuck in the kernel).
        """
        with self._stop_lock:
            self._stop(grace)

    def _stop(self, grace: float) -> None:
        if self.popen.poll() is None:
            # Unreaped, so the pid (and the group id) cannot have been reused.
            os.killpg(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=grace)
        if left := self.remaining():
            self._signal(signal.SIGTERM, left)
            deadline = time.monotonic() + min(grace, STRAGGLER_GRACE)
            while (left := self.remaining()) and time.monotonic() < deadline:
                time.sleep(0.1)
        deadline = time.monotonic() + 10.0
        while left and time.monotonic() < deadline:
            self._signal(signal.SIGKILL, left)
            time.sleep(0.1)
            left = self.remaining()
        try:
            self.popen.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            left = left or [self.pid]
        if left:
            raise ProcessError(f"{self.name}: processes {left} survived SIGKILL")


class Supervisor:
    """Owns child processes and stops all of them when its ``with`` block ends.

    Parameters
    ----------
    log_dir : Path
        Directory for the children's log files (created if missing).
    grace : float
        Seconds each child gets between SIGTERM and SIGKILL.

    Examples
    --------
    >>> with Supervisor(Path("logs")) as sup:  # doctest: +SKIP
    ...     link = sup.start("superlink", ["flower-superlink", ...], env=env)
    ...     link.wait_for_port(port)
    """

    def __init__(self, log_dir: Path, grace: float = DEFAULT_GRACE) -> None:
        self.log_dir = log_dir
        self.grace = grace
        self.processes: list[ManagedProcess] = []
        self._previous_sigterm: Callable[[int, FrameType | None], object] | int | None = None
        self._handles_signals = False

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> ManagedProcess:
        """Start a child in its own process group and register it for stopping.

        Parameters
        ----------
        name : str
            Name for errors and the log file (``<log_dir>/<name>.log``, with a
            counter appended if that name was used before, e.g. on a retry).
        argv : Sequence[str]
            Command line.
        env : Mapping[str, str] | None
            Environment; the current one if None.
        cwd : Path | None
            Working directory; the current one if None.

        Returns
        -------
        ManagedProcess
            The running child.
        """
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        counter = 1
        while log_path.exists():
            counter += 1
            log_path = self.log_dir / f"{name}-{counter}.log"
        process = ManagedProcess(
            name, argv, log_path, env=os.environ if env is None else env, cwd=cwd
        )
        self.processes.append(process)
        return process

    def remaining(self) -> list[int]:
        """Return the live pids of every process group and tag started here."""
        return sorted({pid for process in self.processes for pid in process.remaining()})

    def stop_all(self) -> None:
        """Stop every child, newest first, so clients go before their server.

        SIGINT and SIGTERM are ignored meanwhile (main thread only), so a second
        Ctrl-C cannot abort the cleanup halfway.

        Raises
        ------
        ProcessError
            If any child could not be stopped; all are still attempted.
        """
        in_main = threading.current_thread() is threading.main_thread()
        saved = {}
        if in_main:
            for signum in (signal.SIGINT, signal.SIGTERM):
                saved[signum] = signal.signal(signum, signal.SIG_IGN)
        errors = []
        try:
            for process in reversed(self.processes):
                try:
                    process.stop(self.grace)
                except ProcessError as err:
                    errors.append(str(err))
        finally:
            for signum, handler in saved.items():
                signal.signal(signum, handler)
        if errors:
            raise ProcessError("; ".join(errors))

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        del frame
        raise Terminated(signum)

    def __enter__(self) -> Supervisor:
        # Python turns SIGINT into KeyboardInterrupt already; SIGTERM would kill
        # the interpreter without unwinding, so turn it into an exception too.
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._handles_signals = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            self.stop_all()
        finally:
            if self._handles_signals:
                signal.signal(signal.SIGTERM, self._previous_sigterm)
                self._handles_signals = False

"""``make deploy-local``: the deployment path on loopback, with every process real.

Unlike ``make run`` (Flower's simulation engine), this starts what a production federation
runs: one ``flower-superlink`` with TLS, SuperNode authentication and a ``--database`` file,
and one ``flower-supernode`` per instance of the app's ``data-sources`` (the bundled series),
each authenticated by its own ECDSA P-384 key and given its instance's file in its node
config. The app is submitted with ``flwr run . deploy-local`` through a private Flower home;
the run's log is streamed, the status must be ``finished:completed`` (exit status 1
otherwise), and every process started here is stopped at the end, also on Ctrl-C, SIGTERM
and failure.

Credentials go to ``.credentials/``; the SuperLink database, Flower home and logs to
``.flwr-home/deploy-local/`` (both git-ignored), so registered keys and past runs survive.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from sigmax_fl.data import DataError, DataSource, parse_sources
from sigmax_fl.deploy.credentials import ensure_credentials
from sigmax_fl.deploy.env import EnvError, app_config, parse_pairs
from sigmax_fl.deploy.federation import RunLog, RunOutcome, run_timeout
from sigmax_fl.deploy.flwr_cli import (
    SUPERNODE_CONNECTED,
    ConfigValue,
    FlwrError,
    FlwrHome,
    start_superlink,
    start_supernode,
)
from sigmax_fl.deploy.processes import ProcessError, Supervisor
from sigmax_fl.paths import project_root
from sigmax_fl.runs import outputs_root
from sigmax_fl.settings import ConfigError, Settings

DEFAULT_ROUNDS = 3
"""Rounds unless ``--rounds`` says otherwise: SuperNodes poll every 3 s and start a fresh
ClientApp process per message, so a deployed round takes seconds where a simulated one takes
a fraction; three rounds show the federation learning without a long wait."""

CONNECTION = "deploy-local"


def _say(started: float, text: str) -> None:
    print(f"deploy-local [{time.monotonic() - started:6.1f} s] {text}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Deploy on loopback, run the app to the end, stop everything; the exit status."""
    root = project_root()
    parser = argparse.ArgumentParser(
        prog="python -m sigmax_fl.deploy.local",
        description=__doc__.split("\n\n")[1].replace("``", ""),
    )
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="num-server-rounds")
    parser.add_argument(
        "--run-config", default="", help='more run config, e.g. "local-epochs=1 seed=7"'
    )
    parser.add_argument(
        "--data-sources", default="", help="instances (default: the app's data-sources)"
    )
    parser.add_argument("--app", type=Path, default=root, help="the app folder")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="database, Flower home, logs (default: APP/.flwr-home/deploy-local)",
    )
    parser.add_argument("--credentials", type=Path, default=None, help="default: APP/.credentials")
    args = parser.parse_args(argv)
    if args.app is None:
        parser.error("no sigmax-fl checkout found: pass --app")
    app = args.app.resolve()
    state = (args.state_dir or app / ".flwr-home" / "deploy-local").resolve()
    creds_dir = (args.credentials or app / ".credentials").resolve()

    # Check everything before starting anything
    try:
        extra = parse_pairs(args.run_config, "--run-config") if args.run_config else {}
        if "num-server-rounds" in extra:
            parser.error("set the number of rounds with --rounds")
        base = app_config(app)
        settings = Settings.from_run_config({**base, **extra, "num-server-rounds": args.rounds})
        sources = parse_sources(args.data_sources or settings.data_sources, settings.data_dir)
    except (EnvError, ConfigError, DataError) as err:
        parser.error(str(err))
    run_config = {
        "min-available-nodes": len(sources),
        "min-train-nodes": len(sources),
        "outputs-dir": str(outputs_root(settings.outputs_dir)),
        **extra,
        "num-server-rounds": args.rounds,
    }

    started = time.monotonic()
    supervisor = Supervisor(state / "logs" / time.strftime("%Y%m%d-%H%M%S"), grace=5.0)
    try:
        with supervisor:
            _deploy(supervisor, app, state, creds_dir, sources, run_config, started)
    except (FlwrError, ProcessError) as err:
        print(f"deploy-local: FAILED: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("deploy-local: interrupted", file=sys.stderr)
        return 130
    finally:
        left = supervisor.remaining()
        _say(started, f"stopped; processes left running: {left or 'none'}")
    return 0


def _deploy(
    supervisor: Supervisor,
    app: Path,
    state: Path,
    creds_dir: Path,
    sources: list[DataSource],
    run_config: dict[str, ConfigValue],
    started: float,
) -> None:
    names = [s.instance_id for s in sources]
    creds = ensure_credentials(creds_dir, names)
    _say(started, f"credentials (CA, SuperLink certificate, {len(names)} node keys): {creds_dir}")

    # SuperLink: TLS, SuperNode authentication, a database that keeps runs and keys
    home = FlwrHome(state / "flwr-home")
    link = start_superlink(
        supervisor, home, state / "superlink.db", tls=creds, enable_supernode_auth=True
    )
    home.add_connection(CONNECTION, link.address, root_certificates=creds.ca_cert)
    _say(started, f"SuperLink on {link.address}: TLS, SuperNode authentication, {state}")

    # Register every instance's public key (idempotent: the database may know them)
    ids = home.register_supernodes([creds.nodes[n].public_key for n in names], CONNECTION)
    new = [i for i in ids if i is not None]
    _say(started, f"registered {len(names)} SuperNode keys ({len(new)} new)")

    # One authenticated SuperNode per instance, its own file in its node config
    nodes = [
        start_supernode(
            supervisor,
            home,
            link.address,
            {
                "data-path": s.path,
                "instance-id": s.instance_id,
                **({"venue": s.venue} if s.venue else {}),
            },
            root_certificates=creds.ca_cert,
            private_key=creds.nodes[s.instance_id].private_key,
            name=f"supernode-{s.instance_id}",
            wait_connected=False,
        )
        for s in sources
    ]
    for node in nodes:
        node.wait_for_log(SUPERNODE_CONNECTED, timeout=120)
    _say(started, f"{len(nodes)} SuperNodes connected: {', '.join(names)}")

    # Submit with `flwr run . deploy-local`, stream, require finished:completed
    run_started = time.monotonic()
    run_log = RunLog(sys.stdout)
    run_id = home.run_app(
        app,
        CONNECTION,
        run_config=run_config,
        sink=run_log,
        timeout=run_timeout(app, run_config),
    )
    final_model = RunOutcome(run_id, time.monotonic() - run_started, run_log.run_dir).final_model
    if final_model is None:
        raise FlwrError(f"run {run_id} completed but its log names no final model")
    _say(
        started,
        f"run {run_id} finished:completed: {run_config['num-server-rounds']} rounds in "
        f"{time.monotonic() - run_started:.1f} s, final model {final_model}",
    )


if __name__ == "__main__":
    sys.exit(main())

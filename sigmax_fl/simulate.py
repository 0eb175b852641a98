"""`make run`: the app in Flower's simulation engine, on a SuperLink started and stopped here.

``flwr run .`` alone leaves a detached SuperLink behind, installs the app's dependencies per run
and exits 0 when the run failed. This runner starts its own simulation SuperLink (private
``FLWR_HOME``, a free port, its own database, dependency installation off), submits the app with
one simulated SuperNode per data source and one 1-CPU Ray actor per core, Ray's start-up
trimmed (``flwr_cli.SIMULATION_RAY_ENV``), streams the log,
requires ``finished:completed``, and stops everything it started, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import tomllib
from pathlib import Path

from sigmax_fl.data import DataError, parse_sources
from sigmax_fl.deploy.flwr_cli import (
    SIMULATION_RAY_ENV,
    FlwrError,
    FlwrHome,
    simulation_federation_config,
    start_superlink,
)
from sigmax_fl.deploy.processes import ProcessError, Supervisor
from sigmax_fl.paths import project_root
from sigmax_fl.settings import ConfigError, Settings


def _parse_overrides(text: str) -> dict[str, object]:
    """``"k=v k2=v2"`` as Flower reads it: TOML values, kebab-case keys."""
    return tomllib.loads("\n".join(text.split())) if text.strip() else {}


def main(argv: list[str] | None = None) -> int:
    """Run the app in simulation; exit status 0 only for a completed run."""
    parser = argparse.ArgumentParser(prog="python -m sigmax_fl.simulate", description=__doc__)
    parser.add_argument("--run-config", default="", help='overrides, e.g. "num-server-rounds=3"')
    parser.add_argument(
        "--num-supernodes", type=int, default=0, help="default: one per data source"
    )
    parser.add_argument(
        "--actors", type=int, default=0, help="ClientApp actors side by side (default: cores)"
    )
    parser.add_argument("--app", type=Path, default=project_root(), help="the app folder")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds the run may take")
    args = parser.parse_args(argv)
    if args.actors < 0:
        parser.error(f"--actors must be 0 (one per core) or more, got {args.actors}")

    overrides = _parse_overrides(args.run_config)
    base = tomllib.loads((args.app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    try:
        settings = Settings.from_run_config({**base, **overrides})
        sources = parse_sources(settings.data_sources, settings.data_dir)
        unknown = set(settings.instance_learning_rate_map()) - {s.instance_id for s in sources}
        if unknown:
            raise ConfigError(
                f"run-config 'instance-learning-rates' names {sorted(unknown)}, which are not "
                f"instances of data-sources {sorted(s.instance_id for s in sources)}"
            )
    except (ConfigError, DataError) as err:
        # Checked before any process starts: every instance would refuse every round.
        print(f"sigmax-fl: {err}", file=sys.stderr)
        return 2
    nodes = args.num_supernodes or len(sources)

    with tempfile.TemporaryDirectory(prefix="sigmax-fl-sim-") as tmp:
        work = Path(tmp)
        try:
            with Supervisor(work / "logs") as supervisor, FlwrHome(work / "flwr-home") as home:
                link = start_superlink(
                    supervisor,
                    home,
                    work / "state.db",
                    simulation=True,
                    extra_env=SIMULATION_RAY_ENV,
                )
                home.add_connection("local-sim", link.address)
                home.run_app(
                    args.app,
                    "local-sim",
                    run_config=overrides,
                    federation_config=simulation_federation_config(nodes, args.actors or None),
                    timeout=args.timeout,
                )
        except (FlwrError, ProcessError) as err:
            print(f"sigmax-fl: run failed: {err}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

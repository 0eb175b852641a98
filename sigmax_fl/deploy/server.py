"""``python -m sigmax_fl.deploy.server`` (``sigmax-fl-server``): the SIGMAX FL server.

Configured by environment variables alone, like the original ``scripts.fl_server``: starts a
``flower-superlink`` on ``FL_SERVER`` (TLS and SuperNode authentication unless turned off
explicitly), registers the public keys in ``FL_AUTHORIZED_KEYS``, submits the sigmax-fl app
with ``FL_NUM_ROUNDS`` rounds once ``FL_MIN_CLIENTS`` instances are connected, streams the
run's log, and exits 0 only if the run ends ``finished:completed``. Exit status 2 means a
missing or malformed variable, 1 a failed run.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from sigmax_fl.deploy.env import (
    SERVER_VARIABLES,
    EnvError,
    server_options,
    server_run_config,
    start_entry_point,
)

PROG = "sigmax-fl-server"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one federation from the environment; the process's exit status."""
    start_entry_point(PROG, __doc__, SERVER_VARIABLES, argv)
    try:
        options = server_options(os.environ)
        run_config = server_run_config(os.environ, options.app_dir)
    except EnvError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2

    # Flower is imported only once the variables are known to be good.
    from sigmax_fl.deploy.federation import Server
    from sigmax_fl.deploy.flwr_cli import FlwrError
    from sigmax_fl.deploy.processes import ProcessError

    try:
        Server(options).run(run_config)
    except (FlwrError, ProcessError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

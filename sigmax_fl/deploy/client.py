"""``python -m sigmax_fl.deploy.client`` (``sigmax-fl-client``): one SIGMAX instance joins.

Configured by environment variables alone, like the original ``scripts.fl_client``: starts a
``flower-supernode`` connected to ``FL_SERVER`` whose node config carries ``instance-id`` =
``FL_CLIENT_ID`` and this instance's data (``DATA_SOURCE``). The data is read only here, by
the ClientApps this SuperNode runs; only model updates and metrics leave. Like every Flower
SuperNode it serves run after run until stopped (SIGTERM, Ctrl-C). Exit status 2 means a
missing or malformed variable, 1 a refused or failed SuperNode.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from sigmax_fl.deploy.env import (
    CLIENT_VARIABLES,
    EnvError,
    client_id,
    client_options,
    data_source,
    start_entry_point,
)

PROG = "sigmax-fl-client"


def main(argv: Sequence[str] | None = None) -> int:
    """Keep this instance's SuperNode running; the process's exit status."""
    start_entry_point(PROG, __doc__, CLIENT_VARIABLES, argv)
    try:
        name = client_id(os.environ)
        options = client_options(os.environ, name)
        data = data_source(os.environ)
    except EnvError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    node_config = {"instance-id": name, **{k: v for k, v in data.items() if v}}

    from sigmax_fl.deploy.federation import NodeRefusedError, SuperNodeRunner
    from sigmax_fl.deploy.processes import ProcessError

    try:
        status = SuperNodeRunner(options, node_config, name, sink=sys.stdout).run()
    except (NodeRefusedError, ProcessError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    if status != 0:
        print(f"{PROG}: error: the SuperNode exited with status {status}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())

"""The ``sigmax-fl`` command: one function per subcommand, registered with :func:`command`.

Adding a subcommand (doctor, deploy, attacks, ...) is one self-contained block: a function
that declares its arguments and a function that runs it, tied together by the decorator. Heavy
imports (torch, Flower) happen inside the run function, so ``sigmax-fl --help`` and light
subcommands start fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Command:
    """A subcommand: its one-line help, its arguments, and what it does (returns exit code)."""

    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def command(
    name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None]
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Register the decorated function as subcommand ``name``."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        if name in COMMANDS:
            raise ValueError(f"subcommand '{name}' is already registered")
        COMMANDS[name] = Command(help, arguments, run)
        return run

    return register


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of numbers: {text!r}"
        ) from None


# -- compare ----------------------------------------------------------------------------------


def _compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--use-case", default="multi-market", help="what to compare (default: multi-market)"
    )
    parser.add_argument(
        "--data-sources",
        help="comma-separated bundled names, paths or id=path (default: the run config's)",
    )
    parser.add_argument("--data-dir", default="", help="where bundled names and paths live")
    parser.add_argument("--rounds", type=int, help="rounds R (default: num-server-rounds)")
    parser.add_argument("--local-epochs", type=int, help="epochs per round (default: run config)")
    parser.add_argument(
        "--learning-rates",
        type=_floats,
        help="candidates, chosen on validation (default: the run config's learning-rate)",
    )
    parser.add_argument("--seeds", type=int, default=5, help="repetitions (default 5)")
    parser.add_argument(
        "--cost-bps", type=float, default=10.0, help="cost per unit of position change"
    )
    parser.add_argument("--horizon", type=int, help="bars ahead the target looks (default 1)")
    parser.add_argument(
        "--scaler",
        choices=("local", "federated"),
        default="local",
        help="feature normalisation: each instance's own training statistics, or the pooled "
        "ones of run config scaler = federated (default: local)",
    )
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples per interval")
    parser.add_argument("--workers", type=int, help="processes (default: one per core)")
    parser.add_argument("--out", help="output folder (default: outputs/compare-<use case>-<time>)")


@command("compare", "federated vs local-only vs pooled models, with baselines", _compare_arguments)
def _compare(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from sigmax_fl.compare import compare
    from sigmax_fl.settings import Settings

    settings = Settings()
    changes = {"data_dir": args.data_dir, "scaler": args.scaler}
    if args.horizon is not None:
        changes["horizon"] = args.horizon
    started = time.monotonic()
    result = compare(
        args.data_sources,
        args.rounds,
        args.out,
        args.seeds,
        use_case=args.use_case,
        local_epochs=args.local_epochs,
        learning_rates=args.learning_rates,
        cost_bps=args.cost_bps,
        n_boot=args.bootstrap,
        workers=args.workers,
        settings=replace(settings, **changes),
    )
    print(f"compare: {time.monotonic() - started:.0f}s; tables in {result['out_dir']}/compare.md")
    return 0


# -- report -----------------------------------------------------------------------------------


def _report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run folder, e.g. outputs/run-20250101-120000-1")


@command("report", "plots and report.md from a run folder", _report_arguments)
def _report(args: argparse.Namespace) -> int:
    from sigmax_fl.report import report

    print(f"report: {report(args.run_dir)}")
    return 0


# -- dp-utility -------------------------------------------------------------------------------


def _dp_utility_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-sources", help="the real federation (default: the run config's, i.e. bundled)"
    )
    parser.add_argument(
        "--synthetic",
        help="the large synthetic federation (default: 100 venues, signal 0.1, daily bars "
        "2012-2021; '' skips)",
    )
    parser.add_argument("--data-dir", default="", help="where bundled names and paths live")
    parser.add_argument(
        "--noise-multipliers",
        type=_floats,
        help="central-DP z values (default 0,0.3,1,3; 0 clips only)",
    )
    parser.add_argument("--rounds", type=int, help="real federation (default num-server-rounds)")
    parser.add_argument("--local-epochs", type=int, help="real federation (default run config)")
    parser.add_argument("--clip-norm", type=float, help="central C, real federation")
    parser.add_argument("--synthetic-rounds", type=int, help="default 6")
    parser.add_argument("--synthetic-local-epochs", type=int, help="default 1")
    parser.add_argument("--synthetic-learning-rate", type=float, help="default 0.002")
    parser.add_argument("--synthetic-clip-norm", type=float, help="central C, synthetic")
    parser.add_argument(
        "--local-dp",
        type=_floats,
        help="local-DP (DP-SGD) z values, real federation only (default 1; '' for none)",
    )
    parser.add_argument("--local-clip-norm", type=float, help="per-row bound of local DP")
    parser.add_argument("--seeds", type=int, default=2, help="repetitions (default 2)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples per interval")
    parser.add_argument("--workers", type=int, help="processes (default: one per core)")
    parser.add_argument("--out", help="output folder (default: outputs/dp-utility-<time>)")


@command(
    "dp-utility",
    "epsilon against test R^2 and IC at several DP noise levels",
    _dp_utility_arguments,
)
def _dp_utility(args: argparse.Namespace) -> int:
    import os

    # One BLAS thread per process, set before numpy loads and inherited by the workers: the
    # bootstrap's many small dot products ran ~25x slower with OpenBLAS threads on a busy box.
    unset = [k for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS") if k not in os.environ]
    os.environ.update(dict.fromkeys(unset, "1"))
    try:
        from sigmax_fl.dp_utility import dp_utility, render_markdown
        from sigmax_fl.settings import Settings

        given = {
            "synthetic_sources": args.synthetic,
            "noise_multipliers": args.noise_multipliers,
            "synthetic_rounds": args.synthetic_rounds,
            "synthetic_local_epochs": args.synthetic_local_epochs,
            "synthetic_learning_rate": args.synthetic_learning_rate,
            "local_noise": args.local_dp,
        }
        result = dp_utility(
            args.data_sources,
            out_dir=args.out,
            rounds=args.rounds,
            local_epochs=args.local_epochs,
            clip_norm=args.clip_norm,
            synthetic_clip_norm=args.synthetic_clip_norm,
            local_clip_norm=args.local_clip_norm,
            seeds=args.seeds,
            n_boot=args.bootstrap,
            workers=args.workers,
            settings=Settings(data_dir=args.data_dir),
            **{k: v for k, v in given.items() if v is not None},
        )
    finally:
        for key in unset:
            os.environ.pop(key, None)
    print(render_markdown(result))
    print(f"dp-utility: {result['seconds']['total']:.0f}s; tables in {result['out_dir']}")
    return 0


# -- doctor -----------------------------------------------------------------------------------


def _doctor_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--superlink", help="HOST:PORT the SuperNode dials (default $FL_SERVER)")
    parser.add_argument("--ca-cert", type=Path, help="CA certificate (default $FL_CA_CERT)")
    parser.add_argument(
        "--server-cert", type=Path, help="SuperLink certificate (default $FL_SERVER_CERT)"
    )
    parser.add_argument("--server-key", type=Path, help="SuperLink key (default $FL_SERVER_KEY)")
    parser.add_argument("--node-key", type=Path, help="SuperNode key (default $FL_NODE_KEY)")
    parser.add_argument("--data-source", help="the instance's data (default $DATA_SOURCE)")
    parser.add_argument("--data-dir", default="", help="where bundled names and paths live")
    parser.add_argument(
        "--run-config", default="", help="run-config overrides, e.g. \"train-end='2019-01-01'\""
    )
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds per network check")
    parser.add_argument(
        "--no-registration",
        action="store_true",
        help="skip asking the SuperLink whether the node key is registered",
    )


@command("doctor", "check address, TLS files, node key, data and memory", _doctor_arguments)
def _doctor(args: argparse.Namespace) -> int:
    import os
    import tomllib

    from sigmax_fl.doctor import FAIL, DoctorOptions, run

    options = DoctorOptions.from_env(
        os.environ,
        superlink=args.superlink,
        ca_cert=args.ca_cert,
        server_cert=args.server_cert,
        server_key=args.server_key,
        node_key=args.node_key,
        data_source=args.data_source,
        data_dir=args.data_dir,
        run_config=tomllib.loads("\n".join(args.run_config.split())),
        timeout=args.timeout,
        check_registration=not args.no_registration,
    )
    checks = run(options, emit=print)
    return 1 if any(c.status == FAIL for c in checks) else 0


# -- entry point ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per registered command."""
    parser = argparse.ArgumentParser(
        prog="sigmax-fl", description="SIGMAX federated learning tools"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        cmd.arguments(sub.add_parser(name, help=cmd.help, description=cmd.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``sigmax-fl``: user errors print one line and exit 2, not a traceback."""
    args = build_parser().parse_args(argv)
    # Our own loggers only: Flower's (and the app's "flwr.*" children) already print through
    # Flower's handler, and a root handler would print each of their lines twice.
    ours = logging.getLogger("sigmax_fl")
    if not ours.handlers:  # main() may run more than once in a process (tests)
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        ours.addHandler(handler)
    ours.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return COMMANDS[args.command].run(args)
    except (ValueError, FileNotFoundError) as err:
        if args.verbose:
            raise
        print(f"sigmax-fl {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

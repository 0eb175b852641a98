"""Shared fixtures: bundled data paths and a private feature cache per test session."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sigmax_fl import cli, compare, runs
from sigmax_fl.attacks import LoopbackGrid, run_server_app, simulated_nodes
from sigmax_fl.data import parse_sources
from sigmax_fl.dataset import Recipe
from sigmax_fl.deploy.flwr_cli import (
    FINISHED_OK,
    SIMULATION_RAY_ENV,
    FlwrHome,
    start_superlink,
)
from sigmax_fl.deploy.processes import Supervisor
from sigmax_fl.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
RUN_TIMEOUT = 600.0
"""Seconds a whole Flower run of the suite may take before it counts as hung. Alone, a run takes
a minute or less; in `make test` three workers run simulations and deployments side by side on
two cores, where a two-round deployed run took 295 s in a CI run (its first training phase
120 s) and missed the 300 s this used to be."""
DEFAULT_INSTANCES = (
    "coinbase-btc-usd-1d",
    "bitstamp-btc-usd-1d",
    "bitstamp-eth-usd-1d",
    "bitstamp-ltc-usd-1d",
)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Never read or write the user's real feature cache from a test."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SIGMAX_FL_CACHE_DIR", str(tmp_path_factory.mktemp("feature-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def simulation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlwrHome]:
    """A simulation SuperLink (connection ``sim``) with a private FLWR_HOME and database.

    Shared by the tests of one module; everything it started is stopped afterwards, and the
    fixture fails if any of those processes is left.
    """
    root = tmp_path_factory.mktemp("simulation")
    supervisor = Supervisor(root / "logs")
    with supervisor, FlwrHome(root / "flwr-home") as home:
        link = start_superlink(
            supervisor, home, root / "state.db", simulation=True, extra_env=SIMULATION_RAY_ENV
        )
        home.add_connection("sim", link.address)
        yield home
    assert supervisor.remaining() == [], "processes left behind"


def small_run(tmp_path: Path, run_name: str, instances: tuple[str, ...], **extra: object) -> dict:
    """Run config of a short run (3 rounds, 1 local epoch) on ``instances``, outputs in tmp_path."""
    return {
        "data-sources": ",".join(instances),
        "num-server-rounds": 3,
        "local-epochs": 1,
        "min-available-nodes": len(instances),
        "outputs-dir": str(tmp_path / "outputs"),
        "run-name": run_name,
        **extra,
    }


def on_instances(settings: Settings) -> Settings:
    """``settings`` as the run's instances hold them: keyed by the run's key (``runs.run_key``)
    for what they keep on disk, as the ClientApp does with the key each message carries."""
    run_dir = runs.outputs_root(settings.outputs_dir) / settings.run_name
    return replace(settings, run_name=runs.run_key(run_dir))


def in_process_run(run_config: dict, instances: int) -> dict[str, torch.Tensor]:
    """The app's ServerApp and ClientApps over Flower's message serialisation, in this process;
    the final model it wrote under ``outputs-dir`` / ``run-name``."""
    run_id = 4242
    run_server_app(LoopbackGrid(simulated_nodes(run_config, run_id, instances), run_id), run_config)
    path = Path(run_config["outputs-dir"]) / run_config["run-name"] / "final_model.pt"
    return torch.load(path, weights_only=True)


def simulate(home: FlwrHome, run_config: dict, instances: int) -> int:
    """Run the app on the ``simulation`` fixture's SuperLink, one SuperNode per instance.

    Requires the run to have completed (``flwr run`` exits 0 on a failed run) and returns its id.
    """
    run_id = home.run_app(
        ROOT,
        "sim",
        run_config=run_config,
        federation_config={"num-supernodes": instances},
        sink=io.StringIO(),
        timeout=RUN_TIMEOUT,
    )
    assert home.run_status(run_id, "sim") == FINISHED_OK
    return run_id


SMALL_COMPARE = ("--rounds", "2", "--local-epochs", "1", "--seeds", "2", "--bootstrap", "100")
"""A `sigmax-fl compare` small enough for a test: the outputs' shape, not their values."""


def run_compare(out: Path, *args: str) -> Path:
    """Run ``sigmax-fl compare ARGS`` small and in one process into ``out``; require success."""
    assert cli.main(["compare", *args, *SMALL_COMPARE, "--workers", "1", "--out", str(out)]) == 0
    return out


def small_training(rounds: int, max_weight_share: float | None = None) -> compare.Training:
    """compare's training at the default settings, one local epoch a round."""
    s = Settings()
    return compare.Training(
        rounds=rounds,
        local_epochs=1,
        batch_size=s.batch_size,
        learning_rates=(s.learning_rate,),
        optimizer=s.optimizer,
        model=s.model,
        max_weight_share=s.max_weight_share if max_weight_share is None else max_weight_share,
    )


def default_markets(instances: str) -> list[compare.Market]:
    """compare's markets for comma-separated bundled instances, with the default recipe."""
    return compare.load_markets(parse_sources(instances), Recipe.of(Settings()))

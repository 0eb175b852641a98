"""A deployment run whose SuperLink is killed mid-run and resumed ends as an unbroken one."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from sigmax_fl.deploy.flwr_cli import FINISHED_OK, FlwrHome, start_superlink, start_supernode
from sigmax_fl.deploy.processes import Supervisor

from .conftest import DATA, ROOT, RUN_TIMEOUT

pytestmark = pytest.mark.integration

NODES = {
    "coinbase-btc": (DATA / "Coinbase_BTCUSD_d.csv", "coinbase"),
    "bitstamp-eth": (DATA / "bitstamp_BTC_ETH_LTC_USD_d.csv#ETH", "bitstamp"),
}
RUN_CONFIG = {"num-server-rounds": 3, "local-epochs": 1, "min-available-nodes": 2}
GHOSTS_ALONE = 5.0
"""Seconds the resumed run's ServerApp has only the lost SuperNodes listed before the new ones
start (it loads the checkpoint and reaches its roll call well within them)."""


def start_nodes(supervisor: Supervisor, home: FlwrHome, address: str, tag: str) -> None:
    for instance, (path, venue) in NODES.items():
        start_supernode(
            supervisor,
            home,
            address,
            {"data-path": str(path), "venue": venue, "instance-id": instance},
            insecure=True,
            name=f"{tag}-{instance}",
        )


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "final_model.pt", weights_only=True)


def test_killed_superlink_resumes_to_the_same_model(tmp_path: Path) -> None:
    outputs = tmp_path / "outputs"
    config = {**RUN_CONFIG, "outputs-dir": str(outputs)}
    # The reference run has its own supervisor: stopping the broken run's processes
    # (a machine lost) must not touch it. Both federations run at the same time.
    reference, supervisor = Supervisor(tmp_path / "ref-logs"), Supervisor(tmp_path / "logs")
    with reference, supervisor, FlwrHome(tmp_path / "flwr-home") as home:
        # Reference: one unbroken run, submitted now and awaited at the end
        link = start_superlink(reference, home, tmp_path / "ref.db")
        home.add_connection("ref", link.address)
        start_nodes(reference, home, link.address, "ref")
        ref_run = home.flwr_run(ROOT, "ref", run_config={**config, "run-name": "unbroken"})

        # The same run, its SuperLink killed once round 1 is checkpointed
        database = tmp_path / "broken.db"
        link = start_superlink(supervisor, home, database)
        home.add_connection("broken", link.address)
        start_nodes(supervisor, home, link.address, "first")
        home.flwr_run(ROOT, "broken", run_config={**config, "run-name": "broken"})
        checkpoint = outputs / "broken" / "checkpoints" / "round-00001.pt"
        # As for every run in the suite: with both federations' ClientApp processes starting
        # beside the other test workers, round 1 has taken 160 s here
        deadline = time.monotonic() + RUN_TIMEOUT
        while not checkpoint.exists():
            assert time.monotonic() < deadline, "round 1 was never checkpointed"
            time.sleep(0.2)
        # A machine lost: the SuperLink and its ServerApp go first, so the ServerApp never
        # sees the SuperNodes leave (their graceful exit would fail its round 2, which it
        # would record as skipped), and the database still lists them as online.
        link.process.stop()
        supervisor.stop_all()
        assert not (outputs / "broken" / "final_model.pt").exists()

        # Restart on the same database and resume from the run folder. The database still
        # lists the lost SuperNodes as online until their heartbeats lapse: the resumed run
        # starts before the new ones connect, and must not give its first round to the ghosts.
        link = start_superlink(supervisor, home, database)
        home.add_connection("broken", link.address)
        resumed_run = home.flwr_run(
            ROOT, "broken", run_config={**config, "resume-from": str(outputs / "broken")}
        )
        deadline = time.monotonic() + 120
        while not home.run_status(resumed_run, "broken").startswith(("running", "finished")):
            assert time.monotonic() < deadline, "the resumed run never started"
            time.sleep(0.5)
        time.sleep(GHOSTS_ALONE)
        start_nodes(supervisor, home, link.address, "second")
        # The resumed run waits for the ghosts to lapse (a minute) before its rounds, and the
        # whole test once took 557 s in `make test` against 223 s alone
        assert home.wait_for_run(resumed_run, "broken", timeout=RUN_TIMEOUT) == FINISHED_OK
        assert home.wait_for_run(ref_run, "ref", timeout=RUN_TIMEOUT) == FINISHED_OK
    assert supervisor.remaining() == [] and reference.remaining() == []

    unbroken, resumed = final_weights(outputs / "unbroken"), final_weights(outputs / "broken")
    assert unbroken.keys() == resumed.keys()
    for name in unbroken:
        assert torch.equal(unbroken[name], resumed[name]), name
    history = [json.loads(line) for line in (outputs / "broken" / "history.jsonl").open()]
    assert [record["round"] for record in history] == [1, 2, 3]
    assert not any(record["skipped"] for record in history)

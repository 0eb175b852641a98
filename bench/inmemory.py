"""Flower's in-memory simulation state with registered nodes, for timing and testing the exchange.

``bench/run.py`` times one pass of Flower's engine on it and ``tests/test_exchange.py`` answers
its messages from a thread: both need the SuperLink state a simulation ServerApp's grid reads,
without Ray or a SuperLink process.
"""

from __future__ import annotations

from typing import cast

from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import (
    InMemoryLinkState,
    RunRecord,
    Task,
)
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid


def in_memory_federation(nodes: int) -> tuple[InMemoryGrid, InMemoryLinkState, list[int]]:
    """A simulation grid for run 1 over ``nodes`` registered nodes, its state and node ids."""
    factory = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    )
    run = Run.create_empty(run_id=1)
    run.primary_task_id, run.federation_id = 7, NOOP_FEDERATION_ID
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 7, 1, 1
    state = cast(InMemoryLinkState, factory.state())
    state.run_ids[1] = RunRecord(run=run)
    state.task_store[7] = Task(task_id=7, run_id=1)
    node_ids = list(_register_nodes(nodes, factory))
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return grid, state, node_ids

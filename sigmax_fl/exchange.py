"""One phase of a round on the wire: push messages, then pull the replies with an adaptive poll.

Flower's ``Grid.send_and_receive`` sleeps a fixed interval between pulls (0.1 s in simulation,
3 s in deployment), so a phase never ends sooner than that after its last reply. Here the poll
starts at a few milliseconds and grows towards :data:`MAX_INTERVAL` (in simulation
:data:`SIMULATION_MAX_INTERVAL`) while nothing arrives, so a fast phase ends within milliseconds
of its last reply. Each pull's own cost sets a floor on the next wait (:data:`COST_FACTOR`
times it): in simulation a pull scans every pending message under the
SuperLink state's lock, and polling a large federation hot would slow the very instances it
waits for. Timeout semantics are those of ``send_and_receive``: replies that arrive later are
left out, and what arrived is returned. In simulation a large phase is also fed to the engine a
window at a time (:func:`in_flight_limit`), which changes when a message is sent, never what;
when the timeout ends the phase first, the messages still waiting for the window were never sent,
and :class:`Replies` says which (and which the grid refused).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable

from flwr.app import Message
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.superlink.grid import InMemoryGrid

MIN_INTERVAL = 0.002
"""First wait between pulls, in seconds."""

MAX_INTERVAL = 0.1
"""Longest wait between pulls, in seconds, from a deployed SuperLink (whose SuperNodes fetch
their messages every 3 s)."""

SIMULATION_MAX_INTERVAL = 0.02
"""Longest wait between pulls in simulation. A simulated phase's replies come about one pass of
Flower's engine (0.1 s) after the push: a poll backed off to 0.1 s by then would leave them
waiting that long again. The pull's cost floor (``COST_FACTOR``) keeps the poll cheap in a large
federation."""

GROWTH = 1.5
"""Factor by which the wait grows after a pull that brought nothing."""

COST_FACTOR = 10.0
"""The wait is at least this many times the last pull's duration (pulls take <= ~9% of a core)."""

PASS_BUDGET = 32_000
"""Simulation: nodes x messages in flight that one pass of Flower's engine may scan."""

MIN_IN_FLIGHT = 16
"""Simulation: never fewer messages in flight than this, however many nodes there are."""


def deployed(grid: Grid) -> bool:
    """Whether ``grid`` reaches a deployed SuperLink: Flower's own grid, not simulation's."""
    return type(grid).__module__.startswith("flwr.") and not isinstance(grid, InMemoryGrid)


def push(grid: Grid, messages: list[Message]) -> dict[str, int]:
    """Push ``messages``: the ids of those the grid took -> their destination nodes.

    Both of Flower's grids set each message's id before they store it, so a message whose id
    is missing here was refused.
    """
    taken = {i for i in grid.push_messages(messages) if i}
    return {
        m.metadata.message_id: m.metadata.dst_node_id
        for m in messages
        if m.metadata.message_id in taken
    }


def from_destination(reply: Message, destinations: dict[str, int]) -> Message:
    """``reply``, booked to its message's destination node if the SuperLink wrote it.

    When a destination node's heartbeat lapses, or its reply expires, the SuperLink answers in
    its place with an error whose source node is its own (``SUPERLINK_NODE_ID``, 1). Booked as
    it comes, every such error would go to one "node-1", and the nodes it stands for would
    look silent. ``destinations``: pushed message id -> its destination node.
    """
    if reply.metadata.src_node_id == SUPERLINK_NODE_ID:
        node = destinations.get(reply.metadata.reply_to_message_id)
        if node is not None:
            reply.metadata.__dict__["_src_node_id"] = node
    return reply


def in_flight_limit(grid: Grid, num_messages: int) -> int | None:
    """How many of a phase's messages to keep in flight at once; None for all of them.

    Only Flower's in-memory simulation grid is limited. Its engine hands out messages by
    scanning, for every simulated node in turn, every message in the SuperLink state (about
    2.3 us per node and message here), then sleeping 0.1 s: a pass costs nodes x messages in
    flight, 2.3 s at 1,000 x 1,000, and it holds the state's lock and a core while the instances
    train. Keeping at most ``PASS_BUDGET / nodes`` messages in flight bounds a pass at about
    0.07 s; at 1,000 nodes that is 32 messages, about what two actors finish between passes.
    A deployed SuperLink is never limited: its SuperNodes fetch their own messages.
    """
    if not isinstance(grid, InMemoryGrid):
        return None
    nodes = max(len(list(grid.get_node_ids())), 1)
    limit = max(PASS_BUDGET // nodes, MIN_IN_FLIGHT)
    return None if limit >= num_messages else limit


class Replies(list[Message]):
    """A phase's replies, in arrival order, and the messages it never sent.

    No instance saw those, so they are neither sent bytes nor silences.
    """

    def __init__(self, replies: Iterable[Message] = ()) -> None:
        super().__init__(replies)
        self.unsent: list[Message] = []
        """Still waiting for the in-flight window when the timeout ran out."""
        self.refused: list[Message] = []
        """Pushed, but the grid did not take them (an invalid or oversized message)."""


def send_and_receive(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float | None,
) -> Replies:
    """Push ``messages`` and return the replies that arrive within ``timeout`` seconds.

    Parameters
    ----------
    grid : Grid
        The ServerApp's grid (in-memory in simulation, the Runtime API in deployment).
    messages : Iterable[Message]
        Messages to push; in simulation at most :func:`in_flight_limit` of them at a time,
        the next ones as replies come in.
    timeout : float | None
        Seconds to wait for replies; None waits for all of them. Replies that come later are
        left out; messages still queued at the deadline are never sent.

    Returns
    -------
    Replies
        Replies, in arrival order, and the messages never sent or refused.
    """
    if not type(grid).__module__.startswith("flwr."):
        # A Grid of this project's own (the in-process LoopbackGrid of `make attacks` and the
        # tests) answers at once and records what it delivers in its own send_and_receive.
        return Replies(grid.send_and_receive(messages, timeout=timeout))
    queued = deque(messages)
    limit = in_flight_limit(grid, len(queued)) or len(queued)
    longest = SIMULATION_MAX_INTERVAL if isinstance(grid, InMemoryGrid) else MAX_INTERVAL
    deadline = None if timeout is None else time.monotonic() + timeout
    pending: set[str] = set()
    destinations: dict[str, int] = {}
    replies = Replies()
    interval = MIN_INTERVAL
    while queued or pending:
        if queued and len(pending) < limit:
            batch = [queued.popleft() for _ in range(min(limit - len(pending), len(queued)))]
            sent = push(grid, batch)
            pending |= sent.keys()
            destinations.update(sent)
            replies.refused += [m for m in batch if m.metadata.message_id not in sent]
            if not pending:
                continue
        started = time.monotonic()
        got = [from_destination(m, destinations) for m in grid.pull_messages(pending)]
        cost = time.monotonic() - started
        replies += got
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if not pending and not queued:
            break
        # Replies come in bursts: poll fast again after one, back off while none come.
        interval = MIN_INTERVAL if got else min(interval * GROWTH, longest)
        wait = max(interval, COST_FACTOR * cost)
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            wait = min(wait, left)
        if got and queued:
            continue  # refill the freed slots at once
        time.sleep(wait)
    replies.unsent += queued
    return replies

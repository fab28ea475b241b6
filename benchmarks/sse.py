"""Server-Sent Events (issue 22): connect to first event, and memory per idle event stream.

The WebSocket parts' measurements and targets over ``GET /sse/sessions/{id}``: ``by_hand`` (load,
start the stream, send the snapshot event written by hand) against ``wrapped``, with
:func:`benchmarks.first_frame.connections` over ``h11`` and
:func:`benchmarks.idle_memory.held_connections` over open streams.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, ClassVar

from . import first_frame, idle_memory
from ._clients import first_event, running_servers
from ._harness import Part, Report, declared, run_alone
from ._report import Row, Table
from ._sessions import numbered_ids

SIDES = {"by_hand": "by hand", "wrapped": "wrapped"}


@dataclass(frozen=True)
class SseOptions:
    """Sequential connections for the first event, idle streams for the memory, per round."""

    QUICK: ClassVar[dict[str, Any]] = {
        "rounds": 1,
        "connections": 100,
        "block": 25,
        "warmup": 20,
        "idle": 100,
        "settle_seconds": 0.2,
    }

    rounds: int = 5
    connections: int = 2000
    block: int = 100
    warmup: int = 200
    idle: int = 1000
    concurrency: int = 50
    settle_seconds: float = 1.0
    timeout: float = 30.0


async def run_round(number: int, options: SseOptions, env: None) -> list[Row]:
    """Both measurements on the same two fresh servers."""
    idle = idle_memory.IdleMemoryOptions(
        options.rounds,
        options.idle,
        options.warmup,
        options.concurrency,
        options.settle_seconds,
        options.timeout,
    )
    async with running_servers(list(SIDES)) as servers:
        ids = numbered_ids(200)
        first = await first_frame.connections(servers, ids, options, number, first_event, "sse")
        memory = await idle_memory.held_connections(servers, idle, number, "sse")
    return [row | {"measure": "first event"} for row in first] + [
        row | {"measure": "idle memory"} for row in memory
    ]


def report(rows: list[Row], options: SseOptions, env: None) -> Report:
    """The first event and the idle memory, each with the WebSocket parts' targets."""
    pair = [("wrapped", "by_hand")]
    tables = [
        Table(
            "first_event",
            first_frame.COLUMNS,
            SIDES,
            pair,
            pair,
            where={"measure": "first event"},
            title="connect -> first event",
        ),
        idle_memory.table(
            "idle_memory", f"memory per idle stream, at {options.idle}", measure="idle memory"
        ),
    ]
    heading = [
        "22 Server-Sent Events: the middleware against the same app sending the snapshot by hand",
        f"first event: {options.connections} sequential connections per variant per round in "
        f"blocks of {options.block}, {options.warmup} warm-up each; idle memory: {options.idle} "
        f"open streams ({options.concurrency} at a time); h11 client; 20 interactions in memory",
    ]
    goals = [
        *first_frame.goals("first_event", "22 first event", ["all"]),
        idle_memory.goal("idle_memory", "22", "event stream"),
    ]
    return declared(rows, heading=heading, tables=tables, goals=goals)


PART = Part("sse", SseOptions, run_round, report)

if __name__ == "__main__":
    sys.exit(run_alone(PART))

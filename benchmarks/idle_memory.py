"""Memory per idle connection: the server's RSS growth for 1,000 open WebSockets.

Two servers side by side, ``by_hand`` and ``wrapped``; for each in turn, ``warmup`` connections
are opened and closed, ``VmRSS`` is read, ``connections`` are opened (``concurrency`` at a
time, each receiving its snapshot), and after ``settle_seconds`` of quiet ``VmRSS`` is read
again: the difference per connection.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import anyio

from ._clients import Server, open_client, open_event_stream, rotate, running_servers
from ._harness import Part, Report, declared, run_alone
from ._report import Column, Goal, Row, Table
from ._sessions import numbered_ids

SIDES = {"by_hand": "by hand", "wrapped": "wrapped"}
TARGET = 1.07  # issue 10: no worse than before the core rewrite (1.062x at 227e7af)
Close = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class IdleMemoryOptions:
    """How many connections, how many rounds."""

    QUICK: ClassVar[dict[str, Any]] = {
        "rounds": 1,
        "connections": 100,
        "warmup": 10,
        "settle_seconds": 0.2,
    }

    rounds: int = 3
    connections: int = 1000
    warmup: int = 100
    concurrency: int = 50
    settle_seconds: float = 1.0
    timeout: float = 30.0


async def open_held(
    server: Server, ids: Sequence[str], count: int, options: Any, transport: str
) -> list[Close]:
    """Open ``count`` connections, ``concurrency`` at a time, each with its session's
    snapshot (else ``ConnectionError``); return how to close each."""
    closers: list[Close] = []
    limit = anyio.Semaphore(options.concurrency)

    async def one(sid: str) -> None:
        async with limit:
            if transport == "sse":
                first, stream = await open_event_stream(server.url(sid, "sse"))
                closers.append(stream.aclose)
                text = first.text
            else:
                ws = await open_client(server.url(sid), bound=options.timeout)
                closers.append(ws.close)
                text = str(await ws.recv(decode=True))
            if f'"session_id":"{sid}"' not in text:
                raise ConnectionError(f"the first frame of {sid} is not its snapshot")

    try:
        with anyio.fail_after(options.timeout):
            async with anyio.create_task_group() as tg:
                for i in range(count):
                    tg.start_soon(one, ids[i % len(ids)])
    except BaseException:
        await close_all(closers)
        raise
    return closers


async def close_all(closers: list[Close]) -> None:
    """Close every connection, at once."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(30):
        async with anyio.create_task_group() as tg:
            for close in closers:
                tg.start_soon(close)


async def held_connections(
    servers: Mapping[str, Server], options: Any, number: int, transport: str = "websocket"
) -> list[Row]:
    """Each server's RSS growth per idle connection, one server after the other."""
    rows, ids = [], numbered_ids(200)
    for name in rotate(list(servers), number):
        process = servers[name].process
        await close_all(await open_held(servers[name], ids, options.warmup, options, transport))
        await anyio.sleep(options.settle_seconds)
        before = process.rss_bytes()
        closers = await open_held(servers[name], ids, options.connections, options, transport)
        try:
            await anyio.sleep(options.settle_seconds)
            after = process.rss_bytes()
        finally:
            await close_all(closers)
        rows.append(
            {
                "variant": name,
                "round": number,
                "samples": len(closers),
                "errors": 0,
                "rss_before_mb": before / 2**20,
                "rss_after_mb": after / 2**20,
                "kb_per_connection": (after - before) / len(closers) / 1024,
            }
        )
    return rows


async def run_round(number: int, options: IdleMemoryOptions, env: None) -> list[Row]:
    """One round on fresh servers."""
    async with running_servers(list(SIDES)) as servers:
        return await held_connections(servers, options, number)


COLUMNS = [
    Column("RSS before MB", "rss_before_mb", ".1f"),
    Column("RSS with connections MB", "rss_after_mb", ".1f"),
    Column("KB per idle connection", "kb_per_connection", ".2f"),
]


def table(name: str, title: str = "", **where: str) -> Table:
    """The idle-memory table: by hand, wrapped, their ratio and difference."""
    pair = [("wrapped", "by_hand")]
    return Table(name, COLUMNS, SIDES, pair, pair, where=where, title=title)


def goal(table: str, issue: str, what: str) -> Goal:
    """The idle-memory target: wrapped / by hand at most 1.07."""
    return Goal(
        f"{issue} idle memory per {what} wrapped / by hand",
        table,
        "kb_per_connection",
        ("wrapped", "by_hand"),
        TARGET,
    )


def report(rows: list[Row], options: IdleMemoryOptions, env: None) -> Report:
    """RSS before and after, KB per connection, wrapped / by hand and wrapped - by hand."""
    heading = [
        f"memory per idle WebSocket: server VmRSS growth for {options.connections} open "
        "connections / connections, by hand vs wrapped",
        f"each variant: {options.warmup} warm-up connections, VmRSS, {options.connections} "
        f"opened ({options.concurrency} at a time, each receives its snapshot), "
        f"{options.settle_seconds:g} s idle, VmRSS; websockets client",
    ]
    return declared(
        rows,
        heading=heading,
        tables=[table("idle_memory")],
        goals=[goal("idle_memory", "10", "WebSocket")],
    )


PART = Part("idle_memory", IdleMemoryOptions, run_round, report)

if __name__ == "__main__":
    sys.exit(run_alone(PART))

"""Connect to first frame: the middleware against the same guarantee written by hand.

Three servers side by side (:mod:`benchmarks._server`, each in its own process, fresh every
round), the same app over the same store:

- ``by_hand``, the floor: the app loads and serialises the snapshot, then accepts, then sends
  it: the middleware's guarantee (the client is connected when its state is ready), by hand;
- ``wrapped``: the app accepts and sends nothing; ``SessionSyncMiddleware`` holds the accept,
  loads, then sends both;
- ``seed``: the seed design's order, accept first, then load and send.

Once with the in-memory loader (a dict lookup: only the middleware is measured), once with the
SQLite loader (one Core ``SELECT`` with a join, the same for all three). Connections are
sequential (latency, not throughput), in blocks rotating among the servers; per connection,
the time from starting to connect to the first frame, with a ``websockets`` client. Around each
block the server's CPU seconds are read: server CPU per connection. Every frame must be its
session's snapshot, the same bytes from all three.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

from ._clients import FirstFrame, Server, first_frame, rotate, running_servers
from ._database import sqlite_file
from ._harness import Part, Report, declared, run_alone
from ._report import Column, Goal, Row, Table, percentile
from ._sessions import numbered_ids, session_id_for

__all__ = ["COLUMNS", "PART", "FirstFrameOptions", "connections"]

SIDES = {"by_hand": "by hand", "wrapped": "wrapped", "seed": "seed order"}
TARGET, ADDED_CPU_US = 1.05, 30.0  # issue 20 point 2: wrapped / by hand, and wrapped - by hand


@dataclass(frozen=True)
class FirstFrameOptions:
    """Connections per variant per round (in blocks of ``block``), loaders, sessions."""

    QUICK: ClassVar[dict[str, Any]] = {"rounds": 1, "connections": 100, "block": 25, "warmup": 20}

    rounds: int = 5
    connections: int = 2000
    block: int = 100
    warmup: int = 200
    loaders: tuple[str, ...] = ("memory", "sqlite")
    sessions: int = 200
    timeout: float = 10.0


async def connections(
    servers: Mapping[str, Server],
    ids: Sequence[str],
    options: Any,
    number: int,
    *,
    connect: Callable[..., Awaitable[FirstFrame]] = first_frame,
    transport: str = "websocket",
) -> list[Row]:
    """Warm each server up, then sequential connections in blocks rotating among them.

    Returns a row per server: p50, p90 and p99 from starting to connect to the first frame,
    p50 to the handshake, and server CPU per connection (read around each block). Failed
    connections, and first frames that are not their session's snapshot or differ between
    servers, are errors.
    """
    names = list(servers)
    totals: dict[str, list[float]] = {name: [] for name in names}
    opened: dict[str, list[float]] = {name: [] for name in names}
    cpu = dict.fromkeys(names, 0.0)
    errors: dict[str, Counter[str]] = {name: Counter() for name in names}
    frames: dict[str, str] = {}  # the first frame seen of each session: every server's must match

    async def block(name: str, start: int, count: int, record: bool) -> None:
        for i in range(start, start + count):
            sid = ids[i % len(ids)]
            try:
                got = await connect(servers[name].url(sid, transport), bound=options.timeout)
            except Exception as exc:
                errors[name][type(exc).__name__] += 1
                continue
            expected = frames.setdefault(sid, got.text)
            if got.text != expected or f'"session_id":"{sid}"' not in got.text:
                errors[name]["not the session's snapshot"] += 1
            elif record:
                totals[name].append(got.total)
                opened[name].append(got.opened)

    for name in names:
        await block(name, 0, options.warmup, record=False)
    for turn in range(options.connections // options.block):
        for name in rotate(names, turn + number):
            before = await servers[name].control.cpu()
            await block(name, turn * options.block, options.block, record=True)
            cpu[name] += await servers[name].control.cpu() - before
    return [
        {
            "variant": name,
            "round": number,
            "samples": len(totals[name]) + sum(errors[name].values()),
            "errors": sum(errors[name].values()),
            "error_kinds": dict(errors[name]),
            "p50_us": percentile(totals[name], 50) * 1e6,
            "p90_us": percentile(totals[name], 90) * 1e6,
            "p99_us": percentile(totals[name], 99) * 1e6,
            "open_p50_us": percentile(opened[name], 50) * 1e6,
            "cpu_us_per_connection": cpu[name] / max(1, len(totals[name])) * 1e6,
        }
        for name in names
    ]


COLUMNS = [
    Column("p50 us", "p50_us"),
    Column("p90 us", "p90_us"),
    Column("p99 us", "p99_us"),
    Column("p50 to handshake us", "open_p50_us"),
    Column("server CPU us/connection", "cpu_us_per_connection"),
]


def goals(table: str, what: str, groups: Sequence[str]) -> list[Goal]:
    """The first frame's targets in each group: p50 and p99 within 1.05x of the by-hand floor,
    at most 30 us of added server CPU per connection."""
    found = []
    for group in groups:
        where = "" if group == "all" else f" ({group})"
        for q in ("p50", "p99"):
            label = f"{what} {q} wrapped / by hand{where}"
            found.append(Goal(label, table, f"{q}_us", ("wrapped", "by_hand"), TARGET, group=group))
        label = f"{what}: server CPU us/connection wrapped - by hand{where}"
        found.append(
            Goal(
                label,
                table,
                "cpu_us_per_connection",
                ("wrapped", "by_hand"),
                ADDED_CPU_US,
                group=group,
                difference=True,
            )
        )
    return found


@asynccontextmanager
async def environment(options: FirstFrameOptions) -> AsyncIterator[str | None]:
    """A SQLite file of ``sessions`` chats of 20 interactions, if the SQLite loader is measured."""
    if "sqlite" not in options.loaders:
        yield None
        return
    async with sqlite_file({20: options.sessions}) as url:
        yield url


async def run_round(number: int, options: FirstFrameOptions, url: str | None) -> list[Row]:
    """Every loader in turn, on three fresh servers."""
    rows: list[Row] = []
    for loader in options.loaders:
        if loader == "memory":
            args, ids = ["--sessions", str(options.sessions)], numbered_ids(options.sessions)
        else:
            assert url is not None
            args = ["--db", str(url), "--loader", "hand"]
            ids = [session_id_for(20, n) for n in range(options.sessions)]
        async with running_servers(list(SIDES), *args) as servers:
            found = await connections(servers, ids, options, number)
        rows += [row | {"loader": loader} for row in found]
    return rows


def report(rows: list[Row], options: FirstFrameOptions, env: Any) -> Report:
    """By loader: the three variants, wrapped / by hand, wrapped / seed, wrapped - by hand."""
    table = Table(
        "first_frame",
        COLUMNS,
        SIDES,
        by=("loader",),
        ratios=[("wrapped", "by_hand"), ("wrapped", "seed")],
        differences=[("wrapped", "by_hand")],
    )
    heading = [
        "20.2 connect -> first frame: the middleware against the same guarantee by hand "
        "(load and serialise, accept, send) and the seed order (accept, then load)",
        f"{options.connections} sequential connections per variant per round in blocks of "
        f"{options.block} rotating, {options.warmup} warm-up connections each; sessions of 20 "
        "interactions (6.5 KB); websockets client; loaders: in memory (a dict lookup), SQLite "
        "(one Core SELECT with a join, the same in all three)",
    ]
    return declared(
        rows,
        heading=heading,
        tables=[table],
        goals=goals("first_frame", "20.2 first frame", options.loaders),
    )


PART = Part("first_frame", FirstFrameOptions, run_round, report, environment=environment)

if __name__ == "__main__":
    sys.exit(run_alone(PART))

"""Connect to first frame (issue 20 point 2): the middleware against its guarantee written by hand.

Three servers side by side, the same app over the same store: ``by_hand`` (load and serialise,
accept, send: the floor), ``wrapped`` (the middleware holds the accept, loads, sends both) and
``seed`` (accept first, then load), with the in-memory loader and with the SQLite one. Sequential
connections, in blocks rotating among the servers, timed from starting to connect to the first
frame by a ``websockets`` client; the server's CPU is read around each block.
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

SIDES = {"by_hand": "by hand", "wrapped": "wrapped", "seed": "seed order"}
TARGET, ADDED_CPU_US = 1.05, 30.0  # wrapped / by hand at p50 and p99; wrapped - by hand CPU


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
    connect: Callable[..., Awaitable[FirstFrame]] = first_frame,
    transport: str = "websocket",
    timed: bool = False,
) -> list[Row]:
    """Warm each server up, then sequential connections in blocks rotating among them: a row
    per server with p50, p90 and p99 to the first frame, p50 to the handshake, server CPU per
    connection, the frame's size, and (``timed``: servers run with ``--time``) p50 and p99 of
    the server's own time to the snapshot sent. A failed connection, or a first frame that is
    not its session's snapshot or differs from another server's, is an error."""
    names = list(servers)
    totals: dict[str, list[float]] = {name: [] for name in names}
    opened: dict[str, list[float]] = {name: [] for name in names}
    errors: dict[str, Counter[str]] = {name: Counter() for name in names}
    cpu = dict.fromkeys(names, 0.0)
    frames: dict[str, str] = {}  # the first frame seen of each session: every server's must match

    async def block(name: str, start: int, count: int, record: bool) -> None:
        for sid in (ids[i % len(ids)] for i in range(start, start + count)):
            try:
                got = await connect(servers[name].url(sid, transport), bound=options.timeout)
            except Exception as exc:
                errors[name][type(exc).__name__] += 1
                continue
            if (
                got.text != frames.setdefault(sid, got.text)
                or f'"session_id":"{sid}"' not in got.text
            ):
                errors[name]["not the session's snapshot"] += 1
            elif record:
                totals[name].append(got.total)
                opened[name].append(got.opened)

    for name in names:
        await block(name, 0, options.warmup, record=False)
        if timed:
            await servers[name].control.ask("timings")  # the warm-up's, dropped
    for turn in range(max(1, options.connections // options.block)):
        for name in rotate(names, turn + number):
            before = await servers[name].control.cpu()
            await block(name, turn * options.block, options.block, record=True)
            cpu[name] += await servers[name].control.cpu() - before
    server = {name: await servers[name].control.ask("timings") if timed else [] for name in names}
    return [
        {
            "variant": name,
            "round": number,
            "error_kinds": dict(errors[name]),
            "samples": len(totals[name]) + errors[name].total(),
            "errors": errors[name].total(),
            **{f"p{q}_us": percentile(totals[name], q) * 1e6 for q in (50, 90, 99)},
            "open_p50_us": percentile(opened[name], 50) * 1e6,
            "cpu_us_per_connection": cpu[name] / max(1, len(totals[name])) * 1e6,
            "frame_kb": max(map(len, frames.values()), default=0) / 1024,
            **{f"server_p{q}_us": percentile(server[name], q) * 1e6 for q in (50, 99)},
        }
        for name in names
    ]


COLUMNS = [
    *(Column(f"p{q} us", f"p{q}_us") for q in (50, 90, 99)),
    Column("p50 to handshake us", "open_p50_us"),
    Column("server CPU us/connection", "cpu_us_per_connection"),
]


def goals(table: str, what: str, groups: Sequence[str]) -> list[Goal]:
    """In each group: p50 and p99 within 1.05x of by hand, at most 30 us of added server CPU."""
    found = []
    for group in groups:
        where, pair = "" if group == "all" else f" ({group})", ("wrapped", "by_hand")
        found += [
            Goal(
                f"{what} {q} wrapped / by hand{where}", table, f"{q}_us", pair, TARGET, group=group
            )
            for q in ("p50", "p99")
        ]
        found.append(
            Goal(
                f"{what}: server CPU us/connection wrapped - by hand{where}",
                table,
                "cpu_us_per_connection",
                pair,
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
        args = ["--sessions", str(options.sessions)] if loader == "memory" else ["--db", str(url)]
        ids = [session_id_for(20, n) for n in range(options.sessions)]
        ids = numbered_ids(options.sessions) if loader == "memory" else ids
        async with running_servers(list(SIDES), *args) as servers:
            rows += [
                row | {"loader": loader} for row in await connections(servers, ids, options, number)
            ]
    return rows


def report(rows: list[Row], options: FirstFrameOptions, env: Any) -> Report:
    """By loader: the three variants, wrapped / by hand, wrapped / seed, wrapped - by hand."""
    pairs = [("wrapped", "by_hand"), ("wrapped", "seed")]
    table = Table("first_frame", COLUMNS, SIDES, pairs, pairs[:1], by=("loader",))
    heading = [
        "20.2 connect -> first frame: the middleware against the same guarantee by hand (load "
        "and serialise, accept, send) and against the seed order (accept, then load)",
        f"{options.connections} sequential connections per variant per round in blocks of "
        f"{options.block}, {options.warmup} warm-up each; sessions of 20 interactions (6.5 KB); "
        "loaders: in memory (a dict lookup), SQLite (a Core SELECT with a join, in all three)",
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

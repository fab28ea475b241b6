"""Snapshot cost (issue 20 point 1): load + serialise + send of a stored session, through the
library and by hand.

Servers side by side (:mod:`benchmarks._server` with ``--time``, the session's owner as the
connecting user, as an auth middleware would set it) over the chat database of
:mod:`benchmarks._database` on SQLite and PostgreSQL (a schema of its own, dropped afterwards),
sessions of 10, 100 and 1,000 interactions (about 240 bytes each). Every side checks the owner
and holds the accept until the snapshot is ready:

- ``by_hand``, the floor: one SQLAlchemy Core ``SELECT`` of the session outer-joined with its
  interactions, ``WHERE`` id and owner, rows into dicts, ``pydantic_core.to_json``; accept, send;
- ``library``: ``SessionSyncMiddleware`` with ``sqlalchemy_loader(engine, ...)`` at its
  defaults, around an app that accepts and sends nothing;
- ``sessionmaker``: the same on ``async_sessionmaker(engine)``, a session per load.

Each server times its own work, from the ASGI call to the snapshot sent: load + serialise +
send, the target's figure; the client times connect -> snapshot (:func:`benchmarks.first_frame.
connections`, which also checks every side sends the same bytes). Beside them, each load +
serialise alone in this process, and what a refusal costs: another user's session, a missing one.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, ClassVar

from asgi_session_sync import SessionContext
from asgi_session_sync.protocol import session_update_json

from ._clients import rotate, running_servers
from ._database import (
    OWNER,
    HandLoader,
    database,
    library_loader,
    open_engine,
    postgres_url,
    sqlite_file,
)
from ._harness import Part, Report, declared, run_alone
from ._report import Column, Goal, Row, Table, percentile
from ._server import server_args
from ._sessions import session_id_for, snapshot_json
from .first_frame import connections

DATABASES = ("sqlite", "postgresql")
SIZES = (10, 100, 1000)
"""Interactions per session, one group of sessions for each."""
SIDES = {"by_hand": "by hand", "library": "library", "sessionmaker": "library, sessionmaker"}
SERVERS = {"by_hand": ["by_hand"], "library": ["wrapped", "--loader", "library"]}
SERVERS["sessionmaker"] = ["wrapped", "--loader", "sessionmaker"]
TARGET = 1.2  # library / by hand, load + serialise + send
OTHER_USER = "mallory"


@dataclass(frozen=True)
class SnapshotCostOptions:
    """How much to measure; counts are per side per round, by session size."""

    QUICK: ClassVar[dict[str, Any]] = {"rounds": 1, "block": 2}
    QUICK |= {"connections": {10: 20, 100: 10, 1000: 4}, "loads": {10: 5, 100: 3, 1000: 2}}

    rounds: int = 3
    databases: tuple[str, ...] = DATABASES
    sides: tuple[str, ...] = tuple(SIDES)
    connections: dict[int, int] = field(default_factory=lambda: {10: 200, 100: 100, 1000: 60})
    block: int = 10
    loads: dict[int, int] = field(default_factory=lambda: {10: 200, 100: 100, 1000: 30})
    sessions_per_size: int = 5
    timeout: float = 30.0


async def timed_loads(
    url: str, schema: str | None, sides: Sequence[str], ids: Sequence[str], count: int, number: int
) -> dict[str, Row]:
    """Each side's load + serialise in this process, alternating: p50 seconds per call for the
    owner, for another user, and for an id with no session."""
    engine = open_engine(url, schema=schema, pool_size=1)
    # The other user's loads are refused on purpose: their warnings say nothing here.
    library_logger = logging.getLogger("asgi_session_sync")
    level = library_logger.level
    library_logger.setLevel(logging.ERROR)
    try:
        by_hand = HandLoader(engine)
        loaders = {s: library_loader(engine, sessionmaker=s == "sessionmaker") for s in sides[1:]}

        async def load(side: str, sid: str, user: str) -> bytes | None:
            if side == "by_hand":
                found = await by_hand.load(sid, user)
                return None if found is None else snapshot_json(sid, found)
            snapshot = await loaders[side](
                SessionContext(sid, {"type": "websocket", "path": "/"}, user)
            )
            if snapshot is None:
                return None
            owner, version = snapshot.owner, snapshot.version
            return session_update_json(sid, snapshot.session, owner=owner, version=version)

        cases = {"alone": OWNER, "other_user": OTHER_USER, "missing": OWNER}
        seconds: dict[tuple[str, str], list[float]] = {(s, c): [] for s in sides for c in cases}
        for i in range(count + 2):  # two warm-up calls each, not counted
            for side in rotate(list(sides), i + number):
                # Rotated too: whatever a 1,000-interaction load leaves to free or collect
                # would otherwise always fall on the case after it.
                for case in rotate(list(cases), i):
                    sid = "missing" if case == "missing" else ids[i % len(ids)]
                    started = time.perf_counter()
                    await load(side, sid, cases[case])
                    if i >= 2:
                        seconds[side, case].append(time.perf_counter() - started)
        return {
            side: {f"{case}_p50_us": percentile(seconds[side, case], 50) * 1e6 for case in cases}
            for side in sides
        }
    finally:
        library_logger.setLevel(level)
        await engine.dispose()


async def run_database_round(
    name: str, url: str, schema: str | None, number: int, options: SnapshotCostOptions
) -> list[Row]:
    """One round on one database: every size over fresh servers, then the loads alone."""
    rows: list[Row] = []
    where = ["--db", url, "--user", OWNER, "--time", *(["--schema", schema] if schema else [])]
    commands = {side: server_args(*SERVERS[side], *where) for side in options.sides}
    async with running_servers(commands) as servers:
        for size in SIZES:
            ids = [session_id_for(size, k) for k in range(options.sessions_per_size)]
            counts = SimpleNamespace(
                connections=options.connections[size],
                block=options.block,
                warmup=3,
                timeout=options.timeout,
            )
            connected = await connections(servers, ids, counts, number, timed=True)
            loaded = await timed_loads(url, schema, options.sides, ids, options.loads[size], number)
            group = {"database": name, "interactions": size}
            rows += [group | row | loaded[row["variant"]] for row in connected]
    return rows


@asynccontextmanager
async def databases(options: SnapshotCostOptions) -> AsyncIterator[dict[str, tuple[str, Any]]]:
    """Every database, created and seeded here and always dropped: ``{name: (url, schema)}``."""
    sizes = dict.fromkeys(SIZES, options.sessions_per_size)
    async with AsyncExitStack() as stack:
        made: dict[str, tuple[str, Any]] = {}
        for name in options.databases:
            if name == "sqlite":
                made[name] = (await stack.enter_async_context(sqlite_file(sizes)), None)
            else:
                schema = await stack.enter_async_context(database(postgres_url(), sizes))
                made[name] = (postgres_url(), schema)
        yield made


async def run_round(number: int, options: SnapshotCostOptions, env: dict[str, Any]) -> list[Row]:
    """Every database in turn."""
    rows: list[Row] = []
    for name, (url, schema) in env.items():
        rows += await run_database_round(name, url, schema, number, options)
    return rows


COLUMNS = [
    Column("load+serialise+send p50 us", "server_p50_us"),
    Column("p99 us", "server_p99_us"),
    Column("connect->snapshot p50 us", "p50_us"),
    Column("p99 us", "p99_us"),
    Column("load+serialise alone p50 us", "alone_p50_us"),
    Column("frame KB", "frame_kb", ",.1f"),
]
REFUSALS = [
    Column("owner p50 us", "alone_p50_us"),
    Column("other user p50 us", "other_user_p50_us"),
    Column("missing session p50 us", "missing_p50_us"),
]
BY = ("database", "interactions")
TABLES = [
    Table(
        "snapshot_cost",
        COLUMNS,
        SIDES,
        [("library", "by_hand"), ("sessionmaker", "by_hand")],
        by=BY,
    ),
    Table(
        "refusals",
        REFUSALS,
        SIDES,
        by=BY,
        title="in this process: a load for the owner, for another user, for no such session",
    ),
]


def report(rows: list[Row], options: SnapshotCostOptions, env: Any) -> Report:
    """Every side per database and size, library / by hand; the refusals; the targets."""
    goals = [
        Goal(
            f"20.1 snapshot {db} {size}: library / by hand, load+serialise+send p50",
            "snapshot_cost",
            "server_p50_us",
            ("library", "by_hand"),
            TARGET,
            group=f"{db}/{size}",
        )
        for db in options.databases
        for size in SIZES
    ]
    counts = ", ".join(f"{options.connections[s]} x {s}" for s in SIZES)
    heading = [
        "20.1 snapshot cost: load + serialise + send, by hand (SQLAlchemy Core, owner in the "
        "WHERE, pydantic_core.to_json) vs the library (SessionSyncMiddleware + "
        "sqlalchemy_loader(engine), owner checked)",
        f"sessions of {', '.join(map(str, SIZES))} interactions of ~240 bytes; per side per "
        f"round: {counts} sequential connections in blocks of {options.block}, rotating; "
        f"{options.rounds} round(s), each over {', '.join(options.databases)}; "
        "load+serialise+send is timed by each server from the connection's start to the "
        "snapshot sent; connect->snapshot by the client, handshake included",
    ]
    return declared(rows, heading=heading, tables=TABLES, goals=goals)


PART = Part("snapshot_cost", SnapshotCostOptions, run_round, report, environment=databases)

if __name__ == "__main__":
    sys.exit(run_alone(PART))

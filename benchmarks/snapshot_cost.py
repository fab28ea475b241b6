"""Snapshot cost: load + serialise + send of a stored session, through the library and by hand.

Two servers side by side, each in its own process (uvicorn, one worker), over the chat database
of :mod:`benchmarks._database` on SQLite (aiosqlite, a temporary file) and PostgreSQL (asyncpg,
a schema of its own, dropped afterwards), for sessions of 10, 100 and 1,000 interactions (about
240 bytes each). Both check the owner (the connecting user is the session's owner, set in the
scope as an auth middleware would) and hold the accept until the snapshot is ready:

- ``by_hand``, the floor: one SQLAlchemy Core ``SELECT`` of the session outer-joined with its
  interactions, ``WHERE`` id and owner, on a pooled connection of the engine; the rows into
  dicts by hand; the event encoded with ``pydantic_core.to_json``; then accept and send;
- ``library``: ``SessionSyncMiddleware`` with ``sqlalchemy_loader(engine, ...)`` at its
  defaults (owner checked), around an app that accepts and sends nothing;
- ``sessionmaker``: the same with ``sqlalchemy_loader(async_sessionmaker(engine), ...)``, a
  session per load (the loader's only form before it took an engine).

Both send the same bytes (checked on every connection). Per connection the server times its own
work, from the connection's start (the ASGI call) to the snapshot handed to the server: that is
load + serialise + send, the target's figure. The client times connect -> snapshot received
(with the handshake, for both). Connections are sequential, in blocks alternating between the
servers. Beside them, each load + serialise alone in this process, and what a refused load
costs: another user's session against a missing one (the owner is checked in the query, so
neither reads the interactions).

``python -m benchmarks.snapshot_cost serve --side S --db URL [--schema NAME]`` is one server;
it lives here, not in :mod:`benchmarks._server`, until the shared server checks owners.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import anyio
import pydantic_core
from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from asgi_session_sync import SessionContext, SessionSyncMiddleware
from asgi_session_sync._types import Receive, Scope, Send
from asgi_session_sync.loaders.sqlalchemy import SQLAlchemyLoader, sqlalchemy_loader
from asgi_session_sync.protocol import session_update_json

from ._clients import Server, first_frame, rotate, running_servers
from ._database import OWNER, ChatSession, Interaction, database, open_engine, postgres_url
from ._harness import Part, Report, declared, run_alone
from ._report import Column, Goal, Row, Table, percentile, ratio
from ._server import CONTROL_PATH, PREFIX, serve_app
from ._sessions import session_id_for

__all__ = ["PART", "SnapshotCostOptions"]

DATABASES = ("sqlite", "postgresql")
SIZES = (10, 100, 1000)
"""Interactions per session, one group of sessions for each."""
SIDES = {"by_hand": "by hand", "library": "library", "sessionmaker": "library, sessionmaker"}
TARGET = 1.2  # issue 20 point 1: library / by hand, load + serialise + send
OTHER_USER = "mallory"


@dataclass(frozen=True)
class SnapshotCostOptions:
    """How much to measure; counts are per side per round, by session size."""

    QUICK: ClassVar[dict[str, Any]] = {
        "rounds": 1,
        "connections": {10: 20, 100: 10, 1000: 4},
        "block": 2,
        "loads": {10: 5, 100: 3, 1000: 2},
    }

    rounds: int = 3
    databases: tuple[str, ...] = DATABASES
    sides: tuple[str, ...] = tuple(SIDES)
    connections: dict[int, int] = field(default_factory=lambda: {10: 200, 100: 100, 1000: 60})
    block: int = 10
    loads: dict[int, int] = field(default_factory=lambda: {10: 200, 100: 100, 1000: 30})
    sessions_per_size: int = 5
    timeout: float = 30.0


# Both sides' loads.

_sessions, _interactions = ChatSession.__table__.c, Interaction.__table__.c
BY_HAND = (
    select(
        _sessions.id,
        _sessions.owner_id,
        _sessions.title,
        _sessions.version,
        _interactions.id,
        _interactions.session_id,
        _interactions.position,
        _interactions.role,
        _interactions.content,
        _interactions.created_at,
    )
    .select_from(
        ChatSession.__table__.outerjoin(
            Interaction.__table__, _interactions.session_id == _sessions.id
        )
    )
    .where(_sessions.id == bindparam("session_id"), _sessions.owner_id == bindparam("owner"))
    .order_by(_interactions.position)
)
"""What an app writes by hand: the session and its interactions, if the user owns it."""


async def frame_by_hand(engine: AsyncEngine, session_id: str, user: str) -> bytes | None:
    """The snapshot event of ``session_id`` for ``user``, loaded and encoded by hand."""
    async with engine.connect() as conn:
        rows = (await conn.execute(BY_HAND, {"session_id": session_id, "owner": user})).all()
    if not rows:
        return None
    sid, owner, title, version = rows[0][:4]
    session = {
        "id": sid,
        "owner_id": owner,
        "title": title,
        "version": version,
        "interactions": [
            {
                "id": row[4],
                "session_id": row[5],
                "position": row[6],
                "role": row[7],
                "content": row[8],
                "created_at": row[9],
            }
            for row in rows
            if row[4] is not None
        ],
    }
    event = {
        "type": "session_update",
        "session_id": session_id,
        "version": version,
        "owner": owner,
        "session": session,
    }
    return pydantic_core.to_json(event)


def library_loader(engine: AsyncEngine, side: str = "library") -> SQLAlchemyLoader:
    """The library's loader over the chat tables, at its defaults (the owner is checked), on
    the engine, or on a sessionmaker for the ``sessionmaker`` side."""
    return sqlalchemy_loader(
        engine if side == "library" else async_sessionmaker(engine),
        ChatSession,
        interactions=ChatSession.interactions,
        owner=ChatSession.owner_id,
        version=ChatSession.version,
    )


async def frame_by_library(loader: SQLAlchemyLoader, session_id: str, user: str) -> bytes | None:
    """The snapshot event as the middleware builds it: the loader, then its encoding."""
    snapshot = await loader(SessionContext(session_id, {"type": "websocket", "path": "/"}, user))
    if snapshot is None:
        return None
    return session_update_json(
        session_id, snapshot.session, owner=snapshot.owner, version=snapshot.version
    )


# The server of one side.


class SnapshotServer:
    """One side's ASGI app: session sockets, each timed, and the control socket.

    A session socket's time runs from the ASGI call to the snapshot's ``websocket.send``
    returning; ``/control`` answers ``timings`` (a JSON list of seconds, then cleared) and
    ``cpu``.
    """

    def __init__(self, side: str, engine: AsyncEngine) -> None:
        self.engine = engine
        self.seconds: list[float] = []
        self.sessions: Callable[[Scope, Receive, Send], Awaitable[None]]
        if side != "by_hand":
            paths = [PREFIX + "{session_id}"]
            loader = library_loader(engine, side)
            self.sessions = SessionSyncMiddleware(accept_and_wait, loader=loader, paths=paths)
        else:
            self.sessions = self.by_hand

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve a session socket (as its owner) or the control socket."""
        if scope["type"] != "websocket":
            return
        if scope["path"] == CONTROL_PATH:
            await self.control(receive, send)
            return
        started = time.perf_counter()

        async def send_timed(message: Any) -> None:
            await send(message)
            if message["type"] == "websocket.send":  # the only frame sent: the snapshot
                self.seconds.append(time.perf_counter() - started)

        await self.sessions({**scope, "user": OWNER}, receive, send_timed)

    async def by_hand(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Load and serialise, accept, send: the middleware's guarantee, by hand."""
        if (await receive())["type"] != "websocket.connect":
            return
        frame = await frame_by_hand(self.engine, scope["path"][len(PREFIX) :], scope["user"])
        await send({"type": "websocket.accept"})
        if frame is not None:
            await send({"type": "websocket.send", "text": frame.decode()})
        await wait_for_disconnect(receive)

    async def control(self, receive: Receive, send: Send) -> None:
        """Answer ``timings`` and ``cpu``, one message each."""
        await receive()
        await send({"type": "websocket.accept"})
        while (message := await receive())["type"] == "websocket.receive":
            if message.get("text") == "timings":
                answer, self.seconds = json.dumps(self.seconds), []
            elif message.get("text") == "cpu":
                answer = repr(time.process_time())
            else:
                answer = f"failed: unknown request {message.get('text')!r}"
            await send({"type": "websocket.send", "text": answer})


async def accept_and_wait(scope: Scope, receive: Receive, send: Send) -> None:
    """The library side's app: accept, send nothing (the middleware sends the snapshot)."""
    if (await receive())["type"] == "websocket.connect":
        await send({"type": "websocket.accept"})
        await wait_for_disconnect(receive)


async def wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "websocket.disconnect":
        pass


def serve(argv: Sequence[str]) -> int:
    """``serve --side S --db URL [--schema NAME]``: one side's server, until stdin closes."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.snapshot_cost serve")
    parser.add_argument("--side", choices=list(SIDES), required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--schema")
    args = parser.parse_args(argv)

    async def run() -> None:
        engine = open_engine(args.db, schema=args.schema)
        try:
            await serve_app(SnapshotServer(args.side, engine), watch_stdin=True)
        finally:
            await engine.dispose()

    anyio.run(run)
    return 0


# The load generator.


async def timed_connections(
    servers: dict[str, Server], ids: Sequence[str], size: int, options: Any, number: int
) -> dict[str, Row]:
    """Warm-up, then blocks of sequential connections alternating between the servers.

    Returns each side's figures: the server's time to the snapshot sent, the client's connect
    -> snapshot. A failed connection, or a frame other than the by-hand one, is an error.
    """
    totals: dict[str, list[float]] = {side: [] for side in servers}
    errors: dict[str, Counter[str]] = {side: Counter() for side in servers}
    frames: dict[str, str] = {}  # the first frame of each session: every frame must be it

    async def block(side: str, count: int, sid: str) -> None:
        for _ in range(count):
            try:
                got = await first_frame(servers[side].url(sid), bound=options.timeout)
            except Exception as exc:
                errors[side][type(exc).__name__] += 1
                continue
            if got.text != frames.setdefault(sid, got.text) or f'"id":"{sid}"' not in got.text:
                errors[side]["not the session's snapshot"] += 1
            else:
                totals[side].append(got.total)

    for side in servers:  # statements compiled, pool connections open
        await block(side, 3, ids[0])
    for side in servers:
        await server_timings(servers[side])  # the warm-up's, dropped
    for turn in range(max(1, options.connections[size] // options.block)):
        for side in rotate(list(servers), turn + number):
            await block(side, options.block, ids[turn % len(ids)])
    found = {}
    for side in servers:
        seconds = await server_timings(servers[side])
        found[side] = {
            "samples": len(totals[side]) + sum(errors[side].values()),
            "errors": sum(errors[side].values()),
            "error_kinds": dict(errors[side]),
            "server_p50_us": percentile(seconds, 50) * 1e6,
            "server_p99_us": percentile(seconds, 99) * 1e6,
            "connect_p50_us": percentile(totals[side], 50) * 1e6,
            "connect_p99_us": percentile(totals[side], 99) * 1e6,
            "frame_kb": max((len(f) for f in frames.values()), default=0) / 1024,
        }
    return found


async def server_timings(server: Server) -> list[float]:
    """The seconds each session socket took on ``server`` since last asked (its ``timings``)."""
    await server.control.ws.send("timings")
    seconds: list[float] = json.loads(await server.control.ws.recv(decode=True))
    return seconds


async def timed_loads(
    url: str, schema: str | None, sides: Sequence[str], ids: Sequence[str], count: int, number: int
) -> dict[str, Row]:
    """Each side's load + serialise in this process, alternating; and its refusals.

    Seconds per call for the owner, for another user, and for an id with no session.
    """
    engine = open_engine(url, schema=schema, pool_size=1)
    # The other user's loads are refused on purpose: their warnings say nothing here.
    library_logger = logging.getLogger("asgi_session_sync")
    level = library_logger.level
    library_logger.setLevel(logging.ERROR)
    try:
        loaders = {side: library_loader(engine, side) for side in sides if side != "by_hand"}

        async def load(side: str, sid: str, user: str) -> bytes | None:
            if side == "by_hand":
                return await frame_by_hand(engine, sid, user)
            return await frame_by_library(loaders[side], sid, user)

        cases = {"alone": OWNER, "other_user": OTHER_USER, "missing": OWNER}
        seconds: dict[tuple[str, str], list[float]] = {(s, c): [] for s in sides for c in cases}
        for i in range(count + 2):  # two warm-up calls each, not counted
            for side in rotate(list(sides), i + number):
                # Rotated too: whatever a 1,000-interaction load leaves to free or collect
                # would otherwise always fall on the case after it.
                for case in rotate(list(cases), i):
                    user = cases[case]
                    sid = "missing" if case == "missing" else ids[i % len(ids)]
                    started = time.perf_counter()
                    await load(side, sid, user)
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
    """One round on one database: every size over two fresh servers, then the loads alone."""
    rows: list[Row] = []
    where = ["--db", url] + (["--schema", schema] if schema else [])
    sides = options.sides
    commands = {s: ["benchmarks.snapshot_cost", "serve", "--side", s, *where] for s in sides}
    async with running_servers(commands) as servers:
        for size in SIZES:
            ids = [session_id_for(size, k) for k in range(options.sessions_per_size)]
            connected = await timed_connections(servers, ids, size, options, number)
            loaded = await timed_loads(url, schema, sides, ids, options.loads[size], number)
            for side in sides:
                group = {"database": name, "interactions": size, "variant": side}
                rows.append(group | {"round": number} | connected[side] | loaded[side])
    return rows


@asynccontextmanager
async def databases(options: SnapshotCostOptions) -> AsyncIterator[dict[str, tuple[str, Any]]]:
    """Every database, created and seeded here and always dropped: ``{name: (url, schema)}``."""
    sizes = dict.fromkeys(SIZES, options.sessions_per_size)
    async with AsyncExitStack() as stack:
        made = {}
        for name in options.databases:
            if name == "sqlite":
                folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="snapshot-cost-"))
                url = f"sqlite+aiosqlite:///{folder}/chat.sqlite3"
            else:
                url = postgres_url()
            made[name] = (url, await stack.enter_async_context(database(url, sizes)))
        yield made


async def run_round(
    number: int, options: SnapshotCostOptions, env: dict[str, tuple[str, Any]]
) -> list[Row]:
    """Every database in turn."""
    rows: list[Row] = []
    for name, (url, schema) in env.items():
        rows += await run_database_round(name, url, schema, number, options)
    return rows


# The report.

TABLES = [
    Table(
        "snapshot_cost",
        [
            Column("load+serialise+send p50 us", "server_p50_us"),
            Column("p99 us", "server_p99_us"),
            Column("connect->snapshot p50 us", "connect_p50_us"),
            Column("p99 us", "connect_p99_us"),
            Column("load+serialise alone p50 us", "alone_p50_us"),
            Column("frame KB", "frame_kb", ",.1f"),
        ],
        SIDES,
        ratios=[("library", "by_hand"), ("sessionmaker", "by_hand")],
        by=("database", "interactions"),
    ),
    Table(
        "refusals",
        [
            Column("owner p50 us", "alone_p50_us"),
            Column("other user p50 us", "other_user_p50_us"),
            Column("missing session p50 us", "missing_p50_us"),
        ],
        SIDES,
        by=("database", "interactions"),
        title="in this process: a load for the owner, for another user, for no such session",
    ),
]


def goals(options: SnapshotCostOptions) -> list[Goal]:
    """Library / by hand, load + serialise + send p50, at most 1.2 in every group."""
    return [
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


def progress(rows: list[Row]) -> str:
    """Each library side / by hand, load + serialise + send p50, per database and size."""
    p50 = {(r["database"], r["interactions"], r["variant"]): r["server_p50_us"] for r in rows}
    return ", ".join(
        f"{db} {size} {side}: {ratio(p50[db, size, side], p50[db, size, 'by_hand']):.2f}x"
        for db, size, side in p50
        if side != "by_hand"
    )


def report(rows: list[Row], options: SnapshotCostOptions, env: Any) -> Report:
    """Both sides per database and size, library / by hand; the refusals."""
    counts = ", ".join(f"{options.connections[s]} x {s}" for s in SIZES)
    heading = [
        "20.1 snapshot cost: load + serialise + send, by hand (SQLAlchemy Core, owner in the "
        "WHERE, pydantic_core.to_json) vs the library (SessionSyncMiddleware + "
        "sqlalchemy_loader(engine), owner checked)",
        f"sessions of {', '.join(map(str, SIZES))} interactions of ~240 bytes; per side per "
        f"round: {counts} sequential connections in blocks of {options.block}, alternating; "
        f"{options.rounds} round(s), each over {', '.join(options.databases)}; "
        "load+serialise+send is timed by each server from the connection's start to the "
        "snapshot sent; connect->snapshot by the client, handshake included",
    ]
    return declared(rows, heading=heading, tables=TABLES, goals=goals(options))


PART = Part(
    "snapshot_cost", SnapshotCostOptions, run_round, report, progress, environment=databases
)

if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        sys.exit(serve(sys.argv[2:]))
    sys.exit(run_alone(PART))

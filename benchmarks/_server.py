"""The benchmark's server side: a SQLite database, a loader that queries it, a uvicorn server.

Run by ``python -m benchmarks.mass_reconnect serve`` in its own process; the load generator
never imports uvicorn's serving path, only the schema and the loader (to time one query).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
from sqlalchemy import (
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    create_engine,
    insert,
    select,
)
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from asgi_session_sync import SessionContext, SessionSyncMiddleware, Snapshot
from asgi_session_sync._types import Receive, Scope, Send

from ._serving import serve_app

__all__ = [
    "ServerOptions",
    "SessionStore",
    "seed_database",
    "serve",
    "session_ids",
]

WS_PATH = "/ws/sessions/{session_id}"

metadata = MetaData()

sessions = Table(
    "sessions",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("owner", String(64), nullable=False),
    Column("title", String(200), nullable=False),
    Column("version", Integer, nullable=False),
)

interactions = Table(
    "interactions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("session_id", String(64), ForeignKey("sessions.id"), nullable=False),
    Column("position", Integer, nullable=False),
    Column("role", String(16), nullable=False),
    Column("content", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_interactions_session_position", "session_id", "position"),
)

# One statement per load: the session row joined with its interactions, in order.
LOAD_SESSION = (
    select(
        sessions.c.owner,
        sessions.c.title,
        sessions.c.version,
        interactions.c.position,
        interactions.c.role,
        interactions.c.content,
        interactions.c.created_at,
    )
    .select_from(sessions.outerjoin(interactions, interactions.c.session_id == sessions.c.id))
    .where(sessions.c.id == bindparam("session_id"))
    .order_by(interactions.c.position)
)


def session_ids(count: int) -> list[str]:
    """The ids of the seeded sessions: ``s0000``, ``s0001``, ..."""
    return [f"s{i:04d}" for i in range(count)]


def seed_database(path: str, *, sessions_count: int, interactions_per_session: int) -> None:
    """Create the schema in a new SQLite file and fill it with sessions and their interactions."""
    engine = create_engine(f"sqlite:///{path}")
    started = datetime(2025, 1, 1, tzinfo=timezone.utc)
    # About 240 bytes per message: a snapshot is ~6.5 KB of JSON, like a short chat.
    filler = "lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 4
    try:
        metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(
                insert(sessions),
                [
                    {"id": sid, "owner": f"user{i % 50}", "title": f"Session {sid}", "version": 1}
                    for i, sid in enumerate(session_ids(sessions_count))
                ],
            )
            conn.execute(
                insert(interactions),
                [
                    {
                        "session_id": sid,
                        "position": n,
                        "role": "user" if n % 2 == 0 else "assistant",
                        "content": f"{sid} #{n}: {filler}",
                        "created_at": started + timedelta(seconds=n),
                    }
                    for sid in session_ids(sessions_count)
                    for n in range(interactions_per_session)
                ],
            )
    finally:
        engine.dispose()


def open_engine(path: str, *, pool_size: int) -> AsyncEngine:
    """An aiosqlite engine with a fixed pool of ``pool_size`` connections and no overflow."""
    return create_async_engine(
        f"sqlite+aiosqlite:///{path}", pool_size=pool_size, max_overflow=0, pool_timeout=30
    )


class SessionStore:
    """The loader: one query per call, after a simulated round trip to a remote database.

    ``latency`` seconds are slept while holding the pooled connection, as a query to a database
    across the network holds its connection for the round trip. ``calls`` counts loader calls
    independently of the middleware's own counters.
    """

    def __init__(self, engine: AsyncEngine, *, latency: float) -> None:
        self.engine = engine
        self.latency = latency
        self.calls = 0

    async def load(self, ctx: SessionContext) -> Snapshot | None:
        """Load the session ``ctx.session_id`` with its interactions; ``None`` if unknown."""
        self.calls += 1
        async with self.engine.connect() as conn:
            if self.latency:
                await anyio.sleep(self.latency)
            rows = (await conn.execute(LOAD_SESSION, {"session_id": ctx.session_id})).all()
        if not rows:
            return None
        first = rows[0]
        session = {
            "id": ctx.session_id,
            "title": first.title,
            "interactions": [
                {
                    "position": row.position,
                    "role": row.role,
                    "content": row.content,
                    "created_at": row.created_at.isoformat(),
                }
                for row in rows
                if row.position is not None
            ],
        }
        return Snapshot(session, owner=first.owner, version=first.version)

    async def warm_up(self, connections: int) -> None:
        """Open ``connections`` pooled connections at once, so no round starts with a cold pool."""

        async def hold(ready: anyio.Event, release: anyio.Event, count: list[int]) -> None:
            async with self.engine.connect():
                count[0] += 1
                if count[0] == connections:
                    ready.set()
                await release.wait()

        ready, release, count = anyio.Event(), anyio.Event(), [0]
        async with anyio.create_task_group() as tg:
            for _ in range(connections):
                tg.start_soon(hold, ready, release, count)
            await ready.wait()
            release.set()


class BenchmarkApp:
    """The app behind the middleware: WebSockets accept and idle; ``GET /stats`` reports.

    ``/stats`` returns the middleware's counters, the loader's own call count, and the CPU
    seconds this process used since it started accepting connections.
    """

    def __init__(self, store: SessionStore) -> None:
        self.store = store
        self.middleware: SessionSyncMiddleware | None = None
        self.cpu_started = time.process_time()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self.websocket(receive, send)
        elif scope["type"] == "http":
            await self.http(scope, send)

    async def websocket(self, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})  # the middleware sends the snapshot here
        while (await receive())["type"] != "websocket.disconnect":
            pass

    async def http(self, scope: Scope, send: Send) -> None:
        if scope["path"] != "/stats" or self.middleware is None:
            await respond(send, 404, {"error": "not found"})
            return
        await respond(
            send,
            200,
            {
                "middleware": self.middleware.stats.as_dict(),
                "loader_calls": self.store.calls,
                "cpu_seconds": time.process_time() - self.cpu_started,
            },
        )


async def respond(send: Send, status: int, payload: dict[str, Any]) -> None:
    """Send one JSON HTTP response."""
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


@dataclass(frozen=True)
class ServerOptions:
    """How ``serve`` runs: the database, the variant under test and the loader's cost."""

    db: str
    single_flight: bool
    latency: float
    pool_size: int
    max_concurrent_loads: int
    port: int = 0
    watch_stdin: bool = False


async def serve(options: ServerOptions) -> None:
    """Serve until SIGTERM/SIGINT; announce the port on stdout once accepting connections.

    See :func:`benchmarks._serving.serve_app`. With ``options.watch_stdin``, also stops when
    stdin reaches end of file: the parent holds the other end of that pipe, so a parent killed
    before it could stop this server does not leave it running.
    """
    engine = open_engine(options.db, pool_size=options.pool_size)
    try:
        store = SessionStore(engine, latency=options.latency)
        await store.warm_up(options.pool_size)
        app = BenchmarkApp(store)
        middleware = SessionSyncMiddleware(
            app,
            loader=store.load,
            paths=[WS_PATH],
            single_flight=options.single_flight,
            max_concurrent_loads=options.max_concurrent_loads,
        )
        app.middleware = middleware

        def count_from_now() -> None:
            app.cpu_started = time.process_time()  # count the rounds' work, not the start-up

        await serve_app(
            middleware,
            port=options.port,
            watch_stdin=options.watch_stdin,
            on_started=count_from_now,
        )
    finally:
        await engine.dispose()


def time_query(path: str, session_id: str, *, repeats: int) -> float:
    """Mean seconds of one load with no simulated latency, measured sequentially."""

    async def measure() -> float:
        engine = open_engine(path, pool_size=1)
        try:
            store = SessionStore(engine, latency=0.0)
            ctx = SessionContext(session_id, {"type": "websocket", "path": "/"})
            await store.load(ctx)  # compile the statement and open the connection once
            started = time.perf_counter()
            for _ in range(repeats):
                await store.load(ctx)
            return (time.perf_counter() - started) / repeats
        finally:
            await engine.dispose()

    return anyio.run(measure)

"""Load: many WebSockets through uvicorn with the full stack, then connect/disconnect churn.

The full stack: SessionSync with the SQLAlchemy loader (SQLite) accepting each socket, the NATS
bridge on a real nats-server, a Starlette app forwarding updates, served by uvicorn in a thread
of this process. After both phases, the server's asyncio tasks, NATS subscriptions and
checked-out DB connections are back where they started, RSS grew less than a stated bound, and
every client received every update it was owed.

Sizes: ``SSS_LOAD_CONNECTIONS`` (default 200) and ``SSS_LOAD_CYCLES`` (default 1000) keep the
CI run short; the full run is ``SSS_LOAD_CONNECTIONS=1000 SSS_LOAD_CYCLES=10000 pytest
tests/e2e/test_load.py -s``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import resource
import socket
import threading
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
from sqlalchemy import ForeignKey, String, Text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect

from asgi_session_sync import SessionSync
from asgi_session_sync.loaders.sqlalchemy import sqlalchemy_loader
from asgi_session_sync.nats import EmbeddedNats, NatsBridge

from .conftest import ThreadedServer

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

CONNECTIONS = int(os.environ.get("SSS_LOAD_CONNECTIONS", "200"))
CYCLES = int(os.environ.get("SSS_LOAD_CYCLES", "1000"))
SESSIONS = max(1, CONNECTIONS // 10)
UPDATES = 5
# Memory bounds over the churn, in three quarters. The first warms allocator caches, which grow
# RSS by tens of MB before they plateau (client and server share this process). The second is
# measured in RSS. The last half is traced with tracemalloc (whose own bookkeeping would swamp
# RSS), counting Python objects made and still alive: 1 kB a cycle fails the full run.
RSS_BOUND_MB = 16
TRACED_BOUND_MB = 4
WAIT = 60.0


@pytest.fixture
def anyio_backend() -> str:
    # nats-py, SQLAlchemy's asyncio extension and the websockets client need asyncio.
    return "asyncio"


class Base(DeclarativeBase):
    pass


class ChatSession(Base):
    __tablename__ = "chat_session"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner_id: Mapped[str] = mapped_column(String(64))
    version: Mapped[int]
    interactions: Mapped[list[Interaction]] = relationship(order_by="Interaction.position")


class Interaction(Base):
    __tablename__ = "interaction"
    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("chat_session.id"))
    position: Mapped[int]
    text: Mapped[str] = mapped_column(Text)


@dataclass
class Stack:
    engine: AsyncEngine
    bridge: NatsBridge


def build_app(db_url: str, nats_url: str) -> Any:
    stack: dict[str, Stack] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine = create_async_engine(db_url, pool_size=10, max_overflow=0)
        async with NatsBridge(nats_url, reconnect_time_wait=0.1) as bridge:
            stack["s"] = Stack(engine, bridge)
            loader.sessionmaker = async_sessionmaker(engine, expire_on_commit=False)
            yield
        await engine.dispose()

    async def session_socket(websocket: WebSocket) -> None:
        bridge = stack["s"].bridge
        session_id = websocket.path_params["session_id"]
        async with bridge.subscribe(session_id) as updates:
            socket = await sync.accept(websocket.scope, websocket.send, session_id)
            # No heartbeat: the clients count the frames they are sent.
            await updates.forward(socket, websocket.receive)

    async def health(request: Request) -> JSONResponse:
        s = stack["s"]
        return JSONResponse(
            {
                "tasks": len(asyncio.all_tasks()),
                # The hub's sessions, each one NATS subscription, and nats-py's own count.
                "hub_sessions": s.bridge.hub.sessions,
                "nats_subscriptions": len(s.bridge.client._subs),
                "db_checked_out": s.engine.pool.checkedout(),  # type: ignore[attr-defined]
                "rss_kb": rss_kb(),
                "stats": sync.stats.as_dict(),
                "bridge": s.bridge.stats.as_dict(),
            }
        )

    loader = LazyLoader()
    sync = SessionSync(loader, authenticate=token_user)
    return Starlette(
        routes=[
            Route("/health", health),
            WebSocketRoute("/ws/sessions/{session_id}", session_socket),
        ],
        lifespan=lifespan,
    )


class LazyLoader:
    """The SQLAlchemy loader, made once the lifespan has an engine."""

    sessionmaker: Any = None

    def __init__(self) -> None:
        self._loader: Any = None

    async def __call__(self, ctx: Any) -> Any:
        if self._loader is None:
            self._loader = sqlalchemy_loader(
                self.sessionmaker,
                ChatSession,
                interactions=ChatSession.interactions,
                owner=ChatSession.owner_id,
                version=ChatSession.version,
            )
        return await self._loader(ctx)


async def token_user(scope: Any) -> str | None:
    query = scope.get("query_string", b"").decode()
    return query.removeprefix("token=") or None


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.fixture
def nofile() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def seed(db_url: str) -> None:
    engine = create_async_engine(db_url)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    async with async_sessionmaker(engine)() as session:
        for n in range(SESSIONS):
            session.add(ChatSession(id=f"s{n}", owner_id="alice", version=0))
            session.add(Interaction(session_id=f"s{n}", position=0, text="hello"))
        await session.commit()
    await engine.dispose()


@asynccontextmanager
async def uvicorn_thread(app: Any) -> AsyncIterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        lifespan="on",
        log_config=None,
        log_level="warning",
        backlog=4096,
        timeout_graceful_shutdown=5,
    )
    server = ThreadedServer(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert await anyio.to_thread.run_sync(server.startup_done.wait, 30)
        assert server.started
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await anyio.to_thread.run_sync(thread.join, 30)
        sock.close()
    assert not thread.is_alive()


async def server_health(http: httpx.AsyncClient) -> dict[str, Any]:
    response = await http.get("/health")
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


async def settled(http: httpx.AsyncClient, baseline: dict[str, Any]) -> dict[str, Any]:
    """The server's health once its connections have wound down (bounded wait)."""
    with anyio.fail_after(WAIT):
        while True:
            health = await server_health(http)
            if (
                health["nats_subscriptions"] <= baseline["nats_subscriptions"]
                and health["hub_sessions"] == 0
                and health["db_checked_out"] == 0
                and health["tasks"] <= baseline["tasks"]
            ):
                return health
            await anyio.sleep(0.05)  # polling another thread's state: no event crosses over


async def test_load_then_churn_leaves_nothing_behind(tmp_path: Path, nofile: None) -> None:
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'load.sqlite3'}"
    await seed(db_url)
    async with (
        EmbeddedNats() as nats_server,
        NatsBridge(nats_server.url) as publisher,
        uvicorn_thread(build_app(db_url, nats_server.url)) as host,
        httpx.AsyncClient(base_url=f"http://{host}") as http,
    ):
        # Warm up once, so lazily made objects are not counted as growth.
        async with connect(f"ws://{host}/ws/sessions/s0?token=alice") as ws:
            json.loads(await ws.recv())
        baseline = await settled(http, await server_health(http))

        received = await hold_many_and_publish(host, publisher)
        assert received == dict.fromkeys(range(CONNECTIONS), UPDATES), "an update was lost"
        after_load = await settled(http, baseline)

        await churn(host, CYCLES // 4)
        after_warm_churn = await settled(http, baseline)
        await churn(host, CYCLES // 4)
        after_churn = await settled(http, baseline)
        gc.collect()
        tracemalloc.start()
        try:
            await churn(host, CYCLES - 2 * (CYCLES // 4))
            after_traced_churn = await settled(http, baseline)
            gc.collect()
            traced_mb = tracemalloc.get_traced_memory()[0] / 2**20
        finally:
            tracemalloc.stop()
        stats = after_traced_churn["stats"]

    rss_mb = (after_churn["rss_kb"] - after_warm_churn["rss_kb"]) / 1024
    print(
        f"\nload: {CONNECTIONS} connections x {UPDATES} updates, {CYCLES} cycles; "
        f"tasks {baseline['tasks']} -> {after_load['tasks']} -> {after_traced_churn['tasks']}; "
        f"churn: RSS {rss_mb:+.1f} MB, Python objects left {traced_mb:.2f} MB; "
        f"snapshots {stats['snapshots_sent']}, loads {stats['loads']}, "
        f"errors {stats['errors']}, timeouts {stats['timeouts']}"
    )
    for after in (after_load, after_warm_churn, after_churn, after_traced_churn):
        assert after["tasks"] <= baseline["tasks"]
        assert after["hub_sessions"] == baseline["hub_sessions"] == 0
        assert after["nats_subscriptions"] == baseline["nats_subscriptions"]
        assert after["db_checked_out"] == 0
    assert traced_mb < TRACED_BOUND_MB
    assert rss_mb < RSS_BOUND_MB
    assert stats["errors"] == 0
    assert stats["timeouts"] == 0
    assert stats["snapshots_sent"] == 1 + CONNECTIONS + CYCLES
    # One subscription per session in the process, and each update parsed once for it.
    bridge = after_traced_churn["bridge"]
    assert bridge["frames_parsed"] == SESSIONS * UPDATES
    assert bridge["slow_consumers"] == bridge["refused_frames"] == 0


async def hold_many_and_publish(host: str, publisher: NatsBridge) -> dict[int, int]:
    """Open CONNECTIONS sockets, publish UPDATES per session, count what each client got."""
    received: dict[int, int] = {}
    all_open = anyio.Event()
    opened = 0

    async def client(n: int) -> None:
        nonlocal opened
        session = f"s{n % SESSIONS}"
        async with connect(f"ws://{host}/ws/sessions/{session}?token=alice") as ws:
            snapshot = json.loads(await ws.recv())
            assert snapshot["version"] == 0, snapshot
            opened += 1
            if opened == CONNECTIONS:
                all_open.set()
            count = 0
            while count < UPDATES:
                event = json.loads(await ws.recv())
                count += 1
                assert event["version"] == count, ("out of order or duplicated", event)
            received[n] = count

    with anyio.fail_after(WAIT * 2):
        async with anyio.create_task_group() as tg:
            for n in range(CONNECTIONS):
                tg.start_soon(client, n)
            await all_open.wait()
            for version in range(1, UPDATES + 1):
                for s in range(SESSIONS):
                    await publisher.publish(f"s{s}", {"v": version}, owner="alice", version=version)
    return received


async def churn(host: str, cycles: int) -> None:
    """``cycles`` connect / snapshot / disconnect cycles, 50 at a time."""
    limiter = anyio.CapacityLimiter(50)

    async def cycle(n: int) -> None:
        async with limiter, connect(f"ws://{host}/ws/sessions/s{n % SESSIONS}?token=alice") as ws:
            assert json.loads(await ws.recv())["type"] == "session_update"

    with anyio.fail_after(WAIT * 10):
        async with anyio.create_task_group() as tg:
            for n in range(cycles):
                tg.start_soon(cycle, n)

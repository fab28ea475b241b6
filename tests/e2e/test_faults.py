"""Faults in the database and the broker: each has a defined outcome, and service resumes.

The database is the machine's real PostgreSQL behind a small TCP proxy owned by the test,
which can refuse connections (the database is down) or hold them (it is slow); nothing on the
machine's server is stopped. The broker is a real nats-server the test starts and kills.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import pytest
from sqlalchemy import ForeignKey, String, text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.pool import NullPool

from asgi_session_sync import SessionContext, SessionSyncMiddleware, Snapshot
from asgi_session_sync._types import Receive, Scope, Send
from asgi_session_sync.loaders.sqlalchemy import sqlalchemy_loader
from asgi_session_sync.nats import EmbeddedNats, NatsBridge
from asgi_session_sync.testing import connect_websocket

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

PG_HOST, PG_PORT = "127.0.0.1", 5432


@pytest.fixture
def anyio_backend() -> str:
    # asyncpg, SQLAlchemy's asyncio extension and nats-py run on asyncio only.
    return "asyncio"


class FaultyProxy:
    """A TCP proxy to PostgreSQL: ``mode`` is "up", "down" (refuse) or "slow" (hold)."""

    def __init__(self) -> None:
        self.mode = "up"
        self.port = 0

    async def serve(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        async with listener:
            self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
            task_status.started()
            await listener.serve(self._handle)

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        async with client:
            if self.mode == "down":
                return
            if self.mode == "slow":
                await anyio.sleep_forever()
            upstream = await anyio.connect_tcp(PG_HOST, PG_PORT)
            async with upstream, anyio.create_task_group() as tg:
                tg.start_soon(self._pipe, client, upstream, tg)
                tg.start_soon(self._pipe, upstream, client, tg)

    async def _pipe(
        self, source: anyio.abc.SocketStream, sink: anyio.abc.SocketStream, tg: Any
    ) -> None:
        try:
            async for chunk in source:
                await sink.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        tg.cancel_scope.cancel()


class Base(DeclarativeBase):
    pass


def models(schema: str) -> tuple[Any, Any]:
    class ChatSession(Base):
        __tablename__ = "chat_session"
        __table_args__ = {"schema": schema}  # noqa: RUF012
        id: Mapped[str] = mapped_column(String(64), primary_key=True)
        owner_id: Mapped[str] = mapped_column(String(64))
        version: Mapped[int]
        interactions: Mapped[list[Interaction]] = relationship(order_by="Interaction.id")

    class Interaction(Base):
        __tablename__ = "interaction"
        __table_args__ = {"schema": schema}  # noqa: RUF012
        id: Mapped[int] = mapped_column(primary_key=True)
        session_id: Mapped[str] = mapped_column(ForeignKey(f"{schema}.chat_session.id"))

    return ChatSession, Interaction


SCHEMA = f"sss_faults_{secrets.token_hex(4)}"
ChatSession, Interaction = models(SCHEMA)


@asynccontextmanager
async def database() -> AsyncIterator[str]:
    """A schema of its own on the machine's PostgreSQL, with one session; dropped afterwards."""
    url = os.environ.get("DATABASE_URL", f"postgresql+asyncpg://postgres@{PG_HOST}:{PG_PORT}/test")
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(f'CREATE SCHEMA "{SCHEMA}"'))
            await conn.run_sync(Base.metadata.create_all)
    except OSError as error:
        await engine.dispose()
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no PostgreSQL at {url}: {error}")
    try:
        async with async_sessionmaker(engine)() as session:
            session.add(ChatSession(id="s1", owner_id="alice", version=7))
            await session.commit()
        yield url
    finally:
        async with engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA "{SCHEMA}" CASCADE'))
        await engine.dispose()


async def greeting_app(scope: Scope, receive: Receive, send: Send) -> None:
    await receive()
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.send", "text": "hello"})
    await receive()


@asynccontextmanager
async def stack_behind_proxy(
    timeout: float,  # noqa: ASYNC109 (the middleware's load timeout, not this call's)
) -> AsyncIterator[tuple[FaultyProxy, Any]]:
    async with database() as url, anyio.create_task_group() as tg:
        proxy = FaultyProxy()
        await tg.start(proxy.serve)
        proxied = url.replace(f"{PG_HOST}:{PG_PORT}", f"127.0.0.1:{proxy.port}")
        # NullPool: every load opens a connection, so each one meets the proxy's current mode.
        engine = create_async_engine(proxied, poolclass=NullPool, connect_args={"timeout": 30})
        loader = sqlalchemy_loader(
            async_sessionmaker(engine),
            ChatSession,
            interactions=ChatSession.interactions,
            owner=ChatSession.owner_id,
            version=ChatSession.version,
        )
        app = SessionSyncMiddleware(
            greeting_app, loader=loader, paths=["/ws/{session_id}"], timeout=timeout
        )
        try:
            yield proxy, app
        finally:
            await engine.dispose()
            tg.cancel_scope.cancel()


async def first_frame(app: Any) -> str:
    async with connect_websocket(app, "/ws/s1", scope={"user": "alice"}, timeout=10) as ws:
        return await ws.receive_text()


async def test_database_down_at_connect_then_back(caplog: pytest.LogCaptureFixture) -> None:
    async with stack_behind_proxy(timeout=5) as (proxy, app):
        assert '"version":7' in await first_frame(app)
        proxy.mode = "down"
        with caplog.at_level(logging.ERROR, logger="asgi_session_sync"):
            assert await first_frame(app) == "hello"  # no snapshot; the app goes on
        assert "no snapshot: loader raised session_id=s1" in caplog.text
        assert app.stats.errors == 1
        proxy.mode = "up"
        assert '"version":7' in await first_frame(app)  # snapshots resume by themselves


async def test_slow_database_times_out_promptly(caplog: pytest.LogCaptureFixture) -> None:
    async with stack_behind_proxy(timeout=0.5) as (proxy, app):
        proxy.mode = "slow"
        with caplog.at_level(logging.WARNING, logger="asgi_session_sync"):
            with anyio.fail_after(3):  # the timeout, not the database, decides
                assert await first_frame(app) == "hello"
        assert "snapshot load timed out after 0.5s session_id=s1" in caplog.text
        assert app.stats.timeouts == 1
        proxy.mode = "up"
        assert '"version":7' in await first_frame(app)


async def test_nats_down_at_startup_is_a_clear_error() -> None:
    async with EmbeddedNats() as server:
        url = server.url
    # The server is gone and its port closed: nothing listens there.
    bridge = NatsBridge(url, startup_timeout=1, connect_timeout=0.2, reconnect_time_wait=0.1)
    with pytest.raises(ConnectionError, match=r"could not connect to NATS at nats://127\.0\.0\.1"):
        async with bridge:
            pass


async def test_nats_down_during_traffic_publish_fails_loudly_then_recovers() -> None:
    async def loader(ctx: SessionContext) -> Snapshot:
        return Snapshot({}, version=1)

    async with EmbeddedNats() as server:
        port, user, password = server.port, server.user, server.password
        bridge = NatsBridge(server.url, reconnect_time_wait=0.1, connect_timeout=0.5)
        async with bridge, bridge.subscribe("s1") as updates:
            await bridge.publish("s1", {"n": 1}, version=1)
            with anyio.fail_after(5):
                assert '"version":1' in await updates.__anext__()
            await server.kill()
            # While the broker is down nats-py buffers publishes for the reconnect.
            await bridge.publish("s1", {"n": 2}, version=2)
            # Back where it was, with its credentials: the bridge reconnects by itself.
            async with EmbeddedNats(port=port, user=user, password=password):
                with anyio.fail_after(10):
                    assert '"version":2' in await updates.__anext__()

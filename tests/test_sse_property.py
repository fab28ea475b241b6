"""Property: the ordering guarantees of the WebSocket path hold over Server-Sent Events.

Whatever the interleaving of writes, publishes, connect and load (and, on the bridged path,
lost publishes and reconnects with ``Last-Event-ID``), the session events a client receives
go up in version, never repeat, never fall behind the snapshot, need no resync by the client,
and end on the database's last state, once applied by the browser client's rules
(``asgi_session_sync/static/session-sync.js``: ``applyUpdate``, ``applyPatchEvent``,
``applySynced``). Two paths:

- **the middleware's**: an app that subscribes, starts its event stream and streams what is
  published as events (in chunks cut anywhere, with any line break), fenced by the middleware,
  which also repairs an app that subscribes only after its start (and misses a patch);
- **the bridge's**: ``SessionSync.accept_sse`` and ``SessionStream.forward`` behind a hub whose
  broker is in memory (the hub's ``Backend`` protocol is all it needs) and loses publishes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from anyio.lowlevel import checkpoint
from anyio.streams.memory import MemoryObjectSendStream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_sse import Event, ResponseClient, open_response

from asgi_session_sync import SessionContext, SessionSync, SessionSyncMiddleware, Snapshot
from asgi_session_sync._types import Receive, Scope, Send
from asgi_session_sync.hub import Hub
from asgi_session_sync.protocol import apply_patch, utf16_length
from asgi_session_sync.stats import BridgeStats

SESSION_ID = "s1"
FIRST_VERSION = 1


class World:
    """A database row with a version, and a broker that delivers publishes in order.

    Each write appends a token to ``/text`` and publishes it as an ``append`` patch, or (when
    its ``full`` flag is set) as the whole state; a write whose ``lost`` flag is set is
    committed but never delivered.
    """

    def __init__(self) -> None:
        self.version = FIRST_VERSION
        self.text = ""
        self.subscribers: list[Callable[[str], None]] = []

    @property
    def state(self) -> dict[str, Any]:
        return {"text": self.text}

    def snapshot(self) -> Snapshot:
        return Snapshot(self.state, version=self.version)

    def write(self, *, full: bool = False, lost: bool = False) -> None:
        base, before = self.version, self.text
        token = f"t{base};"
        self.version, self.text = base + 1, before + token
        event: dict[str, Any]
        if full:
            event = {"type": "session_update", "session": self.state}
        else:
            operation = {"op": "append", "path": "/text", "offset": utf16_length(before)}
            event = {"type": "session_patch", "base_version": base, "patch": [operation]}
            operation["value"] = token
        text = json.dumps({**event, "session_id": SESSION_ID, "version": self.version})
        if not lost:
            for deliver in self.subscribers:
                deliver(text)


class BrowserClient:
    """The browser client's ordering rules, over every connection of one page.

    Attributes:
        received: The version of each session event received, in order.
        applied: The version of each state applied, in order.
        restarts: Why the client would have reconnected for a snapshot (a patch gap).
    """

    def __init__(self) -> None:
        self.session: Any = None
        self.version: int | None = None
        self.known = False
        self.fresh = True
        self.received: list[int] = []
        self.applied: list[int] = []
        self.restarts: list[str] = []

    def connect(self) -> None:
        self.fresh = True  # a connection's first full state is the database's truth

    def on_event(self, event: Event) -> None:
        data = json.loads(event.data)
        kind, version = data["type"], data["version"]
        assert event.id == str(version), "each session event's id is its version"
        self.received.append(version)
        if kind == "session_update":
            truth = self.fresh or data.get("reset") is True
            if not truth and self.version is not None and version <= self.version:
                return  # a duplicate or a late one
            self.take(data["session"], version)
        elif kind == "session_patch":
            if self.version is None or data["base_version"] != self.version:
                if self.version is None or version > self.version:
                    self.restarts.append(f"gap: base {data['base_version']}, have {self.version}")
                return
            self.take(apply_patch(self.session, data["patch"]), version)
        else:
            assert kind == "session_synced", data
            self.fresh = False
            if self.version is None:
                self.version = version

    def take(self, session: Any, version: int) -> None:
        self.session, self.version = session, version
        self.known, self.fresh = True, False
        self.applied.append(version)


async def yield_n(n: int) -> None:
    for _ in range(n):
        await checkpoint()


async def writer(
    world: World, pauses: dict[str, Any], last_after: anyio.Event | None = None
) -> None:
    """Make the writes of ``pauses``; the last one only once ``last_after`` is set, if given."""
    *writes, last = pauses["writes"]
    for pause, full, lost in writes:
        await yield_n(pause)
        world.write(full=full, lost=lost)
    if last_after is not None:
        await last_after.wait()
    await yield_n(last[0])
    world.write(full=last[1], lost=last[2])


async def read_until(client: ResponseClient, browser: BrowserClient, target: int) -> None:
    while browser.version != target:
        browser.on_event(await client.next_event())


def check(world: World, browser: BrowserClient) -> None:
    received = browser.received
    assert received == sorted(set(received)), f"versions went down or repeated: {received}"
    assert browser.applied == sorted(set(browser.applied))
    assert browser.restarts == [], "the server sent a patch the client cannot apply"
    assert (browser.version, browser.session) == (world.version, world.state)


writes = st.lists(
    st.tuples(st.integers(0, 6), st.booleans(), st.just(False)), min_size=1, max_size=10
)


def common(**more: Any) -> Any:
    return st.fixed_dictionaries(
        {
            "connect_after": st.integers(0, 20),
            "after_subscribe": st.integers(0, 6),
            "before_read": st.integers(0, 6),
            "after_read": st.integers(0, 6),
            **more,
        }
    )


def world_loader(world: World, pauses: dict[str, Any]) -> Any:
    async def loader(ctx: SessionContext) -> Snapshot:
        await yield_n(pauses["before_read"])
        snapshot = world.snapshot()
        await yield_n(pauses["after_read"])
        return snapshot

    return loader


# --------------------------------------------------------------------------------------------
# The middleware's path: the app streams what is published, the middleware fences it
# --------------------------------------------------------------------------------------------


async def middleware_scenario(world: World, pauses: dict[str, Any]) -> BrowserClient:
    sep = pauses["sep"]
    inboxes: list[MemoryObjectSendStream[str]] = []
    # A late subscriber misses whatever is published before it subscribes, and nothing could
    # ever tell it so: the last write waits for it.
    subscribed = anyio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        inbox_send, inbox = anyio.create_memory_object_stream[str](math.inf)
        inboxes.append(inbox_send)
        start = {"type": "http.response.start", "status": 200}
        start["headers"] = [(b"content-type", b"text/event-stream")]
        if pauses["subscribe_late"]:
            # The wrong order: what is published during the load is missed, and the first
            # patch after it may not chain. The fence repairs the client with a snapshot.
            await send(start)
            await yield_n(pauses["after_subscribe"])
            world.subscribers.append(inbox_send.send_nowait)
            subscribed.set()
        else:
            # Subscribe before starting the response: nothing published from here is missed.
            world.subscribers.append(inbox_send.send_nowait)
            await yield_n(pauses["after_subscribe"])
            await send(start)
        with inbox_send, inbox:
            async for text in inbox:
                data = json.loads(text)
                lines = [f"event: {data['type']}", f"id: {data['version']}", f"data: {text}"]
                event = (sep.join(lines) + sep + sep).encode()
                cut = min(pauses["cut"], len(event))
                for part in (event[:cut], event[cut:]):
                    if part:
                        await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    middleware = SessionSyncMiddleware(
        app, loader=world_loader(world, pauses), paths=["/sse/{session_id}"]
    )
    browser = BrowserClient()
    target = FIRST_VERSION + len(pauses["writes"])
    async with anyio.create_task_group() as tg:
        tg.start_soon(writer, world, pauses, subscribed if pauses["subscribe_late"] else None)
        await yield_n(pauses["connect_after"])
        async with open_response(middleware, f"/sse/{SESSION_ID}") as client:
            await read_until(client, browser, target)
            for inbox in inboxes:
                inbox.close()
    return browser


middleware_pauses = common(
    writes=writes,
    subscribe_late=st.booleans(),
    sep=st.sampled_from(["\n", "\r\n", "\r"]),
    cut=st.integers(0, 300),
)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pauses=middleware_pauses)
def test_the_middlewares_event_stream_never_shows_the_past(
    backend: str, pauses: dict[str, Any]
) -> None:
    world = World()
    browser = anyio.run(middleware_scenario, world, pauses, backend=backend)
    check(world, browser)
    assert browser.received[0] >= FIRST_VERSION


# --------------------------------------------------------------------------------------------
# The bridge's path: accept_sse and forward, lost publishes, reconnects with Last-Event-ID
# --------------------------------------------------------------------------------------------


class MemoryBroker:
    """The hub's backend in memory: publishing delivers at once to the session's subscriber."""

    def __init__(self, world: World) -> None:
        self.world = world

    async def subscribe_subject(
        self, session_id: str, deliver: Callable[[bytes], None]
    ) -> Callable[[], Any]:
        def on_publish(text: str) -> None:
            deliver(text.encode())

        self.world.subscribers.append(on_publish)

        async def unsubscribe() -> None:
            self.world.subscribers.remove(on_publish)

        return unsubscribe

    async def catch_up(self, session_id: str, version: int) -> bytes | None:
        return None  # no producer streams into this session: a gap loads a snapshot


async def bridged_scenario(world: World, pauses: dict[str, Any]) -> BrowserClient:
    hub = Hub(
        MemoryBroker(world),
        stats=BridgeStats(),
        max_socket_bytes=1 << 20,
        max_process_bytes=1 << 24,
        max_concurrent_resyncs=4,
    )
    sync = SessionSync(world_loader(world, pauses))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async with hub.subscribe(SESSION_ID) as updates:
            await yield_n(pauses["after_subscribe"])
            stream = await sync.accept_sse(scope, send, SESSION_ID)
            await updates.forward(stream, receive)

    browser = BrowserClient()
    target = FIRST_VERSION + len(pauses["writes"])
    async with anyio.create_task_group() as tg:
        tg.start_soon(writer, world, pauses)
        await yield_n(pauses["connect_after"])
        last_event_id = ""
        for leave_after in [*pauses["reconnects"], math.inf]:
            headers = [("last-event-id", last_event_id)] if last_event_id else []
            browser.connect()
            async with open_response(app, f"/sse/{SESSION_ID}", headers=headers) as client:
                events = 0
                while browser.version != target and events < leave_after:
                    event = await client.next_event()
                    browser.on_event(event)
                    # What EventSource sends back: the id of the last event it dispatched.
                    last_event_id = event.id
                    events += 1
            if browser.version == target:
                break
    assert hub.sessions == 0, "a subscription outlived its stream"
    return browser


bridged_pauses = common(
    writes=st.lists(
        st.tuples(st.integers(0, 6), st.booleans(), st.booleans()), min_size=0, max_size=10
    ),
    # The last write is delivered: nothing would tell a stream that the last one was lost.
    last_write=st.tuples(st.integers(0, 6), st.booleans(), st.just(False)),
    reconnects=st.lists(st.integers(0, 4), max_size=3),
)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pauses=bridged_pauses)
def test_a_bridged_event_stream_never_shows_the_past_across_lost_publishes_and_reconnects(
    backend: str, pauses: dict[str, Any]
) -> None:
    world = World()
    pauses = {**pauses, "writes": [*pauses["writes"], pauses["last_write"]]}
    browser = anyio.run(bridged_scenario, world, pauses, backend=backend)
    check(world, browser)

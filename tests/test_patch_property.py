"""Property: through loss, duplication, reordering and reconnects, a socket fed by the hub only
ever holds a state the database had, at the version it claims, and ends on the latest.

The hub under test is the one behind every NATS subscription (:class:`Hub` and its
:class:`SessionStream`); the broker is simulated, so hypothesis can try thousands of schedules
quickly, on asyncio and trio.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import jsonpatch
import pytest
from anyio.lowlevel import checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asgi_session_sync.hub import Hub
from asgi_session_sync.protocol import MAX_VERSION, SessionPatch, SessionUpdate, make_patch
from asgi_session_sync.stats import BridgeStats

WAIT = 5.0


class Database:
    """Every committed state by version; publishing sends a full update or a patch."""

    def __init__(self, first_version: int) -> None:
        self.first_version = first_version
        self.states: dict[int, dict[str, Any]] = {first_version: {"title": "", "items": []}}
        self.latest = first_version

    def commit(self, change: tuple[str, int]) -> None:
        state = copy.deepcopy(self.states[self.latest])
        kind, value = change
        if kind == "append":
            state["items"].append({"n": value, "text": ""})
        elif kind == "stream" and state["items"]:
            state["items"][-1]["text"] += f"t{value} "
        elif kind == "remove" and state["items"]:
            del state["items"][value % len(state["items"])]
        else:
            state["title"] = f"title {value}"
        self.latest += 1
        self.states[self.latest] = state

    def full_update(self, version: int, *, reset: bool = False) -> str:
        event = SessionUpdate(
            session_id="s1",
            session=self.states[version],
            version=version,
            reset=True if reset else None,
        )
        return event.to_json().decode()

    def patch(self, version: int) -> str:
        operations = make_patch(self.states[version - 1], self.states[version])
        event = SessionPatch(
            session_id="s1", base_version=version - 1, version=version, patch=operations
        )
        return event.to_json().decode()


class Client:
    """The browser: applies what the socket receives, checking each step against the DB."""

    def __init__(self, db: Database, *, stream_knows_version: bool) -> None:
        self.db = db
        # A stream that does not know the snapshot's version may resend a state the client
        # has; the browser client ignores a full state that is not newer (issue 13: "later ones
        # apply only if they are newer"). A stream that knows it never sends one.
        self.strict = stream_knows_version
        self.version = db.latest
        self.state = copy.deepcopy(db.states[db.latest])  # the middleware's snapshot
        self.changed = anyio.Event()

    def receive(self, text: str) -> None:
        event = json.loads(text)
        version = event["version"]
        assert type(version) is int, "a version is a JSON number"
        if event["type"] == "session_patch":
            assert event["base_version"] == self.version, "a patch for a base the client lacks"
            self.state = jsonpatch.apply_patch(self.state, event["patch"])
        else:
            assert event["session"] == self.db.states[version], "a state the DB never had"
            # A resync's snapshot (reset) is the database's truth: it replaces, whatever its
            # version; a live full state applies only when newer.
            if not event.get("reset") and version <= self.version:
                assert not self.strict, "a full state that is not newer"
                return
            self.state = event["session"]
        self.version = version
        assert self.state == self.db.states[self.version], "state differs from the DB's"
        self.changed.set()
        self.changed = anyio.Event()


class Broker:
    """The hub's backend with one subscriber: what the schedule delivers reaches it."""

    def __init__(self) -> None:
        self.deliver: Callable[[bytes], None] = lambda data: None

    async def subscribe_subject(
        self, session_id: str, deliver: Callable[[bytes], None]
    ) -> Callable[[], Awaitable[None]]:
        self.deliver = deliver

        async def unsubscribe() -> None:
            self.deliver = lambda data: None

        return unsubscribe

    async def catch_up(self, session_id: str, version: int) -> bytes | None:
        return None  # no producer streams into this session


changes = st.tuples(st.sampled_from(["append", "stream", "remove", "title"]), st.integers(0, 9))
steps = st.lists(
    st.one_of(
        st.tuples(st.just("write_patch"), changes),
        st.tuples(st.just("write_full"), changes),
        st.tuples(st.just("lose"), st.none()),
        st.tuples(st.just("duplicate"), st.none()),
        st.tuples(st.just("swap"), st.none()),
        st.tuples(st.just("deliver"), st.integers(1, 4)),
        st.tuples(st.just("reconnect"), st.none()),
        st.tuples(st.just("pause"), st.integers(1, 8)),
    ),
    max_size=40,
)


async def scenario(
    first_version: int, knows_version: bool, load_pauses: int, plan: list[Any]
) -> tuple[Client, Database, BridgeStats]:
    db = Database(first_version)
    client = Client(db, stream_knows_version=knows_version)
    stats = BridgeStats()

    async def resync() -> str:
        for _ in range(load_pauses):
            await checkpoint()
        return db.full_update(db.latest, reset=True)

    broker = Broker()
    hub = Hub(
        broker,
        stats=stats,
        max_socket_bytes=1 << 20,
        max_process_bytes=1 << 20,
        max_concurrent_resyncs=1,
    )
    in_flight: list[str] = []  # published, not yet delivered: the broker's buffer
    delivered: list[str] = []

    async def deliver(count: int) -> None:
        for _ in range(min(count, len(in_flight))):
            text = in_flight.pop(0)
            delivered.append(text)
            broker.deliver(text.encode())
            await checkpoint()

    async with hub.subscribe("s1") as stream, anyio.create_task_group() as tg:
        stream.set_resync(resync)
        if knows_version:
            stream.version = client.version  # the snapshot's, as forward(socket) tells it

        async def consume() -> None:
            async for text in stream:
                client.receive(text)

        tg.start_soon(consume)
        for action, argument in plan:
            if action in ("write_patch", "write_full"):
                db.commit(argument)
                make = db.patch if action == "write_patch" else db.full_update
                in_flight.append(make(db.latest))
            elif action == "lose" and in_flight:
                in_flight.pop(0)
            elif action == "duplicate" and delivered:
                in_flight.insert(0, delivered[-1])
            elif action == "swap" and len(in_flight) >= 2:
                in_flight[0], in_flight[1] = in_flight[1], in_flight[0]
            elif action == "deliver":
                await deliver(argument)
            elif action == "reconnect":
                in_flight.clear()  # lost while disconnected
                hub.resync_all("nats reconnected")
            elif action == "pause":
                for _ in range(argument):
                    await checkpoint()
        # From here the broker is healthy: one more change, everything delivered in order.
        db.commit(("title", 99))
        in_flight.append(db.patch(db.latest))
        await deliver(len(in_flight))
        with anyio.fail_after(WAIT):
            while client.version != db.latest:
                await client.changed.wait()
        tg.cancel_scope.cancel()
    return client, db, stats


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    first_version=st.sampled_from([0, 7, MAX_VERSION - 64]),
    knows_version=st.booleans(),
    load_pauses=st.integers(0, 6),
    plan=steps,
)
def test_client_state_is_always_the_databases_at_its_version_and_converges(
    backend: str, first_version: int, knows_version: bool, load_pauses: int, plan: list[Any]
) -> None:
    client, db, stats = anyio.run(
        scenario, first_version, knows_version, load_pauses, plan, backend=backend
    )
    assert client.version == db.latest
    assert client.state == db.states[db.latest]
    # Every patch forwarded chained (checked in Client.receive); none was forwarded on a gap.
    assert stats.patches_forwarded + stats.updates_forwarded + stats.snapshots_forwarded >= 1

"""Fuzzed scopes and message sequences, and cancellation at every await point.

The middleware must never raise into the server, never call the loader with an invalid id,
never read receive(), and otherwise be transparent: the same messages as the bare app, with
the snapshot right after the accept.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import pytest
from anyio.lowlevel import checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asgi_session_sync import SessionContext, SessionSyncMiddleware, Snapshot
from asgi_session_sync._types import Message, Receive, Scope, Send

VALID_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


class Server:
    """A fake server end: scripted client messages, a record of what the app sent."""

    def __init__(self, client_messages: Sequence[Message]) -> None:
        self.incoming = list(client_messages)
        self.sent: list[Message] = []
        self.sent_after_close: list[Message] = []
        self.closed = False
        self.receive_calls = 0

    async def receive(self) -> Message:
        self.receive_calls += 1
        await checkpoint()
        if self.incoming:
            message = self.incoming.pop(0)
        else:
            message = {"type": "websocket.disconnect", "code": 1006}
        if message["type"] == "websocket.disconnect":
            self.closed = True
        return message

    async def send(self, message: Message) -> None:
        # When the client left is a matter of time in a real server, not of who read the
        # disconnect; the fake records late sends instead of guessing which would have raised.
        await checkpoint()
        if self.closed:
            self.sent_after_close.append(message)
            return
        if message["type"] in ("websocket.close", "websocket.http.response.body"):
            self.closed = True
        self.sent.append(message)

    @property
    def everything_sent(self) -> list[Message]:
        return self.sent + self.sent_after_close


def scripted_app(actions: Sequence[str]) -> Any:
    """An app that does exactly ``actions``, whatever the protocol says about them."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        for action in actions:
            if action == "receive":
                await receive()
            elif action == "accept":
                await send({"type": "websocket.accept"})
            elif action == "send":
                await send({"type": "websocket.send", "text": "app"})
            elif action == "close":
                await send({"type": "websocket.close", "code": 1000})
            elif action == "http":
                await send({"type": "websocket.http.response.start", "status": 403, "headers": []})
                await send({"type": "websocket.http.response.body", "body": b""})
            elif action == "unknown":
                await send({"type": "websocket.unknown.thing"})

    return app


class Loader:
    def __init__(self, pauses: int = 0) -> None:
        self.ids: list[str] = []
        self.pauses = pauses

    async def __call__(self, ctx: SessionContext) -> Snapshot:
        self.ids.append(ctx.session_id)
        for _ in range(self.pauses):
            await checkpoint()
        return Snapshot({"ok": True}, version=1)


async def run(app: Any, scope: Scope, client: Sequence[Message]) -> tuple[Server, str | None]:
    server = Server(client)
    try:
        await app(scope, server.receive, server.send)
    except Exception as exc:
        return server, type(exc).__name__
    return server, None


texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=300)
scopes = st.fixed_dictionaries(
    {
        "type": st.just("websocket"),
        "path": st.one_of(
            texts,
            st.builds(lambda s: "/ws/sessions/" + s, texts),
            st.builds(lambda s: "/ws/sessions/" + s, st.from_regex(VALID_ID, fullmatch=True)),
            st.just("/ws"),
        ),
        "query_string": st.one_of(
            st.binary(max_size=300),
            st.builds(lambda s: b"session_id=" + s, st.binary(max_size=200)),
            st.builds(
                lambda s: ("session_id=" + s).encode(), st.from_regex(VALID_ID, fullmatch=True)
            ),
            st.just(b"session_id=a&session_id=b&since=" + b"9" * 10_000),
        ),
        "headers": st.lists(st.tuples(st.binary(max_size=50), st.binary(max_size=200)), max_size=5),
        "subprotocols": st.lists(texts, max_size=3),
    },
    optional={"user": st.one_of(st.none(), texts, st.integers(), st.dictionaries(texts, texts))},
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scope=scopes)
def test_fuzzed_scopes_never_raise_or_reach_the_loader_with_a_bad_id(scope: Scope) -> None:
    loader = Loader()
    middleware = SessionSyncMiddleware(
        scripted_app(["receive", "accept", "send", "receive"]),
        loader=loader,
        paths=["/ws/sessions/{session_id}", "/ws"],
    )
    client = [{"type": "websocket.connect"}]
    server, error = anyio.run(run, middleware, scope, client)
    assert error is None
    assert all(VALID_ID.fullmatch(session_id) for session_id in loader.ids)
    assert server.sent_after_close == []
    if loader.ids:
        assert json.loads(server.sent[1]["text"])["session_id"] == loader.ids[0]


client_messages = st.lists(
    st.sampled_from(
        [
            {"type": "websocket.connect"},
            {"type": "websocket.receive", "text": "hi"},
            {"type": "websocket.receive", "bytes": b"\x00" * 10},
            {"type": "websocket.disconnect", "code": 1001},
            {"type": "websocket.something.else"},
        ]
    ),
    max_size=8,
)
app_actions = st.lists(
    st.sampled_from(["receive", "accept", "send", "close", "http", "unknown"]), max_size=8
)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(client=client_messages, actions=app_actions, pauses=st.integers(0, 4))
def test_fuzzed_message_sequences_are_transparent(
    backend: str, client: list[Message], actions: list[str], pauses: int
) -> None:
    """Out of order, duplicate connect, receive after disconnect, send after close, unknown
    types: the wrapped app sees and sends what the bare app does, plus the snapshot."""
    scope = {"type": "websocket", "path": "/ws/sessions/s1", "query_string": b""}
    middleware = SessionSyncMiddleware(
        scripted_app(actions), loader=Loader(pauses), paths=["/ws/sessions/{session_id}"]
    )
    bare, bare_error = anyio.run(run, scripted_app(actions), dict(scope), client, backend=backend)
    wrapped, wrapped_error = anyio.run(run, middleware, dict(scope), client, backend=backend)
    assert wrapped_error == bare_error
    # The middleware never reads receive(): the app's reads are the only ones.
    assert wrapped.receive_calls == bare.receive_calls
    expected = bare.everything_sent
    got = wrapped.everything_sent
    snapshots = [m for m in got if m.get("text", "").startswith('{"type":"session_update"')]
    assert len(snapshots) <= 1
    if snapshots:
        # Right after the first accept; after the connection ended only if that accept was
        # (the middleware cannot know the client left: the server tells the app, not it).
        first_accept = next(i for i, m in enumerate(got) if m["type"] == "websocket.accept")
        assert got.index(snapshots[0]) == first_accept + 1
        if any(m is snapshots[0] for m in wrapped.sent_after_close):
            assert any(m is got[first_accept] for m in wrapped.sent_after_close)
        got.remove(snapshots[0])
    assert got == expected


class Steps:
    """Counts the await points a connection passes; cancels the connection at step ``stop``."""

    def __init__(self, stop: int | None) -> None:
        self.count = 0
        self.stop = stop
        self.scope: anyio.CancelScope | None = None

    async def step(self) -> None:
        self.count += 1
        if self.count == self.stop:
            assert self.scope is not None
            self.scope.cancel()
        await checkpoint()


async def cancelled_connection(middleware: SessionSyncMiddleware, steps: Steps) -> None:
    incoming = [{"type": "websocket.connect"}, {"type": "websocket.receive", "text": "hi"}]

    async def receive() -> Message:
        await steps.step()
        if not incoming:  # the client stays; end the run here, as a server shutdown would
            assert steps.scope is not None
            steps.scope.cancel()
            await anyio.sleep_forever()
        return incoming.pop(0)

    async def send(message: Message) -> None:
        await steps.step()

    scope = {"type": "websocket", "path": "/ws/s1", "query_string": b"since=3", "user": "u"}
    with anyio.CancelScope() as steps.scope:
        await middleware(scope, receive, send)


def make_middleware(steps_of: Callable[[], Steps]) -> SessionSyncMiddleware:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": "hello"})
        await receive()
        await receive()

    async def authenticate(scope: Scope) -> str:
        await steps_of().step()
        return "u"

    async def version_loader(ctx: SessionContext) -> int:
        await steps_of().step()
        return 2

    async def loader(ctx: SessionContext) -> Snapshot:
        await steps_of().step()
        return Snapshot({}, version=2)

    return SessionSyncMiddleware(
        app,
        loader=loader,
        version_loader=version_loader,
        authenticate=authenticate,
        paths=["/ws/{session_id}"],
        timeout=5,
    )


@pytest.mark.anyio
async def test_cancellation_at_every_await_point_leaves_nothing_behind() -> None:
    current = Steps(None)
    middleware = make_middleware(lambda: current)
    with anyio.fail_after(5):
        await cancelled_connection(middleware, current)
    total = current.count
    assert total >= 6  # receives, accept, authenticate, version_loader, loader, sends
    for stop in range(1, total + 1):
        current = Steps(stop)
        with anyio.fail_after(5):
            await cancelled_connection(middleware, current)
        # One task per connection: nothing goes on past the cancellation.
        assert current.count == stop, f"went on past the cancel at step {stop}"
        assert middleware.sync.fetcher._snapshots.in_flight == 0
        assert middleware.sync.fetcher._versions.in_flight == 0
    # Nothing is stuck: no flight, no semaphore slot; a new connection gets its snapshot.
    current = Steps(None)
    sent: list[Message] = []
    incoming = [{"type": "websocket.connect"}]

    app_done_sending = anyio.Event()

    async def receive() -> Message:
        if incoming:
            return incoming.pop(0)
        await app_done_sending.wait()  # the client stays until the app has said hello
        return {"type": "websocket.disconnect", "code": 1000}

    async def send(message: Message) -> None:
        sent.append(message)
        if message.get("text") == "hello":
            app_done_sending.set()

    scope = {"type": "websocket", "path": "/ws/s1", "query_string": b"", "user": "u"}
    with anyio.fail_after(5):
        await middleware(scope, receive, send)
    assert json.loads(sent[1]["text"])["version"] == 2

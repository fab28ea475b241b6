from __future__ import annotations

import json
import logging
import re
from datetime import datetime, timezone
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from conftest import SESSION, RecordingLoader, greeting_app
from pydantic import BaseModel

from asgi_session_sync import (
    SessionContext,
    SessionSocket,
    SessionSync,
    SessionSyncMiddleware,
    Snapshot,
)
from asgi_session_sync._types import Message, Receive, Scope, Send
from asgi_session_sync.testing import WebSocketRejected, connect_websocket

pytestmark = pytest.mark.anyio


def wrap(app: Any = greeting_app, **options: Any) -> SessionSyncMiddleware:
    options.setdefault("loader", RecordingLoader())
    options.setdefault("paths", ["/ws/sessions/{session_id}", "/ws"])
    return SessionSyncMiddleware(app, **options)


async def test_snapshot_is_first_frame_after_accept() -> None:
    loader = RecordingLoader(Snapshot(SESSION, owner="alice", version=7))
    async with connect_websocket(wrap(loader=loader), "/ws/sessions/s1") as ws:
        assert await ws.receive_json() == {
            "type": "session_update",
            "session_id": "s1",
            "owner": "alice",
            "session": SESSION,
            "version": 7,
        }
        assert await ws.receive_text() == "hello"
        await ws.send_text("ping")
        assert await ws.receive_text() == "echo:ping"
    assert [ctx.session_id for ctx in loader.calls] == ["s1"]


async def test_frame_has_no_version_key_when_version_unknown() -> None:
    async with connect_websocket(wrap(), "/ws/sessions/s1") as ws:
        assert await ws.receive_json() == {
            "type": "session_update",
            "session_id": "s1",
            "owner": None,
            "session": SESSION,
        }


async def test_a_timestamp_version_is_refused_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    # Protocol v3: a version is a whole number; a timestamp is the loader's to convert.
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    loader = RecordingLoader(Snapshot(SESSION, version=when))  # type: ignore[arg-type]
    app = wrap(loader=loader)
    with caplog.at_level(logging.ERROR, logger="asgi_session_sync"):
        async with connect_websocket(app, "/ws/sessions/s1") as ws:
            assert await ws.receive_text() == "hello"
    assert app.stats.errors == 1
    assert any("cannot serialise" in r.getMessage() for r in caplog.records)


async def test_pydantic_session_is_serialised() -> None:
    class Interaction(BaseModel):
        prompt: str
        at: datetime

    class Session(BaseModel):
        interactions: list[Interaction]

    when = datetime(2026, 1, 1, tzinfo=timezone.utc)
    loader = RecordingLoader(Session(interactions=[Interaction(prompt="hi", at=when)]))
    async with connect_websocket(wrap(loader=loader), "/ws/sessions/s1") as ws:
        event = await ws.receive_json()
    assert event["session"] == {"interactions": [{"prompt": "hi", "at": "2026-01-01T00:00:00Z"}]}


async def test_session_id_from_query_parameter_on_exact_path() -> None:
    loader = RecordingLoader()
    async with connect_websocket(wrap(loader=loader), "/ws?session_id=abc&x=1") as ws:
        assert (await ws.receive_json())["session_id"] == "abc"
    assert loader.calls[0].session_id == "abc"


async def test_custom_session_id_param() -> None:
    loader = RecordingLoader()
    app = wrap(loader=loader, paths=["/live"], session_id_param="sid")
    async with connect_websocket(app, "/live?sid=abc") as ws:
        assert (await ws.receive_json())["session_id"] == "abc"


def test_event_type_is_the_protocols_not_an_option() -> None:
    # The wire format has one home (asgi_session_sync.protocol): the type is not configurable.
    with pytest.raises(TypeError, match="event_type"):
        wrap(event_type="snapshot")


async def test_accept_is_forwarded_unchanged() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send(
            {"type": "websocket.accept", "subprotocol": "v2", "headers": [(b"x-served-by", b"a")]}
        )
        await receive()

    async with connect_websocket(wrap(app), "/ws/sessions/s1", subprotocols=["v1", "v2"]) as ws:
        assert ws.subprotocol == "v2"
        assert ws.accept_headers == [(b"x-served-by", b"a")]
        assert (await ws.receive_json())["session_id"] == "s1"


@pytest.mark.parametrize("path", ["/other", "/ws/sessions", "/ws/sessions/s1/extra", "/WS"])
async def test_unserved_paths_pass_through_untouched(path: str) -> None:
    seen: list[tuple[Receive, Send]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((receive, send))
        await greeting_app(scope, receive, send)

    loader = RecordingLoader()
    async with connect_websocket(wrap(app, loader=loader), path) as ws:
        assert await ws.receive_text() == "hello"
        server_receive, server_send = ws._asgi_receive, ws._asgi_send
    assert seen == [(server_receive, server_send)]
    assert loader.calls == []


@pytest.mark.parametrize("scope_type", ["http", "lifespan"])
async def test_http_and_lifespan_pass_through_untouched(scope_type: str) -> None:
    calls: list[tuple[Scope, Receive, Send]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        calls.append((scope, receive, send))

    async def receive() -> Message:
        raise AssertionError("not called")

    async def send(message: Message) -> None:
        raise AssertionError("not called")

    loader = RecordingLoader()
    scope = {"type": scope_type, "path": "/ws"}
    await wrap(app, loader=loader)(scope, receive, send)
    assert calls == [(scope, receive, send)]
    assert loader.calls == []


async def test_loader_returning_none_is_transparent() -> None:
    async def nothing(ctx: SessionContext) -> None:
        return None

    async def frames(app: Any) -> list[str]:
        async with connect_websocket(app, "/ws/sessions/s1") as ws:
            await ws.send_text("a")
            return [await ws.receive_text(), await ws.receive_text()]

    assert await frames(wrap(loader=nothing)) == await frames(greeting_app)


async def test_loader_error_is_logged_and_app_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    errors: list[tuple[str, Exception]] = []

    async def broken(ctx: SessionContext) -> None:
        raise LookupError("db said no")

    app = wrap(loader=broken, on_error=lambda ctx, exc: errors.append((ctx.session_id, exc)))
    with caplog.at_level(logging.ERROR, logger="asgi_session_sync"):
        async with connect_websocket(app, "/ws/sessions/s1") as ws:
            assert await ws.receive_text() == "hello"
    assert [(sid, type(exc)) for sid, exc in errors] == [("s1", LookupError)]
    [record] = caplog.records
    assert "loader raised" in record.getMessage()
    assert "session_id=s1" in record.getMessage()
    assert record.exc_info is not None


async def test_on_error_hook_failure_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(ctx: SessionContext) -> None:
        raise LookupError

    def bad_hook(ctx: SessionContext, exc: Exception) -> None:
        raise RuntimeError("hook bug")

    with caplog.at_level(logging.ERROR, logger="asgi_session_sync"):
        async with connect_websocket(
            wrap(loader=broken, on_error=bad_hook), "/ws/sessions/s1"
        ) as ws:
            assert await ws.receive_text() == "hello"
    assert any("on_error hook raised" in r.getMessage() for r in caplog.records)


async def test_loader_timeout_cancels_and_app_goes_on_promptly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cancelled = anyio.Event()
    errors: list[Exception] = []

    async def hanging(ctx: SessionContext) -> None:
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()

    app = wrap(loader=hanging, timeout=0.05, on_error=lambda ctx, exc: errors.append(exc))
    with caplog.at_level(logging.WARNING, logger="asgi_session_sync"):
        async with connect_websocket(app, "/ws/sessions/s1", timeout=2) as ws:
            assert await ws.receive_text() == "hello"
    assert cancelled.is_set()
    assert [type(e) for e in errors] == [TimeoutError]
    assert any("timed out" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "rejection",
    [
        [{"type": "websocket.close", "code": 4403}],
        [
            {"type": "websocket.http.response.start", "status": 403, "headers": []},
            {"type": "websocket.http.response.body", "body": b"no"},
        ],
    ],
    ids=["close", "http-response"],
)
async def test_loader_never_called_when_app_rejects(rejection: list[Message]) -> None:
    async def rejecting(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        for message in rejection:
            await send(message)

    loader = RecordingLoader()
    with pytest.raises(WebSocketRejected):
        async with connect_websocket(wrap(rejecting, loader=loader), "/ws/sessions/s1"):
            pass
    assert loader.calls == []


class RecordingServer:
    """A server's side of one WebSocket, by hand: what the app's receive gives, what send got."""

    def __init__(self, *incoming: Message) -> None:
        self.incoming = [{"type": "websocket.connect"}, *incoming]
        self.sent: list[Message] = []
        self.sent_event = anyio.Event()

    async def receive(self) -> Message:
        if not self.incoming:
            await anyio.sleep_forever()
        return self.incoming.pop(0)

    async def send(self, message: Message) -> None:
        self.sent.append(message)
        self.sent_event.set()
        self.sent_event = anyio.Event()

    def scope(self, path: str = "/ws/sessions/s1") -> Scope:
        return {"type": "websocket", "path": path, "query_string": b"", "headers": []}


async def test_accept_is_held_until_the_snapshot_is_loaded() -> None:
    loading = anyio.Event()
    release = anyio.Event()
    returned = anyio.Event()

    async def gated(ctx: SessionContext) -> dict[str, str]:
        loading.set()
        await release.wait()
        return {"ok": "yes"}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        returned.set()

    server = RecordingServer()
    async with anyio.create_task_group() as tg:
        tg.start_soon(wrap(app, loader=gated), server.scope(), server.receive, server.send)
        with anyio.fail_after(5):
            await loading.wait()
        assert server.sent == []  # the client is not connected yet: it can send nothing
        assert not returned.is_set()
        release.set()
        with anyio.fail_after(5):
            await returned.wait()
    assert [m["type"] for m in server.sent] == ["websocket.accept", "websocket.send"]
    assert json.loads(server.sent[1]["text"])["session"] == {"ok": "yes"}


async def test_app_gets_the_servers_own_receive() -> None:
    # The middleware never reads receive(): one reader, nothing buffered, nothing cancelled.
    seen: list[Receive] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(receive)
        await receive()
        await send({"type": "websocket.accept"})

    server = RecordingServer()
    await wrap(app)(server.scope(), server.receive, server.send)
    assert seen == [server.receive]


async def test_client_gone_during_the_load_reaches_the_app_after_it() -> None:
    # The load is not cut short (other connections may share it); the server tells the app
    # that the client left, exactly as it would without the middleware.
    loads_done = anyio.Event()
    app_received: list[Message] = []

    async def slow(ctx: SessionContext) -> dict[str, str]:
        await anyio.sleep(0.01)
        loads_done.set()
        return {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        app_received.append(await receive())

    server = RecordingServer({"type": "websocket.disconnect", "code": 1001})
    await wrap(app, loader=slow)(server.scope(), server.receive, server.send)
    assert loads_done.is_set()
    assert app_received == [{"type": "websocket.disconnect", "code": 1001}]


async def test_app_task_sending_during_the_load_waits_for_the_snapshot() -> None:
    loading = anyio.Event()
    release = anyio.Event()

    async def gated(ctx: SessionContext) -> dict[str, str]:
        loading.set()
        await release.wait()
        return {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        async with anyio.create_task_group() as tg:

            async def early() -> None:
                await loading.wait()
                await send({"type": "websocket.send", "text": "early"})

            tg.start_soon(early)
            tg.start_soon(send, {"type": "websocket.accept"})
            await loading.wait()
            await anyio.lowlevel.checkpoint()
            release.set()

    server = RecordingServer()
    with anyio.fail_after(5):
        await wrap(app, loader=gated)(server.scope(), server.receive, server.send)
    assert [m["type"] for m in server.sent] == [
        "websocket.accept",
        "websocket.send",
        "websocket.send",
    ]
    assert server.sent[2]["text"] == "early"


INVALID_IDS = ["*", ">", "a.b", "a b", "a\tb", "a\x00b", "a\x1b[31m", "x" * 129, "ünï", "a/b%2e"]


@pytest.mark.parametrize("session_id", INVALID_IDS)
async def test_loader_never_called_for_invalid_query_session_id(session_id: str) -> None:
    from urllib.parse import quote

    loader = RecordingLoader()
    async with connect_websocket(wrap(loader=loader), "/ws?session_id=" + quote(session_id)) as ws:
        assert await ws.receive_text() == "hello"
    assert loader.calls == []


@pytest.mark.parametrize(
    "path",
    [
        "/ws/sessions/*",
        "/ws/sessions/%3E",
        "/ws/sessions/a.b",
        "/ws/sessions/a%20b",
        "/ws/sessions/",
    ],
)
async def test_loader_never_called_for_invalid_path_session_id(path: str) -> None:
    loader = RecordingLoader()
    async with connect_websocket(wrap(loader=loader), path) as ws:
        assert await ws.receive_text() == "hello"
    assert loader.calls == []


@pytest.mark.parametrize("query", ["", "other=1", "session_id=", "session_id=a&session_id=b"])
async def test_loader_never_called_for_missing_or_ambiguous_query_id(query: str) -> None:
    loader = RecordingLoader()
    async with connect_websocket(wrap(loader=loader), "/ws?" + query) as ws:
        assert await ws.receive_text() == "hello"
    assert loader.calls == []


async def test_custom_pattern_never_admits_subject_wildcards() -> None:
    loader = RecordingLoader()
    app = wrap(loader=loader, session_id_pattern=r".+")
    async with connect_websocket(app, "/ws?session_id=a.%3E") as ws:
        assert await ws.receive_text() == "hello"
    async with connect_websocket(app, "/ws?session_id=a:b") as ws:
        assert (await ws.receive_json())["session_id"] == "a:b"
    assert [ctx.session_id for ctx in loader.calls] == ["a:b"]


async def test_oversize_snapshot_is_not_sent(caplog: pytest.LogCaptureFixture) -> None:
    loader = RecordingLoader({"blob": "x" * 2000})
    with caplog.at_level(logging.WARNING, logger="asgi_session_sync"):
        async with connect_websocket(wrap(loader=loader, max_bytes=1000), "/ws/sessions/s1") as ws:
            assert await ws.receive_text() == "hello"
    assert any("exceeds max_bytes=1000" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("result", [42, "text", ["a", "list"]])
async def test_wrong_loader_result_type_is_logged(
    result: object, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="asgi_session_sync"):
        async with connect_websocket(wrap(loader=RecordingLoader(result)), "/ws/sessions/s1") as ws:
            assert await ws.receive_text() == "hello"
    assert any("expected a mapping" in r.getMessage() for r in caplog.records)


async def test_unserialisable_session_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    loader = RecordingLoader({"thing": object()})
    with caplog.at_level(logging.ERROR, logger="asgi_session_sync"):
        async with connect_websocket(wrap(loader=loader), "/ws/sessions/s1") as ws:
            assert await ws.receive_text() == "hello"
    assert any("cannot serialise" in r.getMessage() for r in caplog.records)


async def test_user_from_authenticate() -> None:
    async def authenticate(scope: Scope) -> str:
        return dict(scope["headers"])[b"authorization"].decode()

    loader = RecordingLoader()
    app = wrap(loader=loader, authenticate=authenticate)
    async with connect_websocket(app, "/ws/sessions/s1", headers={"Authorization": "bob"}) as ws:
        await ws.receive_json()
    assert loader.calls[0].user == "bob"


async def test_user_from_scope_set_by_inner_auth_middleware() -> None:
    def auth_middleware(app: Any) -> Any:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            scope["user"] = "carol"  # as Starlette's AuthenticationMiddleware does
            await app(scope, receive, send)

        return middleware

    loader = RecordingLoader()
    async with connect_websocket(
        wrap(auth_middleware(greeting_app), loader=loader), "/ws/sessions/s1"
    ) as ws:
        await ws.receive_json()
    assert loader.calls[0].user == "carol"
    assert loader.calls[0].scope["path"] == "/ws/sessions/s1"


async def test_asgi2_app_is_supported() -> None:
    class Asgi2App:
        def __init__(self, scope: Scope) -> None:
            self.scope = scope

        async def __call__(self, receive: Receive, send: Send) -> None:
            await greeting_app(self.scope, receive, send)

    async with connect_websocket(wrap(Asgi2App), "/ws/sessions/s1") as ws:
        assert (await ws.receive_json())["session_id"] == "s1"
        assert await ws.receive_text() == "hello"


async def test_send_failure_of_snapshot_is_not_raised_into_app() -> None:
    async def send_fails(message: Message) -> None:
        if message["type"] == "websocket.send":
            raise OSError("socket gone")

    messages = iter([{"type": "websocket.connect"}, {"type": "websocket.disconnect", "code": 1006}])

    async def receive() -> Message:
        return next(messages)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        assert (await receive())["type"] == "websocket.disconnect"

    scope = {"type": "websocket", "path": "/ws/sessions/s1", "query_string": b""}
    await wrap(app)(scope, receive, send_fails)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"paths": ["ws"]}, "paths must start with '/'"),
        ({"paths": "/ws"}, "not a string"),
        ({"paths": []}, "at least one"),
        ({"paths": ["/ws/{id}"]}, "exactly one '{session_id}'"),
        ({"paths": ["/ws/{session_id}/{session_id}"]}, "exactly one"),
        ({"paths": ["/ws/x{session_id}"]}, "whole path segment"),
        ({"timeout": 0}, "timeout must be a positive"),
        ({"max_bytes": 0}, "max_bytes must be a positive int or None"),
        ({"session_id_param": ""}, "session_id_param"),
        ({"event_type": ""}, "event_type"),
        ({"loader": "not callable"}, "loader must be an async function"),
        # A plain def loader would fail on every connection: refused now, saying async def.
        ({"loader": lambda ctx: {"title": "sync"}}, "async def loader"),
        ({"authenticate": "user"}, "authenticate must be an async function"),
        ({"version_loader": lambda ctx: 1}, "async def version_loader"),
        ({"on_error": 5}, "on_error must be a function"),
        ({"flight_key": None}, "flight_key must be a function"),
        ({"single_flight": "no"}, "single_flight must be True or False"),
        ({"send_synced": "false"}, "send_synced must be True or False"),
        ({"timeout": "5"}, "timeout must be a positive number of seconds"),
        ({"cache_ttl": "1"}, "cache_ttl must be a positive number of seconds or None"),
        ({"queue_timeout": 0}, "queue_timeout must be a positive number of seconds or None"),
        ({"max_bytes": True}, "max_bytes must be a positive int or None"),
        ({"max_bytes": "1"}, "max_bytes must be a positive int or None"),
        ({"max_concurrent_loads": 1.5}, "max_concurrent_loads must be a positive int: got 1.5"),
        ({"since_param": 5}, "since_param must be a non-empty"),
        ({"fence_max_frames": 2.5}, "fence_max_frames must be an int"),
        ({"session_id_param": 3}, "session_id_param must be a non-empty"),
        # A misspelt option names the class the user called, and the option meant.
        (
            {"time_out": 1},
            "SessionSyncMiddleware() got an unexpected keyword argument 'time_out'; "
            "did you mean 'timeout'",
        ),
        (
            {"fence_max_frame": 1},
            "SessionSyncMiddleware() got an unexpected keyword argument 'fence_max_frame'; "
            "did you mean 'fence_max_frames'",
        ),
    ],
)
def test_bad_configuration_fails_at_construction(options: dict[str, Any], message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        wrap(**options)


async def test_authenticate_failure_is_logged_and_app_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def authenticate(scope: Scope) -> str:
        raise PermissionError("bad token")

    loader = RecordingLoader()
    app = wrap(loader=loader, authenticate=authenticate)
    with caplog.at_level(logging.ERROR, logger="asgi_session_sync"):
        async with connect_websocket(app, "/ws/sessions/s1") as ws:
            assert await ws.receive_text() == "hello"
    assert loader.calls == []
    assert any("authenticate failed" in r.getMessage() for r in caplog.records)
    assert app.stats.errors == 1


async def test_resync_loads_afresh_for_the_same_user() -> None:
    versions = iter([1, 2])

    async def versioned(ctx: SessionContext) -> Snapshot:
        return Snapshot({"user": ctx.user}, version=next(versions))

    sync = SessionSync(versioned)
    frames: list[str | None] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        socket = await sync.accept(scope, send, "s1", user="dave")
        frame = await socket.resync()
        frames.append(None if frame is None else frame.text)
        await receive()

    async with connect_websocket(app, "/ws/sessions/s1") as ws:
        assert (await ws.receive_json())["version"] == 1
    assert frames == [
        '{"reset":true,"type":"session_update","session_id":"s1","version":2,"owner":null,'
        '"session":{"user":"dave"}}'
    ]


async def test_app_reading_in_its_own_task_gets_messages_in_order() -> None:
    # Quart and others are already inside receive() in a task of their own when they accept.
    release = anyio.Event()

    async def gated(ctx: SessionContext) -> dict[str, str]:
        await release.wait()
        return {}

    async def reading_app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        async with anyio.create_task_group() as tg:

            async def reader() -> None:
                while (message := await receive())["type"] == "websocket.receive":
                    await send({"type": "websocket.send", "text": "echo:" + message["text"]})
                tg.cancel_scope.cancel()

            tg.start_soon(reader)
            await anyio.lowlevel.checkpoint()  # the reader is waiting in receive()
            release.set()
            await send({"type": "websocket.accept"})

    async with connect_websocket(wrap(reading_app, loader=gated), "/ws/sessions/s1") as ws:
        assert (await ws.receive_json())["type"] == "session_update"
        for n in range(5):
            await ws.send_text(f"m{n}")
        assert [await ws.receive_text() for _ in range(5)] == [f"echo:m{n}" for n in range(5)]


class Fatal(BaseException):
    """A library's own BaseException, neither an Exception nor a cancellation."""


async def test_loader_base_exception_propagates_unwrapped_and_frees_the_flight(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fatal(ctx: SessionContext) -> None:
        raise Fatal("stop")

    app = wrap(loader=fatal)
    with caplog.at_level(logging.ERROR, logger="asgi_session_sync"), pytest.raises(Fatal):
        async with connect_websocket(app, "/ws/sessions/s1"):
            pass
    assert app.sync.fetcher._snapshots.in_flight == 0
    assert "loader raised Fatal, re-raised session_id=s1" in caplog.text


class ExplodingUser:
    """A user object whose ``id`` property raises, as a lazy ORM attribute can."""

    @property
    def id(self) -> str:
        raise LookupError("user row gone")


async def failing_server_send(message: Message) -> None:
    """Stands in for a server whose send raises its own type (hypercorn does)."""
    raise RuntimeError("server refused the frame")


@pytest.mark.parametrize(
    ("options", "scope", "cause"),
    [
        ({}, {"user": ExplodingUser()}, "LookupError: user row gone"),
        ({"flight_key": lambda ctx: 1 / 0}, {}, "ZeroDivisionError"),
        ({"flight_key": lambda ctx: (ctx.session_id, ["role"])}, {}, "unhashable type"),
    ],
    ids=["user-id-property-raises", "flight-key-raises", "flight-key-unhashable"],
)
async def test_failures_outside_the_loader_are_absorbed_like_loader_failures(
    caplog: pytest.LogCaptureFixture, options: dict[str, Any], scope: Scope, cause: str
) -> None:
    errors: list[Exception] = []
    loader = RecordingLoader()
    app = wrap(loader=loader, on_error=lambda ctx, exc: errors.append(exc), **options)
    with caplog.at_level(logging.ERROR, logger="asgi_session_sync"):
        async with connect_websocket(app, "/ws/sessions/s1", scope=scope) as ws:
            assert await ws.receive_text() == "hello"  # no snapshot, and the app goes on
    assert loader.calls == []
    assert app.stats.errors == 1
    assert len(errors) == 1
    assert "loader raised" not in caplog.text
    assert "flight_key raised session_id=s1" in caplog.text
    assert cause in caplog.text


async def test_server_send_failure_on_the_snapshot_is_absorbed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    errors: list[Exception] = []
    sent: list[Message] = []

    async def send(message: Message) -> None:
        if message["type"] == "websocket.send":
            await failing_server_send(message)
        sent.append(message)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "websocket.accept"})

    server = RecordingServer()
    middleware = wrap(app, on_error=lambda ctx, exc: errors.append(exc))
    with caplog.at_level(logging.ERROR, logger="asgi_session_sync"):
        await middleware(server.scope(), server.receive, send)
    assert sent == [{"type": "websocket.accept"}]
    assert [type(e) for e in errors] == [RuntimeError]
    assert middleware.stats.errors == 1
    assert middleware.stats.snapshots_sent == 0
    assert "the server's send raised session_id=s1" in caplog.text
    assert "loader raised" not in caplog.text


@pytest.mark.parametrize(
    "session_id",
    [
        "a\u0085b",  # C1: next line
        "a\u009bb",  # C1: control sequence introducer
        "a\u202eb",  # bidi: right-to-left override
        "a\u2066b",  # bidi: left-to-right isolate
        "a\u200bb",  # zero-width space
        "a\u200db",  # zero-width joiner
        "a\ufeffb",  # zero-width no-break space
        "a\u2028b",  # line separator
        "admin\ufe0f",  # variation selector: looks like "admin"
        "\u3164\u3164",  # Hangul fillers: look blank
        "a\u034fb",  # combining grapheme joiner
        "a\ufffdb",  # replacement character: undecodable bytes
    ],
)
async def test_invisible_and_control_characters_never_pass_a_custom_pattern(
    session_id: str,
) -> None:
    from urllib.parse import quote

    loader = RecordingLoader()
    app = wrap(loader=loader, session_id_pattern=r"[^/]+")
    async with connect_websocket(app, "/ws/sessions/" + quote(session_id)) as ws:
        assert await ws.receive_text() == "hello"
    assert loader.calls == []
    assert app.stats.invalid_ids == 1


async def test_custom_pattern_still_admits_other_unicode() -> None:
    loader = RecordingLoader()
    app = wrap(loader=loader, session_id_pattern=r"[^/]+")
    async with connect_websocket(app, "/ws/sessions/caf%C3%A9-%E4%BC%9A%E8%AF%9D") as ws:
        assert (await ws.receive_json())["session_id"] == "café-会话"


@pytest.mark.parametrize(
    ("root_path", "path"),
    [
        ("/api", "/api/ws/sessions/s1"),  # the ASGI spec: path includes root_path
        ("/api", "/ws/sessions/s1"),  # older servers: path without root_path
        ("", "/ws/sessions/s1"),
    ],
)
async def test_paths_match_the_route_path_under_a_root_path(root_path: str, path: str) -> None:
    loader = RecordingLoader()
    app = wrap(loader=loader)
    async with connect_websocket(app, path, scope={"root_path": root_path}) as ws:
        assert (await ws.receive_json())["session_id"] == "s1"


@pytest.mark.parametrize(
    ("root_path", "path"),
    [("/api", "/apiws/sessions/s1"), ("/api", "/api"), ("/ws", "/ws/ws/sessions")],
)
async def test_root_path_is_removed_only_at_a_segment_boundary(root_path: str, path: str) -> None:
    loader = RecordingLoader()
    async with connect_websocket(wrap(loader=loader), path, scope={"root_path": root_path}) as ws:
        assert await ws.receive_text() == "hello"
    assert loader.calls == []


class GatedLoader:
    """A loader that blocks until ``release`` is set; ``loading`` is set once it is called."""

    def __init__(self) -> None:
        self.loading = anyio.Event()
        self.release = anyio.Event()

    async def __call__(self, ctx: SessionContext) -> dict[str, str]:
        self.loading.set()
        await self.release.wait()
        return {}


async def test_sends_queued_during_the_load_keep_their_order() -> None:
    # Trio wakes a batch of waiters in random order; queued sends must still go out in order.
    for _ in range(5):
        gated = GatedLoader()

        async def app(
            scope: Scope, receive: Receive, send: Send, gated: GatedLoader = gated
        ) -> None:
            await receive()
            async with anyio.create_task_group() as tg:
                tg.start_soon(send, {"type": "websocket.accept"})
                await gated.loading.wait()
                for n in range(8):
                    tg.start_soon(send, {"type": "websocket.send", "text": f"m{n}"})
                    await anyio.lowlevel.checkpoint()  # queued before the next one starts
                gated.release.set()

        server = RecordingServer()
        with anyio.fail_after(5):
            await wrap(app, loader=gated)(server.scope(), server.receive, server.send)
        texts = [m.get("text") for m in server.sent[2:]]
        assert texts == [f"m{n}" for n in range(8)]


async def test_cancelled_queued_send_passes_its_turn_on() -> None:
    gated = GatedLoader()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        async with anyio.create_task_group() as tg:
            tg.start_soon(send, {"type": "websocket.accept"})
            await gated.loading.wait()
            leaver = anyio.CancelScope()
            tg.start_soon(send, {"type": "websocket.send", "text": "first"})
            await anyio.lowlevel.checkpoint()

            async def cancelled_send() -> None:
                with leaver:
                    await send({"type": "websocket.send", "text": "never"})

            tg.start_soon(cancelled_send)
            await anyio.lowlevel.checkpoint()
            leaver.cancel()
            tg.start_soon(send, {"type": "websocket.send", "text": "last"})
            await anyio.lowlevel.checkpoint()
            gated.release.set()

    server = RecordingServer()
    with anyio.fail_after(5):
        await wrap(app, loader=gated)(server.scope(), server.receive, server.send)
    assert [m.get("text") for m in server.sent[2:]] == ["first", "last"]


async def test_accept_authenticates_once_and_its_resync_reuses_the_user() -> None:
    calls: list[str] = []

    async def authenticate(scope: Scope) -> str:
        calls.append("authenticate")
        return "alice"

    loader = RecordingLoader(Snapshot(SESSION, version=1))
    sync = SessionSync(loader, authenticate=authenticate)
    sockets: list[SessionSocket] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        socket = await sync.accept(scope, send, "s1")
        sockets.append(socket)
        assert await socket.resync() is not None
        await receive()

    async with connect_websocket(app, "/ws/sessions/s1") as ws:
        assert (await ws.receive_json())["version"] == 1
    assert calls == ["authenticate"]
    assert [ctx.user for ctx in loader.calls] == ["alice", "alice"]
    assert sockets[0].user == "alice"
    assert sockets[0].version == 1


async def test_accept_with_the_apps_user_never_calls_authenticate() -> None:
    async def authenticate(scope: Scope) -> str:
        raise AssertionError("the app already authenticated the user")

    loader = RecordingLoader()
    sync = SessionSync(loader, authenticate=authenticate)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await sync.accept(scope, send, "s1", user="bob")
        await receive()

    async with connect_websocket(app, "/ws/sessions/s1") as ws:
        assert (await ws.receive_json())["session"] == SESSION
    assert [ctx.user for ctx in loader.calls] == ["bob"]


async def test_accept_refuses_an_invalid_session_id_before_sending() -> None:
    sync = SessionSync(RecordingLoader())
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    with pytest.raises(ValueError, match="invalid session id"):
        await sync.accept({"type": "websocket", "path": "/", "query_string": b""}, send, "a.>")
    assert sent == []
    assert sync.stats.invalid_ids == 1


def test_options_are_one_frozen_config_checked_once() -> None:
    sync = SessionSync(RecordingLoader(), timeout=2.0, cache_ttl=1.0)
    assert (sync.config.timeout, sync.config.cache_ttl) == (2.0, 1.0)
    with pytest.raises(AttributeError):
        sync.config.timeout = 3.0  # type: ignore[misc]
    middleware = SessionSyncMiddleware(greeting_app, sync=sync, paths=["/ws/{session_id}"])
    assert middleware.sync is sync
    assert middleware.stats is sync.stats
    with pytest.raises(ValueError, match="timeout must be a positive"):
        SessionSync(RecordingLoader(), timeout=0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        SessionSync(RecordingLoader(), time_out=1)  # type: ignore[call-arg]


def test_a_given_sync_takes_no_options_of_its_own() -> None:
    sync = SessionSync(RecordingLoader())
    with pytest.raises(TypeError, match="either loader and its options, or sync"):
        SessionSyncMiddleware(greeting_app, sync=sync, paths=["/ws/{session_id}"], timeout=1.0)
    with pytest.raises(TypeError, match="loader is required"):
        SessionSyncMiddleware(greeting_app, paths=["/ws/{session_id}"])


def test_a_configuration_error_is_logged_at_error_before_it_is_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Frameworks build middleware lazily, where a raised error can vanish (uvicorn's
    # --lifespan auto): the log has it too. tests/e2e/test_misconfigured.py runs it for real.
    with (
        caplog.at_level(logging.ERROR, logger="asgi_session_sync"),
        pytest.raises(ValueError, match="drop the converter"),
    ):
        wrap(paths=["/ws/{session_id:int}"])
    [record] = caplog.records
    assert record.levelno == logging.ERROR
    assert record.getMessage().startswith("SessionSyncMiddleware is misconfigured: drop the")

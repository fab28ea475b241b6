"""The Litestar example in-process: its API, its WebSocket and the snapshot, against real NATS.

The app runs with its own lifespan (tables, bridge, the task group that streams responses) on a
temporary SQLite file and a private nats-server, as ``python -m examples.litestar_app`` would.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import httpx
import pytest
from conftest import closed_before_any_frame
from litestar import Litestar
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from test_example_chat import answer_done, follow_session, next_stream_event
from test_sse import open_response

from asgi_session_sync.nats import EmbeddedNats
from asgi_session_sync.testing import WebSocketClient, WebSocketRejected, connect_websocket
from examples.chat.page import page_html
from examples.chat.worker import PUBLISH_INTERVAL, run_worker, simulated_tokens
from examples.litestar_app import Settings, create_app

pytestmark = pytest.mark.anyio

TOKENS = 5
# An answer long enough to act on while it streams: 4 s at 100 tokens a second.
LONG = {"response_tokens": 400, "token_interval": 0.01}
LONG_TEXT = "".join(simulated_tokens(400))
WAIT = 5.0


@pytest.fixture
def anyio_backend() -> str:
    # nats-py and SQLAlchemy's asyncio extension (with aiosqlite) run on asyncio only.
    return "asyncio"


@pytest.fixture
def settings(request: pytest.FixtureRequest, tmp_path: Path, nats_server: EmbeddedNats) -> Settings:
    """The app's settings: short answers, unless a test asks for others (``indirect``)."""
    streaming: dict[str, Any] = {"response_tokens": TOKENS, "token_interval": 0.05}
    return Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}",
        nats_url=nats_server.url,
        **{**streaming, **getattr(request, "param", {})},
    )


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[Litestar]:
    app = create_app(settings)
    # The API with its lifespan, and a response worker beside it, as two processes would run.
    async with app.lifespan(), anyio.create_task_group() as worker:
        worker.start_soon(run_worker, settings.worker())
        yield app
        worker.cancel_scope.cancel()


@pytest.fixture
async def http(app: Litestar) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


async def call(
    http: httpx.AsyncClient, method: str, path: str, user: str | None, body: Any = None
) -> httpx.Response:
    """One API request as ``user`` (``None``: no token), bounded by WAIT."""
    headers = {} if user is None else {"authorization": f"Bearer {user}"}
    with anyio.fail_after(WAIT):
        return await http.request(method, path, json=body, headers=headers)


async def create_session(http: httpx.AsyncClient, user: str = "alice") -> dict[str, Any]:
    response = await call(http, "POST", "/api/sessions", user, {"title": "Demo"})
    assert response.status_code == 201, response.text
    session: dict[str, Any] = response.json()
    return session


async def next_event(ws: WebSocketClient) -> dict[str, Any]:
    event: dict[str, Any] = await ws.receive_json()
    return event


async def test_new_session_arrives_as_the_snapshot_with_its_owner_and_version(
    app: Litestar, http: httpx.AsyncClient
) -> None:
    session = await create_session(http)
    assert session["owner"] == "alice"
    assert session["version"] == 1
    assert session["interactions"] == []

    path = f"/ws/sessions/{session['id']}?token=alice"
    async with connect_websocket(app, path, timeout=WAIT) as ws:
        assert await next_event(ws) == {
            "type": "session_update",
            "session_id": session["id"],
            "owner": "alice",
            "session": session,
            "version": 1,
        }


async def follow(
    ws: WebSocketClient,
    state: dict[str, Any],
    version: int,
    until: Callable[[dict[str, Any]], bool],
) -> tuple[dict[str, Any], int, list[dict[str, Any]]]:
    """Follow ``ws`` from ``state`` at ``version`` until ``until``."""
    return await follow_session(lambda: next_event(ws), state, version, until=until, within=WAIT)


def streaming_with_text(state: dict[str, Any]) -> bool:
    """Whether the first interaction's answer is streaming, and has some text already."""
    interactions = state["interactions"]
    return bool(
        interactions
        and interactions[0]["status"] == "streaming"
        and len(interactions[0]["response"]) > 100
    )


async def test_prompt_streams_its_answer_as_appends_and_ends_done(
    app: Litestar, http: httpx.AsyncClient
) -> None:
    session = await create_session(http)
    async with connect_websocket(app, f"/ws/sessions/{session['id']}?token=alice") as ws:
        snapshot = await next_event(ws)
        assert snapshot["version"] == 1

        prompts = f"/api/sessions/{session['id']}/prompts"
        response = await call(http, "POST", prompts, "alice", {"prompt": "hi"})
        assert response.status_code == 202, response.text
        assert response.json()["interactions"] == [
            {
                "position": 0,
                "prompt": "hi",
                "response": "",
                "status": "pending",
                "done": False,
                "interrupted": None,
            }
        ]

        state, version, frames = await follow(
            ws, snapshot["session"], snapshot["version"], answer_done(0)
        )

    # The prompt, the claim, the answer's new words as appends, its status, then done.
    assert [frame["type"] for frame in frames] == ["session_patch"] * len(frames)
    operations = [op for frame in frames for op in frame["patch"]]
    assert operations[0]["op"] == "add"
    assert operations[1] == {
        "op": "replace",
        "path": "/interactions/0/status",
        "value": "streaming",
    }
    appended = [op["value"] for op in operations if op["op"] == "append"]
    assert "".join(appended) == "".join(simulated_tokens(TOKENS))
    assert state["interactions"][0]["status"] == "complete"
    current = await call(http, "GET", f"/api/sessions/{session['id']}", "alice")
    assert current.json() == {**state, "version": version}


@pytest.mark.parametrize("settings", [LONG], indirect=True)
async def test_a_socket_that_connects_mid_answer_ends_with_the_databases_text(
    app: Litestar, http: httpx.AsyncClient
) -> None:
    session = await create_session(http)
    path = f"/ws/sessions/{session['id']}?token=alice"
    prompts = f"/api/sessions/{session['id']}/prompts"
    async with connect_websocket(app, path) as first:
        snapshot = await next_event(first)
        await call(http, "POST", prompts, "alice", {"prompt": "hi"})
        await follow(first, snapshot["session"], snapshot["version"], streaming_with_text)
    # The first page closed mid-answer: that never stops it.
    async with connect_websocket(app, path) as second:
        snapshot = await next_event(second)
        assert snapshot["type"] == "session_update"
        assert snapshot["session"]["interactions"][0]["status"] == "streaming"
        state, version, _ = await follow(
            second, snapshot["session"], snapshot["version"], answer_done(0)
        )
    current = (await call(http, "GET", f"/api/sessions/{session['id']}", "alice")).json()
    assert current == {**state, "version": version}
    assert current["interactions"][0]["response"] == LONG_TEXT


@pytest.mark.parametrize("settings", [LONG], indirect=True)
async def test_stop_ends_the_answer_cancelled_on_every_socket(
    app: Litestar, http: httpx.AsyncClient
) -> None:
    session = await create_session(http)
    path = f"/ws/sessions/{session['id']}?token=alice"
    stop = f"/api/sessions/{session['id']}/interactions/0/stop"
    async with connect_websocket(app, path) as one, connect_websocket(app, path) as other:
        first, second = await next_event(one), await next_event(other)
        await call(http, "POST", f"/api/sessions/{session['id']}/prompts", "alice", {"prompt": "x"})
        state, version, _ = await follow(
            one, first["session"], first["version"], streaming_with_text
        )
        assert (await call(http, "POST", stop, "bob")).status_code == 404

        response = await call(http, "POST", stop, "alice")

        assert response.status_code == 202, response.text
        assert response.json() == {"position": 0, "outcome": "stopping"}
        state, version, _ = await follow(one, state, version, answer_done(0))
        other_state, other_version, _ = await follow(
            other, second["session"], second["version"], answer_done(0)
        )
    assert (other_state, other_version) == (state, version)
    stopped = state["interactions"][0]
    assert (stopped["status"], stopped["done"]) == ("cancelled", True)
    assert LONG_TEXT.startswith(stopped["response"])
    assert len(stopped["response"]) < len(LONG_TEXT)
    current = await call(http, "GET", f"/api/sessions/{session['id']}", "alice")
    assert current.json() == {**state, "version": version}
    assert (await call(http, "POST", stop, "alice")).status_code == 409
    missing = f"/api/sessions/{session['id']}/interactions/1/stop"
    assert (await call(http, "POST", missing, "alice")).status_code == 404


async def test_resuming_client_that_is_current_gets_updates_but_no_snapshot(
    app: Litestar, http: httpx.AsyncClient
) -> None:
    session = await create_session(http)
    path = f"/ws/sessions/{session['id']}?token=alice&since=1"
    async with connect_websocket(app, path, timeout=WAIT) as ws:
        prompts = f"/api/sessions/{session['id']}/prompts"
        response = await call(http, "POST", prompts, "alice", {"prompt": "hi"})
        assert response.status_code == 202, response.text
        # The first frame is the prompt's update: the version loader found the client current.
        assert (await next_event(ws))["version"] == 2


async def test_another_user_never_sees_the_session(app: Litestar, http: httpx.AsyncClient) -> None:
    session = await create_session(http)
    base = f"/api/sessions/{session['id']}"
    socket = f"/ws/sessions/{session['id']}"

    assert (await call(http, "GET", base, "bob")).status_code == 404
    assert (await call(http, "POST", f"{base}/prompts", "bob", {"prompt": "x"})).status_code == 404
    assert (await call(http, "POST", f"{base}/interactions/0/stop", "bob")).status_code == 404
    assert (await call(http, "GET", base, None)).status_code == 401
    # The loader refused bob's snapshot, so the socket closes before forwarding any update;
    # resuming with the current version does not skip the check (the version loader checks too).
    assert await closed_before_any_frame(app, f"{socket}?token=bob") == 1008
    assert await closed_before_any_frame(app, f"{socket}?token=bob&since=1") == 1008
    # No user at all: refused before accepting.
    for query in ("", "?token=not%20a%20token"):
        with pytest.raises(WebSocketRejected) as rejected:
            async with connect_websocket(app, f"{socket}{query}"):
                pass
        assert rejected.value.code == 1008

    # Bob's prompt changed nothing, and alice still gets her session.
    current = await call(http, "GET", base, "alice")
    assert current.json() == session


async def test_a_failed_load_closes_with_1011_so_the_page_retries(
    app: Litestar, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    session = await create_session(http)
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}")
    try:
        async with engine.begin() as connection:
            # Broken for good: a dropped table would come back with the worker's create_all,
            # which may start after this test does; a renamed column does not.
            await connection.execute(text("ALTER TABLE interactions RENAME COLUMN prompt TO lost"))
    finally:
        await engine.dispose()
    path = f"/ws/sessions/{session['id']}?token=alice"
    assert await closed_before_any_frame(app, path) == 1011


async def test_unknown_and_invalid_session_ids_are_refused(
    app: Litestar, http: httpx.AsyncClient
) -> None:
    for session_id in ("0" * 32, "a.b", "x" * 300):
        response = await call(http, "GET", f"/api/sessions/{session_id}", "alice")
        assert response.status_code == 404
    # A well-formed id: the loader finds nothing, so the socket closes before any frame.
    assert await closed_before_any_frame(app, f"/ws/sessions/{'0' * 32}?token=alice") == 1008
    # A malformed one never reaches the loader, or NATS: refused before accepting.
    for session_id in ("a.b", "x" * 300):
        with pytest.raises(WebSocketRejected) as rejected:
            async with connect_websocket(app, f"/ws/sessions/{session_id}?token=alice"):
                pass
        assert rejected.value.code == 1008


async def test_event_stream_sends_the_snapshot_first_then_the_answer_with_versions_as_ids(
    app: Litestar, http: httpx.AsyncClient
) -> None:
    session = await create_session(http)
    async with open_response(app, f"/sse/sessions/{session['id']}", query="token=alice") as sse:
        await sse.started()
        assert sse.status == 200
        assert sse.header("content-type") == "text/event-stream; charset=utf-8"
        assert sse.header("x-accel-buffering") == "no"
        snapshot = await next_stream_event(sse)
        assert snapshot == {
            "type": "session_update",
            "session_id": session["id"],
            "owner": "alice",
            "session": session,
            "version": 1,
        }
        prompts = f"/api/sessions/{session['id']}/prompts"
        assert (await call(http, "POST", prompts, "alice", {"prompt": "hi"})).status_code == 202
        state, version, frames = await follow_session(
            lambda: next_stream_event(sse), session, 1, until=answer_done(0), within=WAIT
        )
    # The same patches a WebSocket gets: the prompt, the claim, appends of the new words.
    assert [frame["type"] for frame in frames] == ["session_patch"] * len(frames)
    appends = [op for frame in frames for op in frame["patch"] if op["op"] == "append"]
    assert "".join(op["value"] for op in appends) == "".join(simulated_tokens(TOKENS))
    current = (await call(http, "GET", f"/api/sessions/{session['id']}", "alice")).json()
    assert current == {**state, "version": version}
    assert current["interactions"][0]["status"] == "complete"


async def test_event_stream_resuming_with_last_event_id_gets_only_what_is_newer(
    app: Litestar, http: httpx.AsyncClient
) -> None:
    session = await create_session(http)
    path = f"/sse/sessions/{session['id']}"
    async with open_response(
        app, path, query="token=alice", headers=[("last-event-id", "1")]
    ) as sse:
        await sse.started()
        prompts = f"/api/sessions/{session['id']}/prompts"
        assert (await call(http, "POST", prompts, "alice", {"prompt": "hi"})).status_code == 202
        # The version loader found the client current: the first event is the next update.
        first = await next_stream_event(sse)
        assert (first["type"], first["base_version"], first["version"]) == ("session_patch", 1, 2)


async def test_event_stream_of_another_user_is_refused_without_a_stream(
    app: Litestar, http: httpx.AsyncClient
) -> None:
    session = await create_session(http)
    prompts = f"/api/sessions/{session['id']}/prompts"
    assert (await call(http, "POST", prompts, "alice", {"prompt": "secret"})).status_code == 202
    cases = [
        (session["id"], "token=bob", 404),
        (session["id"], "token=bob&since=1", 404),
        (session["id"], "", 401),
        (session["id"], "token=not%20a%20token", 401),
        ("0" * 32, "token=alice", 404),
        ("a.b", "token=alice", 404),
        ("x" * 300, "token=alice", 404),
    ]
    for session_id, query, status in cases:
        async with open_response(app, f"/sse/sessions/{session_id}", query=query) as sse:
            body = await sse.read_to_end()
        assert sse.status == status, (session_id, query)
        assert sse.header("content-type") == "application/json", (session_id, query)
        assert b"secret" not in body


async def test_event_stream_of_a_failed_load_ends_so_the_page_retries(
    app: Litestar, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    session = await create_session(http)
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}")
    try:
        async with engine.begin() as connection:
            # Broken for good: a dropped table would come back with the worker's create_all,
            # which may start after this test does; a renamed column does not.
            await connection.execute(text("ALTER TABLE interactions RENAME COLUMN prompt TO lost"))
    finally:
        await engine.dispose()
    async with open_response(app, f"/sse/sessions/{session['id']}", query="token=alice") as sse:
        body = await sse.read_to_end()
    # Started (its status cannot change now), no event, and ended: EventSource reports an
    # error, and the page's client opens it again after its backoff.
    assert sse.status == 200
    assert sse.complete
    assert body == b": open\n\n"


async def test_page_is_the_shared_one_with_its_files_and_the_client(
    http: httpx.AsyncClient,
) -> None:
    page = await call(http, "GET", "/", None)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.text == page_html("Litestar")
    assert "<title>Live chat · asgi-session-sync Litestar example</title>" in page.text
    # The same page as the FastAPI example's, but for the framework's name.
    assert page.text == page_html("FastAPI").replace("FastAPI", "Litestar")
    for path, content_type, needle in [
        ("/static/chat/chat.css", "text/css", ".pill"),
        ("/static/chat/chat.js", "text/javascript", "/static/session-sync/session-sync.js"),
        ("/static/session-sync/session-sync.js", "text/javascript", "export class SessionSync"),
    ]:
        response = await call(http, "GET", path, None)
        assert response.status_code == 200, path
        assert response.headers["content-type"].startswith(content_type), path
        assert needle in response.text, path


async def test_demo_names_the_api_and_the_running_worker(http: httpx.AsyncClient) -> None:
    assert (await call(http, "GET", "/api/demo", None)).status_code == 401
    # The worker runs in this process here: once it is up, it answers the roll call.
    with anyio.fail_after(WAIT):
        while not (demo := (await call(http, "GET", "/api/demo", "alice")).json())["workers"]:
            pass  # each look waits for the roll call's answers
    assert demo["api_pid"] == os.getpid()
    assert [worker["pid"] for worker in demo["workers"]] == [os.getpid()]
    assert (demo["framework"], demo["module"]) == ("Litestar", "examples.litestar_app")
    assert demo["response_tokens"] == TOKENS
    assert (demo["token_interval"], demo["publish_interval"]) == (0.05, PUBLISH_INTERVAL)


async def test_bad_bodies_get_400(app: Litestar, http: httpx.AsyncClient) -> None:
    session = await create_session(http)
    prompts = f"/api/sessions/{session['id']}/prompts"
    response = await call(http, "POST", prompts, "alice", {"prompt": ""})
    assert response.status_code == 400
    assert response.json()["status_code"] == 400


def test_settings_from_the_environment() -> None:
    settings = Settings.from_env(
        {"DATABASE_URL": "postgresql://u:p@db/chat", "NATS_URL": "nats://n:4222", "PORT": "9000"}
    )
    assert settings.database_url == "postgresql+asyncpg://u:p@db/chat"
    assert settings.nats_url == "nats://n:4222"
    assert (settings.host, settings.port) == ("127.0.0.1", 9000)
    defaults = Settings.from_env({})
    assert defaults.database_url.startswith("sqlite+aiosqlite:///")
    assert (defaults.nats_url, defaults.port, defaults.nats_port) == (None, 8001, 4224)
    assert Settings(database_url="postgres://u@db/chat").database_url == (
        "postgresql+asyncpg://u@db/chat"
    )
    with pytest.raises(ValueError, match="PORT"):
        Settings.from_env({"PORT": "http"})


async def test_ids_with_nul_or_newline_get_404_and_never_reach_the_logs(
    app: Litestar, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    forged = "x\nERROR forged log line"
    for raw in ("a%00b", "a%0Ab", quote(forged, safe="")):
        response = await call(http, "GET", f"/api/sessions/{raw}", "alice")
        assert response.status_code == 404, (raw, response.text)
        prompts = await call(http, "POST", f"/api/sessions/{raw}/prompts", "alice", {"prompt": "x"})
        assert prompts.status_code == 404
    for record in caplog.records:
        message = record.getMessage()
        assert "\x00" not in message
        assert "\nERROR forged" not in message

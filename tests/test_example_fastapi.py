"""The FastAPI example in-process: its API and its WebSocket, on SQLite and a real nats-server."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from conftest import closed_before_any_frame
from fastapi import FastAPI
from sqlalchemy import text
from test_example_chat import answer_done, follow_session, next_stream_event
from test_sse import open_response

from asgi_session_sync import SessionSync
from asgi_session_sync.nats import EmbeddedNats
from asgi_session_sync.testing import WebSocketClient, WebSocketRejected, connect_websocket
from examples.chat.events import SessionEvents
from examples.chat.page import page_html
from examples.chat.worker import PUBLISH_INTERVAL, run_worker, simulated_tokens
from examples.fastapi_app import Settings, create_app

pytestmark = pytest.mark.anyio

TOKENS = 5
FINAL_TEXT = "".join(simulated_tokens(TOKENS))
# An answer long enough to act on while it streams: 4 s at 100 tokens a second.
LONG = {"response_tokens": 400, "token_interval": 0.01}
LONG_TEXT = "".join(simulated_tokens(400))
ALICE = {"Authorization": "Bearer alice"}
BOB = {"Authorization": "Bearer bob"}
WAIT = 5.0
# Bound on a whole test, its app's lifespan included.
TEST_WAIT = 30.0


@pytest.fixture
def anyio_backend() -> str:
    # nats-py and SQLAlchemy's asyncio extension run on asyncio only.
    return "asyncio"


@pytest.fixture
def settings(request: pytest.FixtureRequest, tmp_path: Path, nats_server: EmbeddedNats) -> Settings:
    """The app's settings: short answers, unless a test asks for others (``indirect``)."""
    streaming: dict[str, Any] = {"response_tokens": TOKENS, "token_interval": 0.05}
    return Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'example.sqlite3'}",
        nats_url=nats_server.url,
        **{**streaming, **getattr(request, "param", {})},
    )


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    """The API with its lifespan, and a response worker beside it, as two processes would run."""
    app = create_app(settings)
    with anyio.fail_after(TEST_WAIT):
        async with app.router.lifespan_context(app), anyio.create_task_group() as worker:
            worker.start_soon(run_worker, settings.worker())
            yield app
            worker.cancel_scope.cancel()


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


async def create_session(client: httpx.AsyncClient, title: str = "Demo") -> dict[str, Any]:
    response = await client.post("/api/sessions", json={"title": title}, headers=ALICE)
    assert response.status_code == 201, response.text
    session: dict[str, Any] = response.json()
    return session


async def receive_event(ws: WebSocketClient) -> dict[str, Any]:
    event: dict[str, Any] = await ws.receive_json()
    return event


async def test_created_session_is_the_first_frame_with_owner_and_version(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    session = await create_session(client)
    assert session["owner"] == "alice"
    assert session["version"] == 1

    async with connect_websocket(app, f"/ws/sessions/{session['id']}?token=alice") as ws:
        assert await receive_event(ws) == {
            "type": "session_update",
            "session_id": session["id"],
            "owner": "alice",
            "session": session,
            "version": 1,
        }


def streaming_with_text(state: dict[str, Any]) -> bool:
    """Whether the first interaction's answer is streaming, and has some text already."""
    interactions = state["interactions"]
    return bool(
        interactions
        and interactions[0]["status"] == "streaming"
        and len(interactions[0]["response"]) > 100
    )


async def follow(
    ws: WebSocketClient, event: dict[str, Any], until: Callable[[dict[str, Any]], bool]
) -> tuple[dict[str, Any], int, list[dict[str, Any]]]:
    """Follow ``ws`` from ``event`` (its first frame, a snapshot) until ``until``."""
    assert event["type"] == "session_update"
    return await follow_session(
        lambda: receive_event(ws), event["session"], event["version"], until=until, within=WAIT
    )


async def test_prompt_streams_its_answer_as_appends_and_ends_done(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    session = await create_session(client)
    async with connect_websocket(app, f"/ws/sessions/{session['id']}?token=alice") as ws:
        snapshot = await receive_event(ws)
        assert snapshot["version"] == 1
        response = await client.post(
            f"/api/sessions/{session['id']}/prompts", json={"prompt": "hello"}, headers=ALICE
        )
        assert response.status_code == 202, response.text
        assert response.json()["version"] == 2
        assert response.json()["interactions"][0]["status"] == "pending"
        state, version, frames = await follow(ws, snapshot, answer_done(0))

    assert all(frame["type"] == "session_patch" for frame in frames)
    assert all(frame["owner"] == "alice" for frame in frames)
    prompt, claim, *streamed, end = (frame["patch"] for frame in frames)
    assert [(op["op"], op["path"]) for op in prompt] == [("add", "/interactions/-")]
    assert claim == [{"op": "replace", "path": "/interactions/0/status", "value": "streaming"}]
    assert (frames[1]["base_version"], frames[1]["version"]) == (2, 3)
    # The answer's text comes as appends of its new words only, never the text so far.
    appends = [op for ops in streamed for op in ops if op["op"] == "append"]
    assert "".join(op["value"] for op in appends) == FINAL_TEXT
    assert {op["path"] for op in appends} == {"/interactions/0/response"}
    assert {"op": "replace", "path": "/interactions/0/status", "value": "complete"} in streamed[-1]
    # Then, one commit later, done.
    assert {"op": "replace", "path": "/interactions/0/done", "value": True} in end

    current = (await client.get(f"/api/sessions/{session['id']}", headers=ALICE)).json()
    assert current == {**state, "version": version}
    assert current["interactions"] == [
        {
            "position": 0,
            "prompt": "hello",
            "response": FINAL_TEXT,
            "status": "complete",
            "done": True,
            "interrupted": None,
        }
    ]


@pytest.mark.parametrize("settings", [LONG], indirect=True)
async def test_a_socket_that_connects_mid_answer_ends_with_the_databases_text(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    session = await create_session(client)
    path = f"/ws/sessions/{session['id']}?token=alice"
    async with connect_websocket(app, path) as first:
        snapshot = await receive_event(first)
        await client.post(
            f"/api/sessions/{session['id']}/prompts", json={"prompt": "hi"}, headers=ALICE
        )
        await follow(first, snapshot, streaming_with_text)
    # The first page closed mid-answer: that never stops it.
    async with connect_websocket(app, path) as second:
        snapshot = await receive_event(second)
        # From the database: mid-answer, up to a checkpoint behind the stream.
        assert snapshot["session"]["interactions"][0]["status"] == "streaming"
        assert LONG_TEXT.startswith(snapshot["session"]["interactions"][0]["response"])
        state, version, _ = await follow(second, snapshot, answer_done(0))

    current = (await client.get(f"/api/sessions/{session['id']}", headers=ALICE)).json()
    assert current == {**state, "version": version}
    assert current["interactions"][0]["response"] == LONG_TEXT
    assert current["interactions"][0]["status"] == "complete"


@pytest.mark.parametrize("settings", [LONG], indirect=True)
async def test_stop_ends_the_answer_cancelled_and_the_worker_stops_generating(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    session = await create_session(client)
    stop = f"/api/sessions/{session['id']}/interactions/0/stop"
    async with connect_websocket(app, f"/ws/sessions/{session['id']}?token=alice") as ws:
        snapshot = await receive_event(ws)
        await client.post(
            f"/api/sessions/{session['id']}/prompts", json={"prompt": "hi"}, headers=ALICE
        )
        state, version, _ = await follow(ws, snapshot, streaming_with_text)
        assert (await client.post(stop, headers=BOB)).status_code == 404

        response = await client.post(stop, headers=ALICE)

        assert response.status_code == 202, response.text
        assert response.json() == {"position": 0, "outcome": "stopping"}
        state, version, _ = await follow_session(
            lambda: receive_event(ws), state, version, until=answer_done(0), within=WAIT
        )
    stopped = state["interactions"][0]
    assert (stopped["status"], stopped["done"], stopped["interrupted"]) == ("cancelled", True, None)
    # The worker stopped generating: the text is what it had, short of the whole answer.
    assert LONG_TEXT.startswith(stopped["response"])
    assert len(stopped["response"]) < len(LONG_TEXT)
    current = (await client.get(f"/api/sessions/{session['id']}", headers=ALICE)).json()
    assert current == {**state, "version": version}
    # It has ended: another stop is refused.
    assert (await client.post(stop, headers=ALICE)).status_code == 409


@pytest.mark.parametrize("settings", [LONG], indirect=True)
async def test_stop_cancels_a_prompt_still_waiting_for_its_turn(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    session = await create_session(client)
    prompts = f"/api/sessions/{session['id']}/prompts"
    async with connect_websocket(app, f"/ws/sessions/{session['id']}?token=alice") as ws:
        snapshot = await receive_event(ws)
        await client.post(prompts, json={"prompt": "first"}, headers=ALICE)
        await client.post(prompts, json={"prompt": "second"}, headers=ALICE)
        # One answer per session at a time: the second waits while the first streams.
        state, version, _ = await follow(ws, snapshot, streaming_with_text)
        assert state["interactions"][1]["status"] == "pending"

        second = await client.post(
            f"/api/sessions/{session['id']}/interactions/1/stop", headers=ALICE
        )

        assert second.status_code == 200, second.text
        assert second.json() == {"position": 1, "outcome": "cancelled"}
        state, version, _ = await follow_session(
            lambda: receive_event(ws), state, version, until=answer_done(1), within=WAIT
        )
        assert state["interactions"][1]["status"] == "cancelled"
        assert state["interactions"][1]["response"] == ""
        assert state["interactions"][0]["status"] == "streaming"
        first = await client.post(
            f"/api/sessions/{session['id']}/interactions/0/stop", headers=ALICE
        )
        assert first.status_code == 202, first.text
        state, version, _ = await follow_session(
            lambda: receive_event(ws), state, version, until=answer_done(0), within=WAIT
        )
    assert state["interactions"][0]["status"] == "cancelled"
    missing = await client.post(f"/api/sessions/{session['id']}/interactions/2/stop", headers=ALICE)
    assert missing.status_code == 404
    assert (
        await client.post(f"/api/sessions/{'0' * 32}/interactions/0/stop", headers=ALICE)
    ).status_code == 404


async def test_another_user_never_sees_the_session(app: FastAPI, client: httpx.AsyncClient) -> None:
    session = await create_session(client)
    path = f"/api/sessions/{session['id']}"
    socket = f"/ws/sessions/{session['id']}"

    assert (await client.get(path, headers=BOB)).status_code == 404
    prompt = await client.post(f"{path}/prompts", json={"prompt": "mine now"}, headers=BOB)
    assert prompt.status_code == 404
    # The loader refused bob's snapshot, so the socket closes before forwarding any update;
    # resuming with the current version does not skip the check (the version loader checks too).
    assert await closed_before_any_frame(app, f"{socket}?token=bob") == 1008
    assert await closed_before_any_frame(app, f"{socket}?token=bob&since=1") == 1008
    # Nobody at all: 401 on HTTP, refused before accepting on the WebSocket.
    assert (await client.get(path)).status_code == 401
    assert (await client.post(f"{path}/interactions/0/stop")).status_code == 401
    with pytest.raises(WebSocketRejected) as rejected:
        async with connect_websocket(app, socket):
            pass
    assert rejected.value.code == 1008
    # Alice's session is untouched, and bob's sockets were never sent a frame of it.
    assert (await client.get(path, headers=ALICE)).json() == session
    sync: SessionSync = app.state.sync
    assert sync.stats.snapshots_sent == 0
    assert app.state.bridge.stats.updates_forwarded == 0


async def test_a_session_that_does_not_exist_is_closed_without_a_frame(app: FastAPI) -> None:
    assert await closed_before_any_frame(app, f"/ws/sessions/{'0' * 32}?token=alice") == 1008


async def test_a_failed_load_closes_with_1011_so_the_page_retries(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    session = await create_session(client)
    async with app.state.store.engine.begin() as connection:
        # Broken for good: a dropped table would come back with the worker's create_all, which
        # may start after this test does; a renamed column does not.
        await connection.execute(text("ALTER TABLE interactions RENAME COLUMN prompt TO lost"))
    assert await closed_before_any_frame(app, f"/ws/sessions/{session['id']}?token=alice") == 1011
    sync: SessionSync = app.state.sync
    assert sync.stats.errors == 1


async def test_current_client_resuming_gets_no_snapshot_only_new_updates(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    session = await create_session(client)
    async with connect_websocket(app, f"/ws/sessions/{session['id']}?token=alice&since=1") as ws:
        await client.post(
            f"/api/sessions/{session['id']}/prompts", json={"prompt": "hi"}, headers=ALICE
        )
        # The version loader found the client current: the first frame is the next update.
        assert (await receive_event(ws))["version"] == 2


async def test_event_stream_sends_the_snapshot_first_then_the_answer_with_versions_as_ids(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    session = await create_session(client)
    async with open_response(app, f"/sse/sessions/{session['id']}", query="token=alice") as sse:
        await sse.started()
        assert sse.status == 200
        assert sse.header("content-type") == "text/event-stream; charset=utf-8"
        assert sse.header("cache-control") == "no-cache"
        snapshot = await next_stream_event(sse)
        assert snapshot == {
            "type": "session_update",
            "session_id": session["id"],
            "owner": "alice",
            "session": session,
            "version": 1,
        }
        await client.post(
            f"/api/sessions/{session['id']}/prompts", json={"prompt": "hello"}, headers=ALICE
        )
        state, version, frames = await follow_session(
            lambda: next_stream_event(sse), session, 1, until=answer_done(0), within=WAIT
        )
    # The same patches a WebSocket gets: the prompt, the claim, appends of the new words.
    assert [frame["type"] for frame in frames] == ["session_patch"] * len(frames)
    appends = [op for frame in frames for op in frame["patch"] if op["op"] == "append"]
    assert "".join(op["value"] for op in appends) == FINAL_TEXT
    current = (await client.get(f"/api/sessions/{session['id']}", headers=ALICE)).json()
    assert current == {**state, "version": version}
    assert current["interactions"][0]["status"] == "complete"


async def test_event_stream_resuming_with_since_gets_only_what_is_newer(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    # What the page's client does after a failure: a new EventSource with ?since=<version>.
    session = await create_session(client)
    path = f"/sse/sessions/{session['id']}"
    async with open_response(app, path, query="token=alice&since=1") as sse:
        await sse.started()
        await client.post(
            f"/api/sessions/{session['id']}/prompts", json={"prompt": "hi"}, headers=ALICE
        )
        # The version loader found the client current: the first event is the next update.
        first = await next_stream_event(sse)
        assert (first["type"], first["base_version"], first["version"]) == ("session_patch", 1, 2)
    assert sse.parser.comments[0] == "open"  # the stream opened with a comment, not a snapshot


async def test_a_quiet_event_stream_gets_comment_heartbeats(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    # The route's app with a short heartbeat: a comment after each period of quiet, which
    # EventSource never shows, and which keeps a proxy from closing the stream.
    session = await create_session(client)
    events = SessionEvents(app.state.sync, app.state.bridge, session["id"], "alice", heartbeat=0.05)
    async with open_response(events, f"/sse/sessions/{session['id']}") as sse:
        assert (await next_stream_event(sse))["version"] == 1
        await sse.wait_for(lambda: sse.parser.comments.count("heartbeat") >= 2)
        assert sse.body.endswith(b": heartbeat\n\n")


async def test_event_stream_of_another_user_is_refused_without_a_stream(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    session = await create_session(client)
    await client.post(
        f"/api/sessions/{session['id']}/prompts", json={"prompt": "secret"}, headers=ALICE
    )
    path = f"/sse/sessions/{session['id']}"
    for query, status in [
        ("token=bob", 404),
        ("token=bob&since=1", 404),
        ("", 401),
        ("token=bad!token", 401),
    ]:
        async with open_response(app, path, query=query) as sse:
            body = await sse.read_to_end()
        assert sse.status == status, query
        assert sse.header("content-type") == "application/json", query
        assert b"secret" not in body
    async with open_response(app, f"/sse/sessions/{'0' * 32}", query="token=alice") as sse:
        await sse.read_to_end()
    assert sse.status == 404
    async with open_response(app, "/sse/sessions/not-a-session", query="token=alice") as sse:
        await sse.read_to_end()
    assert sse.status == 422
    sync: SessionSync = app.state.sync
    assert sync.stats.connections == 0
    assert app.state.bridge.stats.updates_forwarded == 0


async def test_event_stream_of_a_failed_load_ends_so_the_page_retries(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    session = await create_session(client)
    async with app.state.store.engine.begin() as connection:
        # Broken for good: a dropped table would come back with the worker's create_all, which
        # may start after this test does; a renamed column does not.
        await connection.execute(text("ALTER TABLE interactions RENAME COLUMN prompt TO lost"))
    # SQLite may keep the app's first query waiting on a lock for up to its busy timeout (5 s),
    # with the example's worker and lease sweeper failing on the same database meanwhile.
    path = f"/sse/sessions/{session['id']}"
    async with open_response(app, path, query="token=alice", timeout=15.0) as sse:
        body = await sse.read_to_end()
    # Started (its status cannot change now), no event, and ended: EventSource reports an
    # error, and the page's client opens it again after its backoff.
    assert sse.status == 200
    assert sse.complete
    assert body == b": open\n\n"
    sync: SessionSync = app.state.sync
    assert sync.stats.errors == 1


async def test_openapi_documents_the_event_stream(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    responses = schema["paths"]["/sse/sessions/{session_id}"]["get"]["responses"]
    assert set(responses) == {"200", "401", "404", "422"}
    assert list(responses["200"]["content"]) == ["text/event-stream"]


async def test_invalid_session_ids_are_refused(app: FastAPI, client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/sessions/not-a-session", headers=ALICE)).status_code == 422
    with pytest.raises(WebSocketRejected):
        async with connect_websocket(app, "/ws/sessions/not-a-session?token=alice"):
            pass


async def test_page_is_the_shared_one_with_its_files_and_the_client(
    client: httpx.AsyncClient,
) -> None:
    page = await client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.text == page_html("FastAPI")
    assert "<title>Live chat · asgi-session-sync FastAPI example</title>" in page.text
    # The page's files and the shipped client, at the paths both examples serve them.
    for path, content_type, needle in [
        ("/static/chat/chat.css", "text/css", ".pill"),
        ("/static/chat/chat.js", "text/javascript", "/static/session-sync/session-sync.js"),
        ("/static/session-sync/session-sync.js", "text/javascript", "export class SessionSync"),
    ]:
        response = await client.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"].startswith(content_type), path
        assert needle in response.text, path


async def test_demo_names_the_api_and_the_running_worker(client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/demo")).status_code == 401
    # The worker runs in this process here: once it is up, it answers the roll call.
    with anyio.fail_after(WAIT):
        while not (demo := (await client.get("/api/demo", headers=ALICE)).json())["workers"]:
            pass  # each look waits for the roll call's answers
    assert demo["api_pid"] == os.getpid()
    assert [worker["pid"] for worker in demo["workers"]] == [os.getpid()]
    assert (demo["framework"], demo["module"]) == ("FastAPI", "examples.fastapi_app")
    assert demo["response_tokens"] == TOKENS
    assert (demo["token_interval"], demo["publish_interval"]) == (0.05, PUBLISH_INTERVAL)
    assert demo["lease_seconds"] == Settings().lease_seconds


def test_settings_come_from_the_environment() -> None:
    assert Settings.from_env({}) == Settings()
    # Realistic answers by default: 400 tokens at 50 a second.
    assert (Settings().response_tokens, Settings().token_interval) == (400, 0.02)
    worker = Settings(nats_url="nats://nats:4222").worker()
    assert (worker.tokens, worker.token_interval) == (400, 0.02)
    settings = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://app:secret@db:5432/chat",
            "NATS_URL": "nats://nats:4222",
            "HOST": "0.0.0.0",
            "PORT": "9000",
            "LEASE_SECONDS": "2",
            "RESPONSE_TOKENS": "40",
            "TOKEN_INTERVAL": "0.1",
        }
    )
    assert settings.database_url == "postgresql+asyncpg://app:secret@db:5432/chat"
    assert settings.nats_url == "nats://nats:4222"
    assert (settings.host, settings.port) == ("0.0.0.0", 9000)
    assert (settings.lease_seconds, settings.response_tokens, settings.token_interval) == (
        2.0,
        40,
        0.1,
    )
    assert settings.worker().nats_url == "nats://nats:4222"
    # Without NATS_URL, the worker finds the API's private server on its pinned port, with the
    # password the launcher gave both processes; without the password it cannot get in.
    worker = Settings.from_env({"NATS_PORT": "4300", "NATS_PASSWORD": "pw"}).worker()
    assert worker.nats_url == "nats://chat:pw@127.0.0.1:4300"
    with pytest.raises(ValueError, match="NATS_PASSWORD"):
        Settings.from_env({"NATS_PORT": "4300"}).worker()
    assert Settings(database_url="sqlite:///x.db").database_url == "sqlite+aiosqlite:///x.db"
    with pytest.raises(ValueError, match="PORT must be an integer"):
        Settings.from_env({"PORT": "http"})
    with pytest.raises(ValueError, match="LEASE_SECONDS must be > 0"):
        Settings.from_env({"LEASE_SECONDS": "0"})

"""The FastAPI example in-process: its API and its WebSocket, on SQLite and a real nats-server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from conftest import closed_before_any_frame, follow_a_prompt
from fastapi import FastAPI
from sqlalchemy import text

from asgi_session_sync import SessionSync
from asgi_session_sync.nats import EmbeddedNats
from asgi_session_sync.testing import WebSocketClient, WebSocketRejected, connect_websocket
from examples.chat.worker import run_worker, simulated_tokens
from examples.fastapi_app import Settings, create_app

pytestmark = pytest.mark.anyio

TOKENS = 5
FINAL_TEXT = "".join(simulated_tokens(TOKENS))
ALICE = {"Authorization": "Bearer alice"}
BOB = {"Authorization": "Bearer bob"}
WAIT = 5.0


@pytest.fixture
def anyio_backend() -> str:
    # nats-py and SQLAlchemy's asyncio extension run on asyncio only.
    return "asyncio"


@pytest.fixture
def settings(tmp_path: Path, nats_server: EmbeddedNats) -> Settings:
    return Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'example.sqlite3'}",
        nats_url=nats_server.url,
        response_tokens=TOKENS,
        token_interval=0.05,
    )


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    """The API with its lifespan, and a response worker beside it, as two processes would run."""
    app = create_app(settings)
    with anyio.fail_after(WAIT):
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


async def test_prompt_streams_tokens_as_patches_chained_version_by_version(
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
        state, patches = await follow_a_prompt(lambda: receive_event(ws), snapshot, within=WAIT)

    # One patch per token, each one version on from the last: the response so far, no more.
    assert all(p["type"] == "session_patch" for p in patches)
    assert all(p["owner"] == "alice" for p in patches)
    assert [(p["base_version"], p["version"]) for p in patches] == [
        (v, v + 1) for v in range(2, TOKENS + 2)
    ]
    responses = [p["patch"][0]["value"] for p in patches]
    assert responses == ["".join(simulated_tokens(n)) for n in range(1, TOKENS + 1)]

    current = (await client.get(f"/api/sessions/{session['id']}", headers=ALICE)).json()
    assert current == {**state, "version": TOKENS + 2}
    assert current["interactions"] == [
        {
            "position": 0,
            "prompt": "hello",
            "response": FINAL_TEXT,
            "done": True,
            "interrupted": None,
        }
    ]


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
        await connection.execute(text("DROP TABLE interactions"))  # the database is broken
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


async def test_invalid_session_ids_are_refused(app: FastAPI, client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/sessions/not-a-session", headers=ALICE)).status_code == 422
    with pytest.raises(WebSocketRejected):
        async with connect_websocket(app, "/ws/sessions/not-a-session?token=alice"):
            pass


async def test_page_loads_the_shipped_client(client: httpx.AsyncClient) -> None:
    page = await client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert 'import { SessionSync } from "/static/session-sync/session-sync.js";' in page.text
    assert 'id="state"' in page.text
    script = await client.get("/static/session-sync/session-sync.js")
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    assert "export class SessionSync" in script.text


def test_settings_come_from_the_environment() -> None:
    assert Settings.from_env({}) == Settings()
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

"""Server-Sent Events under uvicorn, hypercorn and granian, each a real process.

Each server runs ``tests/e2e/sse_apps.py`` in a process of its own, started once per module,
with a private nats-server (monitored, to count subscriptions) for its bridged streams; a real
HTTP client (httpx, streaming) reads the events with the HTML standard's grammar
(``tests/test_sse.py``'s :class:`EventParser`). What the app saw (loads, how each handler
ended, the bridge's sessions) is read from its ``GET /stats``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from uuid import uuid4

import anyio
import httpx
import pytest
from conftest import MonitoredNats
from test_sse import Event, EventParser

from asgi_session_sync.nats import EmbeddedNats
from asgi_session_sync.protocol import apply_patch

from . import sse_apps
from .app_process import ROOT, ServerProcess, free_port
from .conftest import WAIT

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

HOST = "127.0.0.1"
SERVERS = {
    "uvicorn": "uvicorn {app} --host {host} --port {port} --log-level warning --lifespan on",
    # --workers 0: serve in hypercorn's own process, not in a spawned worker.
    "hypercorn": "hypercorn {app} --bind {host}:{port} --workers 0 --worker-class asyncio",
    "granian": "granian {app} --interface asgi --host {host} --port {port} --log-level warning",
}
"""Each server's command line, run with ``python -m``."""

APP = "tests.e2e.sse_apps:app"
SLOW_LOAD_MS = 1000


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    # nats-py and these tests' fixtures run on asyncio; each server runs its own loop.
    return "asyncio"


@pytest.fixture(scope="module")
async def nats() -> AsyncIterator[MonitoredNats]:
    """One private nats-server for the module, its HTTP monitoring on another free port."""
    monitor_port = free_port()
    async with EmbeddedNats(args=["-m", str(monitor_port)]) as server:
        yield MonitoredNats(server, monitor_port)


class RunningServer:
    """One server process serving ``sse_apps:app`` on 127.0.0.1."""

    def __init__(self, name: str, process: ServerProcess) -> None:
        self.name = name
        self.process = process
        self.url = f"http://{HOST}:{process.port}"
        self.log_start = 0

    def logged(self) -> str:
        """What the server logged during the current test."""
        return self.process.output()[self.log_start :]

    def log_tail(self) -> str:
        """The end of what the server logged during the current test, for failure messages."""
        return f"\n--- {self.name} logged during the test ---\n{self.logged()[-3000:]}"

    async def stats(self, *, idle: bool = False) -> dict[str, Any]:
        """The app's ``/stats``; with ``idle``, once no event stream is open in the app."""
        async with httpx.AsyncClient(base_url=self.url, trust_env=False) as http:
            response = await http.get(
                "/stats", params={"idle": str(idle).lower()}, timeout=WAIT * 2
            )
        response.raise_for_status()
        return dict(response.json())

    async def append(self, session_id: str, text: str, *, publish: bool = True) -> int:
        """Commit ``text`` to the session's ``/text`` (and publish its patch); the version."""
        async with httpx.AsyncClient(base_url=self.url, trust_env=False) as http:
            response = await http.post(
                f"/sessions/{session_id}/append",
                params={"text": text, "publish": "1" if publish else "0"},
                timeout=WAIT,
            )
        response.raise_for_status()
        return int(response.json()["version"])


@pytest.fixture(scope="module", params=list(SERVERS))
async def server_process(
    request: pytest.FixtureRequest, nats: MonitoredNats, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningServer]:
    name = str(request.param)
    port = free_port()
    command = SERVERS[name].format(app=APP, host=HOST, port=port)
    # Servers that spawn workers (granian) import the app in a fresh interpreter.
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    process = ServerProcess(
        [sys.executable, "-m", *command.split()],
        port,
        tmp_path_factory.mktemp(name) / "server.log",
        # The URL carries the broker's credentials: through the environment, never argv.
        {"PYTHONPATH": pythonpath, "NATS_URL": nats.url},
    )
    process.start(timeout=4 * WAIT)
    running = RunningServer(name, process)
    try:
        # A server may listen before its worker ran the lifespan that opens the bridge.
        with anyio.fail_after(4 * WAIT):
            while (await running.stats())["hub_sessions"] is None:  # noqa: ASYNC110
                await anyio.sleep(0.05)  # another process's start: no event to await
        yield running
    finally:
        process.stop()


@pytest.fixture
def server(server_process: RunningServer) -> RunningServer:
    server_process.log_start = len(server_process.process.output())
    return server_process


def unique(prefix: str) -> str:
    """A session id no other test uses, so the app's per-id counters are this test's own."""
    return f"{prefix}-{uuid4().hex[:12]}"


class EventStream:
    """One event stream read by httpx as it arrives, every wait bounded by ``WAIT``."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.parser = EventParser()
        self._chunks = response.aiter_raw()
        self._events: list[Event] = []

    async def _read(self) -> None:
        chunk = await anext(self._chunks)
        self._events.extend(self.parser.feed(chunk))

    async def next_event(self) -> Event:
        with anyio.fail_after(WAIT):
            while not self._events:
                await self._read()
        return self._events.pop(0)

    async def next_comment(self) -> str:
        seen = len(self.parser.comments)
        with anyio.fail_after(WAIT):
            while len(self.parser.comments) == seen:
                await self._read()
        return self.parser.comments[seen]


@asynccontextmanager
async def event_stream(
    server: RunningServer, path: str, *, headers: dict[str, str] | None = None, **params: Any
) -> AsyncIterator[EventStream]:
    """GET ``path`` as a browser's EventSource does; leaving the block closes the connection."""
    async with (
        httpx.AsyncClient(base_url=server.url, trust_env=False, timeout=WAIT) as http,
        http.stream(
            "GET",
            path,
            params=params,
            headers={"accept": "text/event-stream", **(headers or {})},
        ) as response,
    ):
        assert response.status_code == 200, server.log_tail()
        assert response.headers["content-type"].startswith("text/event-stream")
        yield EventStream(response)


def assert_snapshot(event: Event, session_id: str, version: int, text: str = "") -> None:
    assert (event.type, event.id) == ("session_update", str(version)), event
    data = event.json()
    data.pop("reset", None)
    assert data == {
        "type": "session_update",
        "session_id": session_id,
        "owner": sse_apps.OWNER,
        "session": {"title": sse_apps.TITLE, "text": text},
        "version": version,
    }


# --------------------------------------------------------------------------------------------
# The middleware's one line
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("framework", ["sessions", "fastapi", "litestar", "quart", "raw"])
async def test_the_snapshot_is_the_first_event_over_a_chunked_response(
    server: RunningServer, framework: str
) -> None:
    session_id = unique("first")
    async with event_stream(server, f"/sse/{framework}/{session_id}") as stream:
        first, greeting = await stream.next_event(), await stream.next_event()
        headers = stream.response.headers
    assert_snapshot(first, session_id, 1)
    assert (greeting.type, greeting.data, greeting.id) == ("greeting", "hello", "1")
    # HTTP/1.1 with no length: the server chunks the stream, and h11 (httpx) checked each
    # chunk's framing as it read.
    assert "content-length" not in headers
    assert headers.get("transfer-encoding") == "chunked", dict(headers)
    if framework in {"sessions", "fastapi"}:
        assert headers.get("x-accel-buffering") == "no"  # sse-starlette's own header, kept
    assert await server_loads(server, session_id) == 1


async def test_stale_app_events_are_fenced_and_last_event_id_resumes(server: RunningServer) -> None:
    session_id = unique("fence")
    async with event_stream(server, f"/sse/raw/{session_id}", versions="0,1,2") as stream:
        events = [await stream.next_event() for _ in range(3)]
    assert [(e.type, e.id) for e in events] == [
        ("session_update", "1"),
        ("greeting", "1"),
        ("session_update", "2"),
    ]
    headers = {"last-event-id": "1"}
    async with event_stream(server, f"/sse/raw/{session_id}", headers=headers) as stream:
        assert (await stream.next_event()).type == "greeting", "resumed: no snapshot"
    # An app that sends nothing after its start: the snapshot is not held back for more.
    async with event_stream(server, f"/sse/raw/{session_id}", mode="quiet") as stream:
        assert_snapshot(await stream.next_event(), session_id, 1)
    hostile = {"last-event-id": "9" * 4000 + "not-a-version"}
    async with event_stream(server, f"/sse/raw/{session_id}", headers=hostile) as stream:
        assert_snapshot(await stream.next_event(), session_id, 1)
    assert await server_loads(server, session_id) == 4


async def test_other_responses_pass_as_without_the_middleware(server: RunningServer) -> None:
    session_id = unique("untouched")
    async with httpx.AsyncClient(base_url=server.url, trust_env=False, timeout=WAIT) as http:
        text = await http.get(f"/sse/raw/{session_id}", params={"mode": "text"})
        bare_text = await http.get(f"/sse/bare/{session_id}", params={"mode": "text"})
        failed = await http.get(f"/sse/raw/{session_id}", params={"mode": "body-first"})
        bare_failed = await http.get(f"/sse/bare/{session_id}", params={"mode": "body-first"})
    assert (text.status_code, text.content) == (200, b"one\n\ntwo\n")
    assert (text.status_code, text.content) == (bare_text.status_code, bare_text.content)
    assert failed.status_code == bare_failed.status_code == 500, server.log_tail()
    assert await server_loads(server, session_id) == 0
    assert "no snapshot: the app sent http.response.body before http.response.start" in (
        server.logged()
    )


async def server_loads(server: RunningServer, session_id: str) -> int:
    return int((await server.stats(idle=True))["loads"].get(session_id, 0))


# --------------------------------------------------------------------------------------------
# Bridged event streams behind a real nats-server
# --------------------------------------------------------------------------------------------


class Browser:
    """What an EventSource page holds: the state, built from each event by the client's rules."""

    def __init__(self) -> None:
        self.state: Any = None
        self.version: int | None = None
        self.versions: list[int] = []

    def apply(self, event: Event) -> None:
        data = event.json()
        assert event.id == str(data["version"]), "each event's id is its version"
        if data["type"] == "session_patch":
            assert data["base_version"] == self.version, f"a patch for a base it lacks: {data}"
            self.state = apply_patch(self.state, data["patch"])
        else:
            assert data["type"] == "session_update", data
            self.state = data["session"]
        self.version = data["version"]
        self.versions.append(data["version"])


async def test_bridged_patches_heartbeats_disconnect_and_exact_resume(
    server: RunningServer, nats: MonitoredNats
) -> None:
    session_id = unique("bridged")
    subject = f"session_sync.{session_id}"
    path = f"/sse/bridged/{session_id}"
    browser = Browser()
    async with event_stream(server, path, heartbeat="0.2") as stream:
        first = await stream.next_event()
        assert_snapshot(first, session_id, 1)
        browser.apply(first)
        for token in ("Hel", "lo", " 😀"):
            version = await server.append(session_id, token)
            event = await stream.next_event()
            assert (event.type, event.id) == ("session_patch", str(version))
            assert [op["op"] for op in event.json()["patch"]] == ["append"]
            browser.apply(event)
        assert await stream.next_comment() == "heartbeat", "a comment after 0.2 s of quiet"
        assert await nats.subscriptions(subject) == 1
        last_id = stream.parser.last_event_id
    assert browser.state == {"title": sse_apps.TITLE, "text": "Hello 😀"}
    assert last_id == "4"

    # The client left: the handler ends and the process leaves the subject.
    stats = await server.stats(idle=True)
    assert stats["open"] == 0, server.log_tail()
    assert stats["outcomes"][session_id] == "returned", server.log_tail()
    assert stats["hub_sessions"] == 0
    assert await nats_subscriptions_drop_to_zero(nats, subject)

    # Current: resumed with no snapshot, and the next patch chains from the client's version.
    async with event_stream(server, path, headers={"last-event-id": last_id}) as stream:
        assert await stream.next_comment() == "open"
        await server.append(session_id, "!")
        event = await stream.next_event()
        browser.apply(event)
    # Behind: what was committed meanwhile comes as one snapshot at the database's version.
    await server.append(session_id, " Bye")
    await server.append(session_id, ".")
    async with event_stream(server, path, headers={"last-event-id": event.id}) as stream:
        event = await stream.next_event()
        assert_snapshot(event, session_id, 7, "Hello 😀! Bye.")
        browser.apply(event)
    assert browser.versions == [1, 2, 3, 4, 5, 7], "no version twice, none going back"
    assert (await server.stats(idle=True))["loads"][session_id] == 3


async def nats_subscriptions_drop_to_zero(nats: MonitoredNats, subject: str) -> bool:
    """Whether the broker holds no subscription on ``subject`` within ``WAIT`` seconds."""
    with anyio.move_on_after(WAIT):
        while await nats.subscriptions(subject):  # noqa: ASYNC110
            await anyio.sleep(0.05)  # another process's unsubscribe: no event to await
        return True
    return False


async def test_a_lost_patch_is_repaired_on_the_open_stream(server: RunningServer) -> None:
    session_id = unique("gap")
    browser = Browser()
    async with event_stream(server, f"/sse/bridged/{session_id}") as stream:
        browser.apply(await stream.next_event())
        await server.append(session_id, "lost", publish=False)
        await server.append(session_id, "+next")
        repair = await stream.next_event()
        assert repair.json().get("reset") is True
        browser.apply(repair)
        await server.append(session_id, "!")
        browser.apply(await stream.next_event())
    assert browser.versions == [1, 3, 4]
    assert browser.state["text"] == "lost+next!"


# --------------------------------------------------------------------------------------------
# Bad input: a client that leaves during a slow load
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["sessions", "raw", "bridged"])
async def test_a_client_leaving_during_a_slow_load_ends_the_handler(
    server: RunningServer, route: str
) -> None:
    session_id = unique(f"left-{route}")
    # The client leaves at a fifth of the load: a deliberate timing, not a wait for an event.
    with anyio.move_on_after(SLOW_LOAD_MS / 1000 / 5):
        async with event_stream(server, f"/sse/{route}/{session_id}", load_ms=SLOW_LOAD_MS):
            pytest.fail("the stream started before its load ended")
    with anyio.fail_after(SLOW_LOAD_MS / 1000 + WAIT):
        stats = await server.stats(idle=True)
    assert stats["open"] == 0, server.log_tail()
    assert stats["loads"].get(session_id, 0) <= 1
    assert stats["outcomes"].get(session_id) in {"returned", "asyncio.exceptions.CancelledError"}, (
        f"the handler ended with {stats['outcomes'].get(session_id)}" + server.log_tail()
    )
    assert stats["hub_sessions"] == 0
    assert "Traceback" not in server.logged(), server.log_tail()

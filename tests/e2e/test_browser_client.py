"""The shipped browser client (static/session-sync.js), alone, in a real Chromium."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from asgi_session_sync._types import ASGIApp, Receive, Scope, Send
from asgi_session_sync.client import client_script_app

pytestmark = pytest.mark.e2e

PAGE = """<!doctype html><meta charset="utf-8"><title>client test</title>
<script type="module">
import { SessionSync, compareVersions } from "/session-sync.js";
window.compareVersions = compareVersions;
window.applied = [];
window.states = [];
window.sync = new SessionSync({
  url: "/ws/sessions/s1",
  minDelay: 200, factor: 2, jitter: 0.5, maxDelay: 5000,
  onSession: (session, event) => window.applied.push(event.version),
  onState: (state, detail) => window.states.push([state, detail.delay]),
}).start();
</script>"""


def event(version: int, type_: str = "session_update") -> dict[str, Any]:
    return {"type": type_, "session_id": "s1", "version": version, "session": {"v": version}}


class ScriptedServer:
    """Serves the page and the client; plays a fixed script on each WebSocket attempt.

    Attempt 1: snapshot v1, then an older event, a duplicate and a newer one, then drops the
    socket. Attempts 2 and 3 are refused before accepting. Attempt 4: snapshot v3, held open.
    """

    def __init__(self) -> None:
        self.attempts: list[tuple[float, str]] = []  # (monotonic time, query string)
        self.lock = threading.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if scope["path"] == "/session-sync.js":
                await client_script_app(scope, receive, send)
                return
            body = PAGE.encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/html; charset=utf-8")],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await receive()
        with self.lock:
            self.attempts.append((time.monotonic(), scope["query_string"].decode()))
            attempt = len(self.attempts)
        if attempt in (2, 3):
            await send({"type": "websocket.close", "code": 1013})
            return
        await send({"type": "websocket.accept"})
        frames = [event(1), event(0), event(1), event(2)] if attempt == 1 else [event(3)]
        for frame in frames:
            await send({"type": "websocket.send", "text": json.dumps(frame)})
        if attempt == 1:
            await send({"type": "websocket.close", "code": 1012})
            return
        while (await receive())["type"] != "websocket.disconnect":
            pass


def test_client_reconnects_with_backoff_resumes_and_never_rolls_back(
    browser: Any, serve: Callable[[ASGIApp], str]
) -> None:
    server = ScriptedServer()
    base = serve(server).replace("ws://", "http://")
    page = browser.new_page()
    try:
        page.goto(base + "/")
        page.wait_for_function("window.applied && window.applied.includes(3)", timeout=10_000)
        applied = page.evaluate("window.applied")
        states = page.evaluate("window.states")
        page.evaluate("window.sync.close()")
    finally:
        page.close()

    # Older and duplicate events were ignored; every newer state was applied, in order.
    assert applied == [1, 2, 3]
    # The first attempt had nothing to resume from; every later one resumed from v2.
    queries = [query for _, query in server.attempts]
    assert queries == ["", "since=2", "since=2", "since=2"]
    names = [state for state, _ in states]
    assert names[0] == "connecting"
    assert names[1] == "live"
    assert names[-1] == "live"
    assert set(names[2:-1]) == {"reconnecting"}
    # Backoff: each scheduled delay lies in [ceiling * (1 - jitter), ceiling], ceiling doubling.
    delays = [delay for state, delay in states if state == "reconnecting" and delay > 0]
    assert len(delays) == 3
    for attempt, delay in enumerate(delays):
        ceiling = 200 * 2**attempt
        assert ceiling * 0.5 <= delay <= ceiling, (attempt, delay)
    # And the server saw the attempts no sooner than the client scheduled them.
    times = [at for at, _ in server.attempts]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    for gap, delay in zip(gaps, delays, strict=True):
        assert gap * 1000 >= delay - 5  # setTimeout never fires early; 5 ms for clock skew


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (2, 1, 1),
        (1, 1, 0),
        (1, 2, -1),
        ("2026-01-01T01:00:00+01:00", "2026-01-01T00:00:00Z", 0),
        ("2026-01-01T00:00:00.000002Z", "2026-01-01T00:00:00.000001Z", 1),
        ("2026-01-01T00:00:00", "2026-01-01T00:00:00Z", 0),
        (1, "2026-01-01T00:00:00Z", None),
        ("tuesday", 1, None),
        (1.5, 1, None),
    ],
)
def test_compare_versions_matches_the_server(
    browser: Any, serve: Callable[[ASGIApp], str], a: object, b: object, expected: int | None
) -> None:
    from asgi_session_sync.versions import is_newer, same_version

    server = ScriptedServer()
    base = serve(server).replace("ws://", "http://")
    page = browser.new_page()
    try:
        page.goto(base + "/")
        page.wait_for_function("typeof window.compareVersions === 'function'", timeout=10_000)
        page.evaluate("window.sync.close()")
        result = page.evaluate("([a, b]) => window.compareVersions(a, b)", [a, b])
    finally:
        page.close()
    assert result == expected
    server_view = 1 if is_newer(a, b) else 0 if same_version(a, b) else None
    if is_newer(b, a):
        server_view = -1
    assert result == server_view


class RefusingServer(ScriptedServer):
    """Accepts, sends nothing, and closes with 4403: this user may not watch the session."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await super().__call__(scope, receive, send)
            return
        await receive()
        with self.lock:
            self.attempts.append((time.monotonic(), scope["query_string"].decode()))
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": 4403})


def test_client_stops_after_a_final_refusal(browser: Any, serve: Callable[[ASGIApp], str]) -> None:
    server = RefusingServer()
    base = serve(server).replace("ws://", "http://")
    page = browser.new_page()
    try:
        page.goto(base + "/")
        page.wait_for_function(
            "window.states && window.states.some(([state]) => state === 'closed')",
            timeout=10_000,
        )
        states = [state for state, _ in page.evaluate("window.states")]
        pending = page.evaluate("window.sync.timer !== null || window.sync.socket !== null")
    finally:
        page.close()
    assert states == ["connecting", "live", "closed"]
    assert pending is False  # no reconnect scheduled, no socket open
    assert len(server.attempts) == 1

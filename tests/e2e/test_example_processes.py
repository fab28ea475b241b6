"""Both examples as their READMEs run them: an API process and a worker process, in Chromium.

Each process is SIGKILLed mid-stream, as a crash or a deploy would end it, while the page
stays open: the API (and its private nats-server with it), the worker, or the broker alone.
The page must catch up without a reload, the response must stream to its end (or show as
interrupted once the dead worker's lease expires), and no nats-server may outlive its API.
Issue 18's answers are 1,000 tokens long: the page's text after an API crash is the
database's, character for character (read through the app's API), a dead worker's answer
ends interrupted, and Stop ends it cancelled in two tabs while the worker stops generating.
Each example's page over Server-Sent Events (``?transport=sse``, issue 22) survives the API's
SIGKILL the same way, and its ``/sse/sessions/{id}`` route streams over a real HTTP client.

Screenshots of every state go to ``test-output/<test>/`` at the repository root (ignored by
git); each path is printed.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from test_sse import Event, EventParser

from asgi_session_sync.protocol import apply_patch, utf16_length
from examples.chat.store import WORKER_LOST
from examples.chat.worker import simulated_tokens

from .app_process import (
    ROOT,
    ExampleStack,
    NatsProcess,
    ServerProcess,
    children_named,
    free_port,
    wait_for_port,
    wait_until_gone,
)

pytestmark = pytest.mark.e2e

RECOVERY = 2.0  # seconds from a server's return to a current page
LEASE = 2.0  # seconds: the workers' lease in these tests
WAIT_MS = 10_000  # bound on every other wait in the page
TOKENS = 40
TOKEN_INTERVAL = 0.15  # 40 tokens: a 6 s stream, long enough to restart the API inside it
ANSWER_TOKENS = 1000  # issue 18's long answer
ANSWER_INTERVAL = 0.008  # s: 125 tokens a second, an 8 s answer (coalesced into 50 ms deltas)
# s: long enough that the page says a dead worker's answer has stalled (after 3 publish
# intervals + 1 s) well before the sweeper marks it interrupted.
ANSWER_LEASE = 3.0
OUTPUT = ROOT / "test-output"


@dataclass(frozen=True)
class Example:
    """What differs between the two examples' pages."""

    module: str
    title_input: str
    create_button: str
    prompt_input: str
    send_button: str


EXAMPLES = [
    pytest.param(
        Example(
            "examples.fastapi_app",
            "#new-session input[name=title]",
            "#new-session button",
            "#new-prompt input[name=prompt]",
            "#new-prompt button",
        ),
        id="fastapi",
    ),
    pytest.param(
        Example("examples.litestar_app", "#title", "#create", "#prompt", "#send"),
        id="litestar",
    ),
]

# The page as the user sees it: connection state, version, and the first interaction.
PAGE_STATE = """() => {
  const item = document.querySelector("[data-testid=interaction]");
  return {
    state: document.querySelector("#state").textContent,
    version: Number(document.querySelector("#version").textContent) || 0,
    response: item?.querySelector("[data-testid=response]").textContent ?? null,
    done: item?.dataset.done === "true",
    status: item?.dataset.status ?? null,
    interrupted: item?.querySelector("[data-testid=interrupted]")?.textContent ?? null,
  };
}"""

STOP = "[data-testid=interaction][data-position='0'] button[data-testid=stop]"
ALICE = {"Authorization": "Bearer alice"}


@pytest.fixture(params=EXAMPLES)
def example(request: pytest.FixtureRequest) -> Example:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def shots(request: pytest.FixtureRequest) -> Path:
    """This test's screenshot directory, emptied first."""
    directory = OUTPUT / re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.png"):
        old.unlink()
    return directory


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 900, "height": 700})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    try:
        yield page
    finally:
        context.close()


def make_stack(
    example: Example, tmp_path: Path, nats_url: str | None = None, **env: str
) -> ExampleStack:
    settings = {
        "LEASE_SECONDS": str(LEASE),
        "RESPONSE_TOKENS": str(TOKENS),
        "TOKEN_INTERVAL": str(TOKEN_INTERVAL),
        **env,
    }
    return ExampleStack(example.module, tmp_path, settings, nats_url)


@contextmanager
def started(stack: ExampleStack) -> Iterator[ExampleStack]:
    """``stack`` running; stopped after, and its output free of tracebacks."""
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()
    output = stack.output()
    assert "Traceback" not in output, output


@pytest.fixture
def running(example: Example, tmp_path: Path) -> Iterator[ExampleStack]:
    """The example with its private nats-server (in the API process)."""
    with started(make_stack(example, tmp_path)) as stack:
        yield stack


@pytest.fixture
def answering(example: Example, tmp_path: Path) -> Iterator[ExampleStack]:
    """The example answering 1,000 tokens at 125 a second, with its private nats-server."""
    env = {
        "RESPONSE_TOKENS": str(ANSWER_TOKENS),
        "TOKEN_INTERVAL": str(ANSWER_INTERVAL),
        "LEASE_SECONDS": str(ANSWER_LEASE),
    }
    with started(make_stack(example, tmp_path, **env)) as stack:
        yield stack


def screenshot(page: Any, directory: Path, name: str) -> Path:
    path = directory / f"{name}.png"
    page.screenshot(path=path, full_page=True)
    print(f"screenshot: {path}")
    return path


def start_streaming(page: Any, example: Example, url: str, query: str = "token=alice") -> str:
    """Open the page (with ``query``), create a session, send a prompt, wait for a few tokens;
    the session id."""
    page.goto(f"{url}/?{query}")
    # A reload would lose this: the checks below prove the page recovered by itself.
    page.evaluate("window.loadMarker = 'first load'")
    page.fill(example.title_input, "Crash test")
    page.click(example.create_button)
    page.wait_for_function("document.querySelector('#state').textContent === 'live'")
    # Every response text the page shows, in order, for the token-by-token check.
    page.evaluate(
        """() => {
          window.responsesShown = [];
          new MutationObserver(() => {
            const text = document.querySelector("[data-testid=response]")?.textContent;
            const shown = window.responsesShown;
            if (text !== undefined && shown[shown.length - 1] !== text) shown.push(text);
          }).observe(document.body, { childList: true, subtree: true, characterData: true });
        }"""
    )
    page.fill(example.prompt_input, "Tell me a long story")
    page.click(example.send_button)
    page.wait_for_function(
        "(document.querySelector('[data-testid=response]')?.textContent ?? '')"
        ".split(' ').length >= 3"
    )
    session_id = page.text_content("#session-id")
    assert isinstance(session_id, str)
    assert len(session_id) == 32
    return session_id


def in_database(db: Path, session_id: str) -> dict[str, Any]:
    with closing(sqlite3.connect(db, timeout=5)) as connection:
        version, response, done, interrupted = connection.execute(
            "SELECT s.version, i.response, i.done, i.interrupted FROM chat_sessions s "
            "JOIN interactions i ON i.session_id = s.id WHERE s.id = ? AND i.position = 0",
            (session_id,),
        ).fetchone()
    return {
        "version": version,
        "response": response,
        "done": bool(done),
        "interrupted": interrupted,
    }


def wait_current(page: Any, version: int, *, since: float, logs: str) -> float:
    """Wait until the page is live at ``version`` or later, at most RECOVERY s after ``since``."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    remaining_ms = (since + RECOVERY - time.monotonic()) * 1000
    assert remaining_ms > 1, "no time left to wait for the page"
    try:
        page.wait_for_function(
            f"(v) => {{ const s = ({PAGE_STATE})(); "
            "return s.state === 'live' && s.version >= v; }",
            arg=version,
            timeout=remaining_ms,
        )
    except PlaywrightTimeout:
        pytest.fail(
            f"the page was not current {RECOVERY}s after the server's return: "
            f"{page.evaluate(PAGE_STATE)}, database at version {version}\n{logs}"
        )
    return time.monotonic() - since


def through_api(stack: ExampleStack, session_id: str) -> dict[str, Any]:
    """The session's first interaction as the app's HTTP API returns it, with its version."""
    import httpx

    response = httpx.get(
        f"{stack.api.url}/api/sessions/{session_id}",
        headers={"Authorization": "Bearer alice"},
        timeout=5,
    )
    response.raise_for_status()
    session = response.json()
    return {**session["interactions"][0], "version": session["version"]}


def finish_and_compare(
    page: Any,
    stack: ExampleStack,
    session_id: str,
    tokens: int = TOKENS,
    interval: float = TOKEN_INTERVAL,
) -> dict[str, Any]:
    """Wait for the response's end on the page; check it equals the database's, as the API
    returns it, character for character."""
    page.wait_for_function(f"({PAGE_STATE})().done", timeout=tokens * interval * 1000 * 2 + 5000)
    shown: dict[str, Any] = page.evaluate(PAGE_STATE)
    stored = through_api(stack, session_id)
    assert stored["done"], stored
    assert stored["status"] == "complete", stored
    assert stored["interrupted"] is None, stored
    assert stored["response"] == "".join(simulated_tokens(tokens))
    assert shown["response"] == stored["response"]
    assert shown["status"] == "complete"
    assert shown["version"] == stored["version"]
    assert shown["interrupted"] is None
    assert page.evaluate("window.loadMarker") == "first load", "the page was reloaded"
    return shown


def test_response_streams_into_the_page_as_appends_chained_to_the_database_text(
    running: ExampleStack, example: Example, page: Any, shots: Path
) -> None:
    frames: list[dict[str, Any]] = []
    page.on(
        "websocket",
        lambda socket: socket.on("framereceived", lambda data: frames.append(json.loads(data))),
    )
    session_id = start_streaming(page, example, running.api.url)
    screenshot(page, shots, "1-streaming")
    finish_and_compare(page, running, session_id)
    screenshot(page, shots, "2-finished")

    final = "".join(simulated_tokens(TOKENS))
    shown = page.evaluate("window.responsesShown")
    # Streamed: the page showed growing prefixes of the final text, many steps apart.
    assert shown[-1] == final
    assert all(final.startswith(text) for text in shown)
    assert all(len(a) < len(b) for a, b in itertools.pairwise(shown))
    assert len(shown) >= TOKENS // 4, shown
    # Every update after the snapshot came as a patch of the one interaction, each chained on
    # the one before (the stream's versions skip ahead: the chain is what holds, not +1).
    [snapshot, *updates] = [
        f for f in frames if f.get("type") in ("session_update", "session_patch")
    ]
    assert snapshot["type"] == "session_update"
    assert [f["type"] for f in updates] == ["session_patch"] * len(updates)
    versions = [snapshot["version"], *(p["version"] for p in updates)]
    assert [p["base_version"] for p in updates] == versions[:-1]
    assert [(op["op"], op["path"]) for op in updates[0]["patch"]] == [("add", "/interactions/-")]
    operations = [op for p in updates[1:] for op in p["patch"]]
    assert all(op["path"].startswith("/interactions/0/") for op in operations)
    # The text came as appends of the new words only, each at the length of the text before
    # it (UTF-16 units), coalesced: no more deltas than tokens, each patch small.
    appends = [op for op in operations if op["path"] == "/interactions/0/response"]
    assert {op["op"] for op in appends} == {"append"}
    assert 2 <= len(appends) <= TOKENS
    offsets = list(itertools.accumulate((utf16_length(op["value"]) for op in appends), initial=0))
    assert [op["offset"] for op in appends] == offsets[:-1]
    assert "".join(op["value"] for op in appends) == final
    assert max(len(json.dumps(p)) for p in updates) < 1024
    state = snapshot["session"]
    for update in updates:
        state = apply_patch(state, update["patch"])
    assert state["interactions"][0]["response"] == final
    assert state["interactions"][0]["status"] == "complete"
    assert state["interactions"][0]["done"]


def shown_length(page: Any) -> int:
    """Characters of the first response on the page."""
    return len(page.evaluate(PAGE_STATE)["response"] or "")


def test_api_killed_mid_answer_page_resumes_and_ends_equal_to_the_database(
    answering: ExampleStack, example: Example, page: Any, shots: Path
) -> None:
    session_id = start_streaming(page, example, answering.api.url)
    screenshot(page, shots, "1-streaming")
    [nats_server] = children_named(answering.api.pid, "nats-server")

    answering.api.kill()
    # The API's private broker dies with it, even on SIGKILL: none is left behind.
    assert wait_until_gone({nats_server}, 2.0) == set(), "nats-server outlived its API"
    page.wait_for_function("document.querySelector('#state').textContent === 'reconnecting'")
    screenshot(page, shots, "2-api-down")
    assert not in_database(answering.db, session_id)["done"], "the answer ended before the kill"

    returned = answering.api.start()
    version = in_database(answering.db, session_id)["version"]
    took = wait_current(page, version, since=returned, logs=answering.output())
    screenshot(page, shots, "3-api-back")
    print(f"{example.module}: current {took:.2f}s after the API accepted connections again")
    # The worker never stopped: the answer streams on over the new socket, to its end.
    back = shown_length(page)
    assert not page.evaluate(PAGE_STATE)["done"], "no streaming left to see after the restart"
    page.wait_for_function(f"({PAGE_STATE})().response.length > {back}")
    shown = finish_and_compare(page, answering, session_id, ANSWER_TOKENS, ANSWER_INTERVAL)
    screenshot(page, shots, "4-finished")
    assert len(shown["response"]) > back


def test_sse_page_api_killed_mid_answer_reopens_its_stream_and_ends_equal_to_the_database(
    answering: ExampleStack, example: Example, page: Any, shots: Path
) -> None:
    sockets: list[str] = []
    page.on("websocket", lambda socket: sockets.append(socket.url))
    streams: list[str] = []
    page.on(
        "request",
        lambda request: streams.append(request.url) if "/sse/sessions/" in request.url else None,
    )
    session_id = start_streaming(page, example, answering.api.url, "token=alice&transport=sse")
    # The header says which transport the page follows the session over.
    assert page.get_attribute("#transport", "data-transport") == "sse"
    assert page.text_content("#transport a[aria-current]") == "SSE"
    assert page.evaluate("window.sessionSync.socket instanceof EventSource")
    other = urlsplit(page.get_attribute("#transport a[data-transport=websocket]", "href"))
    assert parse_qs(other.query) == {
        "token": ["alice"],
        "transport": ["websocket"],
        "session": [session_id],
    }
    screenshot(page, shots, "1-streaming")
    opened = len(streams)

    answering.api.kill()
    page.wait_for_function("document.querySelector('#state').textContent === 'reconnecting'")
    screenshot(page, shots, "2-api-down")
    assert not in_database(answering.db, session_id)["done"], "the answer ended before the kill"
    had = page.evaluate(PAGE_STATE)["version"]

    returned = answering.api.start()
    version = in_database(answering.db, session_id)["version"]
    took = wait_current(page, version, since=returned, logs=answering.output())
    screenshot(page, shots, "3-api-back")
    print(f"{example.module} over SSE: current {took:.2f}s after the API's return")
    # The worker never stopped: the answer streams on over the new stream, to its end.
    back = shown_length(page)
    assert not page.evaluate(PAGE_STATE)["done"], "no streaming left to see after the restart"
    page.wait_for_function(f"({PAGE_STATE})().response.length > {back}")
    shown = finish_and_compare(page, answering, session_id, ANSWER_TOKENS, ANSWER_INTERVAL)
    screenshot(page, shots, "4-finished")
    assert len(shown["response"]) > back
    # Over event streams only: each one the client reopened resumed from the version it had.
    assert sockets == []
    reopened = [parse_qs(urlsplit(url).query) for url in streams[opened:]]
    assert reopened, streams
    assert all(query["token"] == ["alice"] for query in reopened), streams
    assert all(int(query["since"][0]) >= had for query in reopened), streams


def stream_events(response: httpx.Response) -> Iterator[Event]:
    """The events of an event-stream response, as its chunks arrive."""
    parser = EventParser()
    for chunk in response.iter_bytes():
        yield from parser.feed(chunk)


def test_sse_route_streams_the_snapshot_then_the_answer_with_versions_as_ids(
    example: Example, tmp_path: Path
) -> None:
    stack = make_stack(example, tmp_path, RESPONSE_TOKENS="40", TOKEN_INTERVAL="0.01")
    with started(stack), httpx.Client(base_url=stack.api.url, timeout=5) as client:
        session = client.post("/api/sessions", json={"title": "t"}, headers=ALICE).json()
        path = f"/sse/sessions/{session['id']}"
        # Another user's session: a status, and no stream.
        refused = client.get(path, params={"token": "bob"})
        assert refused.status_code == 404
        assert refused.headers["content-type"] == "application/json"
        with client.stream("GET", path, params={"token": "alice"}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
            assert response.headers["x-accel-buffering"] == "no"
            events = stream_events(response)
            snapshot = next(events)
            assert (snapshot.type, snapshot.id) == ("session_update", "1")
            assert snapshot.json()["session"] == session
            prompt = client.post(
                f"{path.replace('/sse/', '/api/')}/prompts", json={"prompt": "hi"}, headers=ALICE
            )
            assert prompt.status_code == 202
            # Every update an event named for its type, with its version as id:, chained.
            state, version = session, 1
            deadline = time.monotonic() + WAIT_MS / 1000
            while not (state["interactions"] and state["interactions"][0]["done"]):
                assert time.monotonic() < deadline, stack.output()
                event = next(events)
                frame = event.json()
                assert (event.type, event.id) == ("session_patch", str(frame["version"]))
                assert frame["base_version"] == version
                state, version = apply_patch(state, frame["patch"]), frame["version"]
        stored = client.get(f"/api/sessions/{session['id']}", headers=ALICE).json()
    assert stored == {**state, "version": version}
    assert stored["interactions"][0]["response"] == "".join(simulated_tokens(40))
    assert stored["interactions"][0]["status"] == "complete"


def test_worker_killed_mid_answer_page_shows_it_interrupted_at_lease_expiry(
    answering: ExampleStack, example: Example, page: Any, shots: Path
) -> None:
    session_id = start_streaming(page, example, answering.api.url)
    screenshot(page, shots, "1-streaming")

    answering.worker.kill()
    killed = time.monotonic()
    # No delta comes any more, on a live socket: the page says the answer has stalled (not
    # live with a blinking cursor) while the lease runs out.
    page.wait_for_selector("[data-testid=interaction][data-stalled=true]")
    stalled = time.monotonic() - killed
    assert page.evaluate(PAGE_STATE)["interrupted"] is None, "interrupted before stalled"
    assert page.text_content("[data-testid=status]") == "stalled"
    assert "waiting for the worker's lease to run out" in (
        page.text_content("[data-testid=stalled]") or ""
    )
    screenshot(page, shots, "2-stalled")
    page.wait_for_function(
        f"({PAGE_STATE})().interrupted !== null", timeout=(ANSWER_LEASE + 1) * 1000 + 500
    )
    took = time.monotonic() - killed
    screenshot(page, shots, "3-interrupted")
    assert took <= ANSWER_LEASE + 1, f"interrupted shown {took:.2f}s after the kill"
    assert page.locator("[data-testid=stalled]").is_hidden()

    shown = page.evaluate(PAGE_STATE)
    stored = through_api(answering, session_id)
    assert stored["done"]
    assert stored["status"] == "interrupted"
    assert stored["interrupted"] == WORKER_LOST
    assert shown["status"] == "interrupted"
    assert shown["interrupted"] == f"Interrupted: {WORKER_LOST}"
    assert shown["done"], "the typing cursor is still shown"
    # The text of the dead worker's last checkpoint, on the page as in the database.
    assert shown["response"] == stored["response"]
    assert "".join(simulated_tokens(ANSWER_TOKENS)).startswith(stored["response"])
    assert shown["version"] == stored["version"]
    # No cursor: the response's ::after content is gone.
    cursor = page.evaluate(
        "getComputedStyle(document.querySelector('[data-testid=response]'), '::after').content"
    )
    assert cursor in ("none", "normal", '""'), cursor
    print(
        f"{example.module}: stalled shown {stalled:.2f}s and interrupted {took:.2f}s after "
        "the worker's SIGKILL"
    )
    answering.worker.start()  # so that the fixture stops a worker, as it started one


def test_stop_ends_the_answer_cancelled_in_two_tabs_and_the_worker_stops_generating(
    answering: ExampleStack, example: Example, page: Any, shots: Path
) -> None:
    session_id = start_streaming(page, example, answering.api.url)
    other = page.context.new_page()
    other.set_default_timeout(WAIT_MS)
    other.goto(f"{answering.api.url}/?token=alice&session={session_id}")
    # The second tab joins mid-answer, and follows it.
    joined = shown_length(page)
    other.wait_for_function(f"({PAGE_STATE})().response?.length > {joined}")
    assert other.locator(STOP).is_visible()
    screenshot(other, shots, "1-second-tab-streaming")

    page.click(STOP)
    for tab in (page, other):
        tab.wait_for_function(f"(({PAGE_STATE})()).status === 'cancelled'")
        tab.wait_for_function(f"({PAGE_STATE})().done")
    screenshot(page, shots, "2-stopped")
    screenshot(other, shots, "3-stopped-second-tab")

    # The worker stopped generating: its log says so, with the tokens it made.
    ended = re.compile(
        rf"answer ended session_id={session_id} position=0 status=cancelled "
        rf"tokens=(\d+)/{ANSWER_TOKENS}"
    )
    deadline = time.monotonic() + WAIT_MS / 1000
    while (match := ended.search(answering.worker.output())) is None:
        assert time.monotonic() < deadline, answering.output()
        time.sleep(0.05)  # another process's log: no event to await
    generated = int(match[1])
    assert 0 < generated < ANSWER_TOKENS

    final = "".join(simulated_tokens(ANSWER_TOKENS))
    stored = through_api(answering, session_id)
    assert stored["status"] == "cancelled"
    assert stored["done"]
    assert stored["interrupted"] is None
    assert final.startswith(stored["response"])
    assert len(stored["response"]) < len(final)
    # Both tabs show the text the worker saved, and neither shows a Stop button any more.
    for tab in (page, other):
        shown = tab.evaluate(PAGE_STATE)
        assert shown["response"] == stored["response"]
        assert shown["version"] == stored["version"]
        assert not tab.locator(STOP).is_visible()
    # And it stays so: a second of watching (a dozen token intervals, four checkpoint
    # intervals) changes nothing, in the database or on either page.
    watch_until = time.monotonic() + 1.0
    while time.monotonic() < watch_until:
        assert through_api(answering, session_id) == stored
        time.sleep(0.1)  # observing that nothing happens: there is no event to await
    for tab in (page, other):
        assert tab.evaluate(PAGE_STATE)["response"] == stored["response"]
    other.close()


def test_nats_killed_alone_page_catches_up_then_streams_to_the_end(
    example: Example, page: Any, shots: Path, tmp_path: Path
) -> None:
    nats = NatsProcess(free_port(), tmp_path / "nats-server.log")
    nats.start()
    stack = make_stack(example, tmp_path, nats.url)
    try:
        stack.start()
        session_id = start_streaming(page, example, stack.api.url)
        nats.kill()
        # The worker goes on committing: wait until the page is two tokens behind the
        # database, so that only the bridge's resync (or the worker's buffered publishes)
        # can make it current again.
        shown = page.evaluate(PAGE_STATE)["version"]
        deadline = time.monotonic() + 5
        while in_database(stack.db, session_id)["version"] < shown + 2:
            assert time.monotonic() < deadline, "the worker stopped committing without NATS"
            time.sleep(0.05)  # another process's commits: no event to await
        assert page.evaluate(PAGE_STATE)["version"] == shown, "an update came without NATS"
        screenshot(page, shots, "1-nats-down")
        returned = nats.start()
        version = in_database(stack.db, session_id)["version"]
        took = wait_current(page, version, since=returned, logs=stack.output())
        screenshot(page, shots, "2-nats-back")
        print(f"{example.module}: current {took:.2f}s after nats-server accepted connections")
        finish_and_compare(page, stack, session_id)
        screenshot(page, shots, "3-finished")
        # The socket stayed open: the bridge's resync brought the state over it.
        history = page.evaluate("window.stateLog")
        assert history == ["connecting", "live"], history
    finally:
        stack.stop()
        nats.kill()
    assert "Traceback" not in stack.output(), stack.output()


def test_one_command_runs_both_restarts_a_killed_api_and_sigterm_stops_all(
    example: Example, tmp_path: Path
) -> None:
    import httpx

    stack = make_stack(example, tmp_path, RESPONSE_TOKENS="3", TOKEN_INTERVAL="0.01")
    launcher = ServerProcess(
        [sys.executable, "-m", example.module],
        stack.api.port,
        tmp_path / "launcher.log",
        {**stack.api.env},
        ready_line="worker ready",
    )
    alice = {"Authorization": "Bearer alice"}

    def answer_a_prompt(client: httpx.Client) -> None:
        session = client.post("/api/sessions", json={"title": "t"}, headers=alice).json()
        path = f"/api/sessions/{session['id']}"
        client.post(f"{path}/prompts", json={"prompt": "hi"}, headers=alice)
        deadline = time.monotonic() + 10
        while not client.get(path, headers=alice).json()["interactions"][0]["done"]:
            assert time.monotonic() < deadline, "the worker never finished the response"
            time.sleep(0.05)  # polling the API from outside: no event to await

    def started() -> dict[str, list[int]]:
        # The launcher prints each child's pid, for the user to kill.
        found: dict[str, list[int]] = {"api": [], "worker": []}
        for name, pid in re.findall(r"started (api|worker) pid=(\d+)", launcher.output()):
            found[name].append(int(pid))
        return found

    launcher.start()
    try:
        with httpx.Client(base_url=stack.api.url, timeout=5) as client:
            answer_a_prompt(client)
            [api], [worker] = started().values()
            [nats_server] = children_named(api, "nats-server")

            # kill -9 of the API, as the README shows: the launcher starts it again.
            os.kill(api, signal.SIGKILL)
            assert wait_until_gone({nats_server}, 2.0) == set(), "nats-server outlived its API"
            deadline = time.monotonic() + 20
            while len(started()["api"]) < 2:
                assert time.monotonic() < deadline, launcher.output()[-3000:]
                time.sleep(0.05)  # another process's log: no event to await
            assert stack.api.port is not None
            wait_for_port(stack.api.port, 20)
            answer_a_prompt(client)  # the same worker, reconnected to the new API's broker
        restarted = started()["api"][1]
        assert started()["worker"] == [worker]
        children = {restarted, worker, *children_named(restarted, "nats-server")}
        assert len(children) == 3

        launcher.stop()  # SIGTERM
        assert wait_until_gone(children, 5.0) == set()
    finally:
        launcher.kill()
    # The first API's SIGKILL is the only crash: nothing else raised.
    assert "Traceback" not in launcher.output(), launcher.output()


def test_one_command_refuses_a_taken_port_before_starting_anything(
    example: Example, tmp_path: Path
) -> None:
    # A leftover API holds the port (its launcher was killed with kill -9): the new launcher
    # says so in one line and starts nothing, rather than restart its API again and again.
    stack = make_stack(example, tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", stack.api.port))
        taken.listen()
        launcher = subprocess.run(
            [sys.executable, "-m", example.module],
            env={**os.environ, **stack.api.env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    output = launcher.stdout + launcher.stderr
    assert launcher.returncode == 2, output[-3000:]
    assert launcher.stderr == (
        f"error: PORT {stack.api.port} is in use by another process; stop it or set PORT\n"
    ), output[-3000:]
    assert "started api pid=" not in output

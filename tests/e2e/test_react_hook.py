"""The React hook (static/session-sync-react.js) in a real Chromium, following a session of a
real API that is killed with SIGKILL and restarted, over a WebSocket and over Server-Sent Events:
a small test API (tests/e2e/answer_api.py), for renders per animation frame and UTF-16 offsets,
and the FastAPI example as its README runs it (an API and a worker), for a 1,000-token answer
that must end on the page equal to the database's, as the example's own page does.

One page (tests/e2e/react_page.html) for both. No bundler: React's own CommonJS builds,
installed in tests/js/node_modules, are wrapped as ES modules and named in the page's import
map, as a Vite-free page maps the ESM builds a CDN serves; the hook is imported from the path
both APIs serve the Python package's client at.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
import pytest

from examples.chat.worker import simulated_tokens

from .answer_api import AnswerApi, running_api
from .app_process import ExampleStack
from .test_example_processes import (
    ANSWER_INTERVAL,
    ANSWER_LEASE,
    ANSWER_TOKENS,
    in_database,
    started,
    through_api,
)

pytestmark = pytest.mark.e2e

NODE_MODULES = Path(__file__).resolve().parents[1] / "js" / "node_modules"
PAGE = Path(__file__).with_name("react_page.html")
WAIT_MS = 15_000  # every wait for the page, in ms

# Each module the page imports: React's production build of it, and what that file requires.
VENDOR = {
    "react": ("react/cjs/react.production.js", []),
    "scheduler": ("scheduler/cjs/scheduler.production.js", []),
    "react-dom": ("react-dom/cjs/react-dom.production.js", ["react"]),
    "react-dom/client": (
        "react-dom/cjs/react-dom-client.production.js",
        ["react", "react-dom", "scheduler"],
    ),
}


def as_es_module(source: str, requires: list[str], names: list[str]) -> str:
    """A CommonJS file as an ES module: its ``require`` calls become imports, its exports the
    module's default and named exports."""
    imports = "".join(f'import dep{i} from "{name}";\n' for i, name in enumerate(requires))
    table = ", ".join(f'"{name}": dep{i}' for i, name in enumerate(requires))
    return (
        f"{imports}const module = {{ exports: {{}} }};\n"
        'const process = { env: { NODE_ENV: "production" } };\n'
        f"const require = (name) => ({{ {table} }})[name];\n"
        f"(function (module, exports, require, process) {{\n{source}\n}})"
        "(module, module.exports, require, process);\n"
        "export default module.exports;\n"
        f"export const {{ {', '.join(names)} }} = module.exports;\n"
    )


def export_names() -> dict[str, list[str]]:
    """The names each vendored module exports, as Node.js loads React's production builds."""
    script = (
        "const names = {};"
        f"for (const name of {json.dumps(list(VENDOR))}) names[name] = Object.keys(require(name));"
        "console.log(JSON.stringify(names));"
    )
    result = subprocess.run(
        ["node", "--eval", script],
        cwd=NODE_MODULES.parent,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NODE_ENV": "production", "NODE_OPTIONS": ""},
        check=True,
    )
    names: dict[str, list[str]] = json.loads(result.stdout)
    return names


@pytest.fixture
def pages(tmp_path: Path) -> Path:
    """The page and React as ES modules, in a directory served at /pages/."""
    if not (NODE_MODULES / "react-dom").is_dir():
        if os.environ.get("CI"):
            pytest.fail("CI must run the hook's browser test: run `npm ci --prefix tests/js`")
        pytest.skip("run `npm ci --prefix tests/js` for React")
    directory = tmp_path / "pages"
    vendor = directory / "vendor"
    vendor.mkdir(parents=True)
    names = export_names()
    for name, (path, requires) in VENDOR.items():
        # The file the page's import map names for it: /pages/vendor/react-dom-client.js.
        file_name = name.replace("/", "-") + ".js"
        source = (NODE_MODULES / path).read_text(encoding="utf-8")
        (vendor / file_name).write_text(as_es_module(source, requires, names[name]))
    shutil.copy(PAGE, directory / PAGE.name)
    return directory


def page_url(base: str, source: str, transport: str, answer: str, heartbeat_ms: int) -> str:
    """The React page at ``base``, following ``source`` (see react_page.html's parameters)."""
    query = {"source": source, "transport": transport, "answer": answer}
    return f"{base}/pages/{PAGE.name}?{urlencode({**query, 'heartbeat': heartbeat_ms})}"


@pytest.fixture
def api(tmp_path: Path, pages: Path) -> Iterator[AnswerApi]:
    with running_api(tmp_path, pages=pages, heartbeat=1) as api:
        api.store.create("s1", "react")
        yield api


def wait_view(page: Any, condition: str, arg: object = None, timeout_ms: float = WAIT_MS) -> None:
    """Wait until ``condition`` (a JS expression over ``view``, ``text``, the answer's text
    shown, and ``arg``) holds, at most ``timeout_ms``."""
    page.wait_for_function(
        "(arg) => { const view = window.view;"
        " const text = document.querySelector('#text')?.textContent ?? '';"
        f" return view !== undefined && ({condition}); }}",
        arg=arg,
        timeout=timeout_ms,
    )


def stored(api: AnswerApi) -> tuple[str, int]:
    """The answer's text and the session's version, as the database has them."""
    found = api.store.read("s1")
    assert found is not None
    return found[0]["answer"]["text"], found[1]


STREAMED = 200  # deltas published 2 ms apart, about 8 per animation frame
BURST = 200  # deltas published back to back


@pytest.mark.parametrize("transport", ["websocket", "sse"])
def test_react_page_follows_a_session_through_kill_9_rendering_once_per_frame(
    browser: Any, api: AnswerApi, transport: str
) -> None:
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        path = "/sse/sessions/s1" if transport == "sse" else "/ws/sessions/s1"
        page.goto(page_url(api.url, path, transport, "answer", heartbeat_ms=1000))
        wait_view(page, "view.status === 'live' && view.version === 1 && view.streaming")

        # Deltas faster than the screen refreshes, as a model streams tokens: at most one
        # render per animation frame, so far fewer renders than deltas.
        before = page.evaluate("window.commits.length")
        version = api.post_tokens("s1", STREAMED, interval_ms=2)
        wait_view(page, "view.version === arg", version)
        streamed = page.evaluate("(before) => window.commits.slice(before)", before)
        # A burst published at once.
        before = page.evaluate("window.commits.length")
        version = api.post_tokens("s1", BURST)
        wait_view(page, "view.version === arg", version)
        burst = page.evaluate("(before) => window.commits.slice(before)", before)
        text, _ = stored(api)
        assert page.text_content("#text") == text == "token " * (STREAMED + BURST)

        # kill -9: the page says stale, keeps what it shows, and comes back equal to the
        # database, which changed while the API was down.
        api.kill()
        wait_view(page, "view.status === 'stale'")
        assert page.text_content("#text") == text
        assert page.is_visible("#streaming")
        api.store.append("s1", [" (written while the API was down)"])
        api.start()
        text, version = stored(api)
        wait_view(page, "view.status === 'live' && view.version === arg", version)
        assert page.text_content("#text") == text

        # Live deltas after the restart, whose offsets count UTF-16 code units ("👍🏽" is 4);
        # the answer completes, so nothing streams.
        version = api.post_tokens("s1", 3, text="👍🏽 ", status="complete")
        wait_view(page, "view.version === arg && !view.streaming", version)
        text, _ = stored(api)
        assert page.text_content("#text") == text

        # reconnect(): stale for a moment (maybe too short for a frame to show it), then live.
        marker = page.evaluate("window.statuses.length")
        page.evaluate("window.view.reconnect()")
        wait_view(page, "window.statuses.length > arg + 1 && view.status === 'live'", marker)
        reconnected = page.evaluate("(marker) => window.statuses.slice(marker)", marker)
        commits = page.evaluate("window.commits")
        statuses = page.evaluate("window.statuses")
    finally:
        page.close()

    assert errors == []
    down = " (written while the API was down)"
    assert text == "token " * (STREAMED + BURST) + down + "👍🏽 " * 3
    assert statuses == ["connecting", "live", "stale", "live", "stale", "live"]
    assert reconnected == ["stale", "live"]
    assert {commit["status"] for commit in commits} == {"connecting", "live", "stale"}
    assert commits[-1]["version"] == version
    # Each render follows an animation frame of its own: never two renders in one frame.
    frames = [commit["frame"] for commit in streamed]
    spanned = frames[-1] - frames[0] + 1
    assert len(frames) == len(set(frames)), f"two renders after one frame: {streamed}"
    assert len(streamed) <= STREAMED // 2, f"{len(streamed)} renders for {STREAMED} deltas"
    # Back to back, the deltas still take tens of ms through NATS and the socket: a few frames.
    frames = [commit["frame"] for commit in burst]
    assert len(frames) == len(set(frames)), f"two renders after one frame: {burst}"
    assert 1 <= len(burst) <= BURST // 10, f"{len(burst)} renders for a burst of {BURST} deltas"
    print(
        f"react hook over {transport}: {STREAMED} deltas 2 ms apart, {len(streamed)} renders"
        f" over {spanned} animation frames; {BURST} deltas at once, {len(burst)} renders"
    )


@pytest.fixture
def fastapi_example(tmp_path: Path) -> Iterator[ExampleStack]:
    """The FastAPI example as processes (an API with its private nats-server, and a worker),
    answering 1,000 tokens at 125 a second, as test_example_processes.py's kill tests run it."""
    env = {
        "RESPONSE_TOKENS": str(ANSWER_TOKENS),
        "TOKEN_INTERVAL": str(ANSWER_INTERVAL),
        "LEASE_SECONDS": str(ANSWER_LEASE),
    }
    with started(ExampleStack("examples.fastapi_app", tmp_path, env)) as stack:
        yield stack


def serve_pages(page: Any, base: str, directory: Path) -> None:
    """Answer ``page``'s requests for ``base``/pages/... from ``directory``, in the browser.

    The example serves no test pages, and the page must be of the example's origin: an
    EventSource to another origin needs CORS headers that the example does not send. Every other
    request (the hook's script, the WebSocket, the event stream) goes to the example itself.
    """

    def fulfill(route: Any) -> None:
        route.fulfill(path=directory / urlsplit(route.request.url).path.removeprefix("/pages/"))

    page.route(f"{base}/pages/**", fulfill)


ALICE = {"Authorization": "Bearer alice"}
# ms: twice the answer's length, and 5 s for the restart in it.
ANSWER_WAIT_MS = ANSWER_TOKENS * ANSWER_INTERVAL * 1000 * 2 + 5000


@pytest.mark.parametrize("transport", ["websocket", "sse"])
def test_react_page_follows_the_fastapi_example_through_kill_9_and_ends_equal_to_the_database(
    browser: Any, pages: Path, fastapi_example: ExampleStack, transport: str
) -> None:
    api = fastapi_example.api
    session = httpx.post(f"{api.url}/api/sessions", json={"title": "React"}, headers=ALICE).json()
    session_id = session["id"]
    # Neither a browser's WebSocket nor its EventSource sends headers: the token is in the URL.
    route = "sse" if transport == "sse" else "ws"
    source = f"/{route}/sessions/{session_id}?token=alice"
    context = browser.new_context()
    # Chromium counts a page the browser fulfilled itself (serve_pages) as of the public
    # network, and blocks its WebSockets to 127.0.0.1 unless this origin may reach the local
    # network, as a user would allow it.
    context.grant_permissions(["local-network-access"], origin=api.url)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    sockets: list[str] = []
    page.on("websocket", lambda socket: sockets.append(socket.url))
    streams: list[str] = []
    page.on(
        "request",
        lambda request: streams.append(request.url) if "/sse/sessions/" in request.url else None,
    )
    serve_pages(page, api.url, pages)
    try:
        # The example's heartbeat comes every 15 s (examples/chat/live.py), as its page expects.
        page.goto(page_url(api.url, source, transport, "interaction", heartbeat_ms=15_000))
        # A reload would lose this: the checks below prove the page recovered by itself.
        page.evaluate("window.loadMarker = 'first load'")
        wait_view(page, "view.status === 'live' && view.version === arg", session["version"])
        prompt = {"prompt": "Tell me a long story"}
        httpx.post(
            f"{api.url}/api/sessions/{session_id}/prompts", json=prompt, headers=ALICE
        ).raise_for_status()
        wait_view(page, "view.streaming && text.split(' ').length >= 3")

        # kill -9 mid-answer: the hook says stale and the page keeps what it shows, while the
        # worker goes on writing the answer to the database.
        api.kill()
        wait_view(page, "view.status === 'stale'")
        assert not in_database(fastapi_example.db, session_id)["done"], "ended before the kill"
        assert page.is_visible("#streaming")

        returned = api.start()
        version = in_database(fastapi_example.db, session_id)["version"]
        wait_view(page, "view.status === 'live' && view.version >= arg", version)
        took = time.monotonic() - returned
        # The worker never stopped: the answer streams on over the new connection, to its end.
        back = len(page.text_content("#text") or "")
        assert page.evaluate("window.view.streaming"), "no streaming left after the restart"
        wait_view(page, "text.length > arg", back)
        wait_view(page, "view.session.interactions[0].done", timeout_ms=ANSWER_WAIT_MS)
        shown = page.evaluate(
            """() => ({
              text: document.querySelector("#text").textContent,
              answer: document.querySelector("#answer-status").textContent,
              status: window.view.status,
              version: window.view.version,
              streaming: window.view.streaming,
            })"""
        )
        statuses = page.evaluate("window.statuses")
        marker = page.evaluate("window.loadMarker")
    finally:
        context.close()

    stored = through_api(fastapi_example, session_id)
    assert stored["done"], stored
    assert stored["status"] == "complete", stored
    assert stored["interrupted"] is None, stored
    assert stored["response"] == "".join(simulated_tokens(ANSWER_TOKENS))
    # The page's text is the database's, character for character, at the database's version.
    assert shown["text"] == stored["response"]
    assert shown["answer"] == "complete"
    assert shown["version"] == stored["version"]
    assert not shown["streaming"]
    assert len(shown["text"]) > back
    # The hook went stale with the API, and back to live once, without a reload.
    assert shown["status"] == "live"
    assert statuses == ["connecting", "live", "stale", "live"], statuses
    assert marker == "first load", "the page was reloaded"
    assert errors == []
    # Over the transport asked for only, reopened after the kill, the token in every URL; each
    # event stream reopened resumed from a version.
    opened, unused = (streams, sockets) if transport == "sse" else (sockets, streams)
    assert unused == [], unused
    assert len(opened) >= 2, opened
    assert all("token=alice" in url for url in opened), opened
    if transport == "sse":
        assert all("since=" in url for url in streams[1:]), streams
    print(f"react hook over {transport} on the FastAPI example: live {took:.2f}s after restart")

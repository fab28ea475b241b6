"""The FastAPI example for real: its own process, a nats-server process, headless Chromium.

The test owns both processes and SIGKILLs them, as a crash or a deploy would, while the page
stays open; the page must show the database's current state within 2 s of the server's return,
without a reload.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest

from examples.fastapi_app.responder import simulated_tokens

from .app_process import AppProcess, NatsProcess, free_port

pytestmark = pytest.mark.e2e

FINAL_TEXT = "".join(simulated_tokens(15))  # the app's default response
RECOVERY = 2.0  # seconds from the server's return to a current page
NO_VERSION = "\N{EN DASH}"  # what #version shows before any state
WAIT_MS = 5_000  # bound on every other wait in the page

# The page's state as the user sees it, read from the DOM.
PAGE_STATE = """() => ({
  state: document.querySelector("#state").textContent,
  version: document.querySelector("#version").textContent,
  interactions: [...document.querySelectorAll("[data-testid=interaction]")].map((item) => ({
    prompt: item.querySelector("[data-testid=prompt]").textContent,
    response: item.querySelector("[data-testid=response]").textContent,
    done: item.dataset.done === "true",
  })),
})"""
SHOWS = f"""(expected) => {{
  const shown = ({PAGE_STATE})();
  return shown.state === "live" && shown.version === expected.version
    && JSON.stringify(shown.interactions) === JSON.stringify(expected.interactions);
}}"""


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsProcess]:
    server = NatsProcess(free_port(), tmp_path / "nats-server.log")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return tmp_path / "example.sqlite3"


@pytest.fixture
def app(tmp_path: Path, nats: NatsProcess, database: Path) -> Iterator[AppProcess]:
    env = {"DATABASE_URL": f"sqlite+aiosqlite:///{database}", "NATS_URL": nats.url}
    process = AppProcess("examples.fastapi_app", free_port(), env, tmp_path / "app.log")
    process.start()
    try:
        yield process
    finally:
        process.stop()
    assert "Traceback" not in process.output(), process.output()[-3000:]


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    try:
        yield page
    finally:
        context.close()


def open_page(page: Any, app: AppProcess, query: str) -> None:
    page.goto(f"{app.url}/?{query}")
    # A reload would lose this: the checks below prove the page recovered by itself.
    page.evaluate("window.loadMarker = 'first load'")


def start_session_with_prompt(page: Any, prompt: str) -> str:
    """Create a session and send a prompt through the page's forms; return the session id."""
    page.fill("#new-session input[name=title]", "Live demo")
    page.click("#new-session button")
    page.wait_for_function("document.querySelector('#state').textContent === 'live'")
    page.fill("#new-prompt input[name=prompt]", prompt)
    page.click("#new-prompt button")
    session_id = page.text_content("#session-id")
    assert isinstance(session_id, str)
    assert len(session_id) == 32
    return session_id


def change_database(database: Path, session_id: str, *, finish: bool, prompt: str) -> int:
    """Change the session behind the app's back, as another writer would; return its version.

    Finishes the first interaction's response when ``finish``, appends an answered interaction,
    and bumps the version once, in one transaction. Publishes nothing.
    """
    with closing(sqlite3.connect(database, timeout=5)) as db, db:
        (version,) = db.execute(
            "UPDATE chat_sessions SET version = version + 1 WHERE id = ? RETURNING version",
            (session_id,),
        ).fetchone()
        if finish:
            db.execute(
                "UPDATE interactions SET response = ?, done = 1 "
                "WHERE session_id = ? AND position = 0",
                (FINAL_TEXT, session_id),
            )
        db.execute(
            "INSERT INTO interactions (session_id, position, prompt, response, done) "
            "VALUES (?, 1, ?, 'Answered by another writer.', 1)",
            (session_id, prompt),
        )
    return int(version)


def first_response(database: Path, session_id: str) -> tuple[str, bool]:
    with closing(sqlite3.connect(database, timeout=5)) as db:
        response, done = db.execute(
            "SELECT response, done FROM interactions WHERE session_id = ? AND position = 0",
            (session_id,),
        ).fetchone()
    return str(response), bool(done)


def wait_until_page_shows(
    page: Any, expected: dict[str, Any], *, since: float, logs: str = ""
) -> float:
    """Wait until the page shows ``expected`` and is live, at most RECOVERY s after ``since``.

    Returns the seconds it took from ``since``.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    remaining_ms = (since + RECOVERY - time.monotonic()) * 1000
    assert remaining_ms > 1, "no time left to wait for the page"  # 0 would mean no timeout
    try:
        page.wait_for_function(SHOWS, arg=expected, timeout=remaining_ms)
    except PlaywrightTimeout:
        shown = page.evaluate(PAGE_STATE)
        pytest.fail(
            f"the page was not current {RECOVERY}s after the server's return:\n"
            f"shown:    {shown}\nexpected: {expected}\n{logs[-3000:]}"
        )
    return time.monotonic() - since


def screenshot(page: Any, path: Path) -> Path:
    page.screenshot(path=path, full_page=True)
    print(f"screenshot: {path}")
    return path


def test_page_shows_state_written_while_the_api_was_down(
    app: AppProcess, database: Path, page: Any, tmp_path: Path
) -> None:
    open_page(page, app, "token=alice")
    session_id = start_session_with_prompt(page, "Tell me something")
    # Tokens arrive live, then the API dies mid-stream.
    page.wait_for_function(
        "(document.querySelector('[data-testid=response]')?.textContent ?? '')"
        ".split(' ').length >= 3"
    )
    app.kill()
    page.wait_for_function("document.querySelector('#state').textContent === 'reconnecting'")
    response, done = first_response(database, session_id)
    assert not done, f"the stream finished before the kill: {response!r}"

    version = change_database(database, session_id, finish=True, prompt="Written while down")
    returned = app.start()
    took = wait_until_page_shows(
        page,
        {
            "version": str(version),
            "interactions": [
                {"prompt": "Tell me something", "response": FINAL_TEXT, "done": True},
                {
                    "prompt": "Written while down",
                    "response": "Answered by another writer.",
                    "done": True,
                },
            ],
        },
        since=returned,
        logs=app.output(),
    )

    assert page.evaluate("window.loadMarker") == "first load", "the page was reloaded"
    path = screenshot(page, tmp_path / "fastapi-api-restart.png")
    print(f"current {took:.2f}s after the API accepted connections again; screenshot: {path}")


def test_page_shows_state_changed_while_nats_was_down(
    app: AppProcess, nats: NatsProcess, database: Path, page: Any, tmp_path: Path
) -> None:
    open_page(page, app, "token=alice")
    session_id = start_session_with_prompt(page, "Stream it all")
    page.wait_for_function(
        "document.querySelector('[data-testid=interaction]')?.dataset.done === 'true'",
        timeout=10_000,
    )

    nats.kill()
    # Changed with the broker down, and published nowhere: only a resync can bring it.
    version = change_database(database, session_id, finish=False, prompt="Written, not published")
    returned = nats.start()
    took = wait_until_page_shows(
        page,
        {
            "version": str(version),
            "interactions": [
                {"prompt": "Stream it all", "response": FINAL_TEXT, "done": True},
                {
                    "prompt": "Written, not published",
                    "response": "Answered by another writer.",
                    "done": True,
                },
            ],
        },
        since=returned,
        logs=app.output(),
    )

    # The WebSocket stayed open throughout: the bridge's resync brought the state over it.
    assert page.evaluate("window.stateLog") == ["connecting", "live"]
    assert page.evaluate("window.loadMarker") == "first load", "the page was reloaded"
    path = screenshot(page, tmp_path / "fastapi-nats-restart.png")
    print(f"current {took:.2f}s after nats-server accepted connections again; screenshot: {path}")


def test_another_user_never_sees_the_session(app: AppProcess, page: Any, tmp_path: Path) -> None:
    with httpx.Client(base_url=app.url, timeout=5) as client:
        alice = {"Authorization": "Bearer alice"}
        created = client.post("/api/sessions", json={"title": "Private"}, headers=alice)
        session_id = created.json()["id"]
        # A response streams while bob looks: there are live updates to leak.
        prompt = client.post(
            f"/api/sessions/{session_id}/prompts", json={"prompt": "Secret plans"}, headers=alice
        )
        assert prompt.status_code == 202
        bob = {"Authorization": "Bearer bob"}
        assert client.get(f"/api/sessions/{session_id}", headers=bob).status_code == 404

    open_page(page, app, f"token=bob&session={session_id}")
    page.wait_for_function("!document.querySelector('#error').hidden")
    assert page.text_content("#error") == f"No session {session_id} for bob."
    # And the socket itself refuses bob, before any frame, even asked directly.
    ws_url = app.url.replace("http://", "ws://") + f"/ws/sessions/{session_id}?token=bob"
    outcome = page.evaluate(
        """(url) => new Promise((resolve) => {
          const frames = [];
          const socket = new WebSocket(url);
          socket.onmessage = (message) => frames.push(message.data);
          socket.onclose = (event) => resolve({ opened: event.wasClean, frames });
          setTimeout(() => resolve({ timeout: true, frames }), 5000);
        })""",
        ws_url,
    )
    assert outcome == {"opened": False, "frames": []}
    shown = page.evaluate(PAGE_STATE)
    assert shown["interactions"] == []
    assert shown["version"] == NO_VERSION
    assert "Secret plans" not in page.content()
    screenshot(page, tmp_path / "fastapi-other-user.png")

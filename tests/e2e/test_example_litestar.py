"""The Litestar example as users run it: real processes, Chromium, and restarts by SIGKILL.

``python -m examples.litestar_app`` runs on a temporary SQLite file, against a nats-server this
module starts itself, so that it can kill the broker and bring it back on the same port. While
the app or the broker is down, the test changes the database directly, as another replica or a
worker would; the page must show that state soon after the server is back, without a reload.
"""

from __future__ import annotations

import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .app_process import AppProcess, NatsProcess, free_port

pytestmark = pytest.mark.e2e

MODULE = "examples.litestar_app"
# The page must be current within this long after the restarted server accepts connections.
RECOVERY_MS = 2000
# Every other wait in the browser.
WAIT_MS = 10_000

RESPONSE = "[data-testid=interaction][data-position='0'] [data-testid=response]"

SHOWS_STATE = """({version, responses}) => {
  const items = [...document.querySelectorAll("[data-testid=interaction]")];
  return document.querySelector("#version").textContent === String(version)
    && items.length === responses.length
    && items.every((item, i) => item.dataset.done === "true"
      && item.querySelector("[data-testid=response]").textContent === responses[i]);
}"""


@dataclass
class Stack:
    """The app, its broker and its database file."""

    app: AppProcess
    nats: NatsProcess
    db: Path


def running(pattern: str) -> set[int]:
    """Ids of the processes whose command line matches ``pattern`` (``pgrep -f``)."""
    found = subprocess.run(
        ["pgrep", "-f", pattern], capture_output=True, text=True, timeout=10, check=False
    )
    return {int(pid) for pid in found.stdout.split()}


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    nats = NatsProcess(free_port(), tmp_path / "nats-server.log")
    db = tmp_path / "chat.db"
    env = {"DATABASE_URL": f"sqlite:///{db}", "NATS_URL": nats.url, "HOST": "127.0.0.1"}
    app = AppProcess(MODULE, free_port(), env, tmp_path / "app.log")
    stack = Stack(app, nats, db)
    try:
        stack.nats.start()
        stack.app.start()
        yield stack
    finally:
        app.stop()
        nats.stop()
    # Other test runs may have processes of their own: only ours must be gone.
    assert not running(MODULE) & app.started, "an app process outlived the test"
    assert not running("nats-server") & nats.started, "a nats-server outlived the test"


def open_page(browser: Any, url: str) -> Any:
    page = browser.new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(url)
    return page


def create_session(page: Any, title: str) -> str:
    """Create a session from the page's form; return its id once the page is live on it."""
    page.fill("#title", title)
    page.click("#create")
    page.wait_for_function(
        "document.body.dataset.state === 'live' "
        "&& document.querySelector('#version').textContent === '1'"
    )
    session_id = page.text_content("#session-id")
    assert session_id is not None
    assert len(session_id) == 32
    return session_id


def send_prompt(page: Any, prompt: str) -> None:
    page.fill("#prompt", prompt)
    page.click("#send")


def write_db(db: Path, statements: list[tuple[str, tuple[Any, ...]]], session_id: str) -> int:
    """Run ``statements`` and bump the session's version in one transaction; return it."""
    with closing(sqlite3.connect(db, timeout=5)) as connection, connection:
        for sql, parameters in statements:
            connection.execute(sql, parameters)
        connection.execute(
            "UPDATE chat_sessions SET version = version + 1 WHERE id = ?", (session_id,)
        )
        (version,) = connection.execute(
            "SELECT version FROM chat_sessions WHERE id = ?", (session_id,)
        ).fetchone()
    return int(version)


def add_interaction(session_id: str, position: int, prompt: str, response: str) -> Any:
    return (
        "INSERT INTO interactions (session_id, position, prompt, response, done) "
        "VALUES (?, ?, ?, ?, 1)",
        (session_id, position, prompt, response),
    )


def test_api_restart_page_shows_the_final_state_without_reloading(
    browser: Any, stack: Stack, tmp_path: Path
) -> None:
    page = open_page(browser, f"{stack.app.url}/?token=alice")
    try:
        session_id = create_session(page, "API restart")
        page_load = page.evaluate("window.pageLoadId")
        send_prompt(page, "Tell me something slowly")
        # A few tokens have arrived and the response is still streaming.
        page.wait_for_function(
            f"document.querySelector(\"{RESPONSE}\")?.textContent.split(' ').length >= 3"
        )
        assert page.get_attribute("[data-testid=interaction]", "data-done") == "false"

        stack.app.kill()
        # While the API is down, a worker finishes the stream and another prompt is answered.
        version = write_db(
            stack.db,
            [
                (
                    "UPDATE interactions SET response = ?, done = 1 "
                    "WHERE session_id = ? AND position = 0",
                    ("Finished while the API was down.", session_id),
                ),
                add_interaction(session_id, 1, "Are you back?", "Yes, and current."),
            ],
            session_id,
        )
        stack.app.start()
        page.wait_for_function(
            SHOWS_STATE,
            arg={
                "version": version,
                "responses": ["Finished while the API was down.", "Yes, and current."],
            },
            timeout=RECOVERY_MS,
        )
        assert page.evaluate("window.pageLoadId") == page_load, "the page reloaded"
        assert page.text_content("#state") == "live"
        page.screenshot(path=tmp_path / "api-restart.png", full_page=True)
    finally:
        page.close()


def test_nats_restart_page_shows_the_current_state_over_the_same_socket(
    browser: Any, stack: Stack, tmp_path: Path
) -> None:
    page = open_page(browser, f"{stack.app.url}/?token=alice")
    try:
        session_id = create_session(page, "NATS restart")
        page_load = page.evaluate("window.pageLoadId")

        stack.nats.kill()
        # While NATS is down, nothing can be published: only the database knows this change.
        version = write_db(
            stack.db,
            [add_interaction(session_id, 0, "Where is NATS?", "Changed while NATS was down.")],
            session_id,
        )
        stack.nats.start()
        page.wait_for_function(
            SHOWS_STATE,
            arg={"version": version, "responses": ["Changed while NATS was down."]},
            timeout=RECOVERY_MS,
        )
        # The bridge's resync sent it over the open WebSocket: the page never reconnected.
        assert page.evaluate("window.stateHistory") == ["connecting", "live"]
        assert page.evaluate("window.pageLoadId") == page_load, "the page reloaded"
        page.screenshot(path=tmp_path / "nats-restart.png", full_page=True)
    finally:
        page.close()


def test_another_user_never_sees_the_session(browser: Any, stack: Stack, tmp_path: Path) -> None:
    alice = open_page(browser, f"{stack.app.url}/?token=alice")
    bob = None
    try:
        session_id = create_session(alice, "Alice's session")
        send_prompt(alice, "alice's secret prompt")
        alice.wait_for_function(f"document.querySelector(\"{RESPONSE}\")?.textContent !== ''")

        bob = open_page(browser, f"{stack.app.url}/?token=bob&session={session_id}")
        # Bob's page tried, was refused, and keeps retrying: that is all it ever gets.
        bob.wait_for_function(
            "window.stateHistory.filter((state) => state === 'reconnecting').length >= 2 "
            "&& document.querySelector('#error').textContent !== ''"
        )
        assert bob.text_content("#error") == "no such session"
        assert bob.locator("[data-testid=interaction]").count() == 0
        assert bob.text_content("#version") == "-"
        assert "secret" not in bob.content()

        # Asked directly: the WebSocket closes without a frame, the API answers 404.
        socket = bob.evaluate(
            """(url) => new Promise((resolve, reject) => {
                 const frames = [];
                 const ws = new WebSocket(url);
                 ws.onmessage = (message) => frames.push(message.data);
                 ws.onclose = () => resolve(frames);
                 setTimeout(() => reject(new Error("no close within 5 s")), 5000);
               })""",
            f"{stack.app.url.replace('http', 'ws')}/ws/sessions/{session_id}?token=bob",
        )
        assert socket == []
        status = bob.evaluate(
            """(url) => fetch(url, {
                 headers: {Authorization: "Bearer bob"}, signal: AbortSignal.timeout(5000),
               }).then((response) => response.status)""",
            f"{stack.app.url}/api/sessions/{session_id}",
        )
        assert status == 404
        bob.screenshot(path=tmp_path / "another-user.png", full_page=True)
    finally:
        alice.close()
        if bob is not None:
            bob.close()

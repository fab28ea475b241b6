"""The FastAPI example for real: its API and worker processes, headless Chromium.

What its page shows another user. The restarts (API, worker, broker) are in
``test_example_processes.py``, for both examples.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .app_process import AppProcess, ExampleStack

pytestmark = pytest.mark.e2e

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


@pytest.fixture
def app(tmp_path: Path) -> Iterator[AppProcess]:
    """The API, with its private nats-server, and a worker streaming the responses."""
    stack = ExampleStack("examples.fastapi_app", tmp_path, {})
    stack.start()
    try:
        yield stack.api
    finally:
        stack.stop()
    assert "Traceback" not in stack.output(), stack.output()


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


def screenshot(page: Any, path: Path) -> Path:
    page.screenshot(path=path, full_page=True)
    print(f"screenshot: {path}")
    return path


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
    # And the socket itself refuses bob before any frame, even asked directly: the loader's
    # owner check refuses the snapshot, so the route closes with 1008 (final) and forwards
    # nothing.
    ws_url = app.url.replace("http://", "ws://") + f"/ws/sessions/{session_id}?token=bob"
    outcome = page.evaluate(
        """(url) => new Promise((resolve) => {
          const frames = [];
          const socket = new WebSocket(url);
          socket.onmessage = (message) => frames.push(message.data);
          socket.onclose = (event) => resolve({ code: event.code, frames });
          setTimeout(() => resolve({ timeout: true, frames }), 5000);
        })""",
        ws_url,
    )
    assert outcome == {"code": 1008, "frames": []}
    shown = page.evaluate(PAGE_STATE)
    assert shown["interactions"] == []
    assert shown["version"] == NO_VERSION
    assert "Secret plans" not in page.content()
    screenshot(page, tmp_path / "fastapi-other-user.png")

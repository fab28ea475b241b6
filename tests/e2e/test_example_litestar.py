"""The Litestar example as users run it: its API and worker processes, and Chromium.

What its page shows another user. The restarts (API, worker, broker) are in
``test_example_processes.py``, for both examples.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .app_process import ExampleStack

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


def running(pattern: str) -> set[int]:
    """Ids of the processes whose command line matches ``pattern`` (``pgrep -f``)."""
    found = subprocess.run(
        ["pgrep", "-f", pattern], capture_output=True, text=True, timeout=10, check=False
    )
    return {int(pid) for pid in found.stdout.split()}


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[ExampleStack]:
    """The API, with its private nats-server, and a worker streaming the responses."""
    stack = ExampleStack(MODULE, tmp_path, {"HOST": "127.0.0.1"})
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
    # Other test runs may have processes of their own: only ours must be gone.
    ours = stack.api.started | stack.worker.started
    assert not running(MODULE) & ours, "an example process outlived the test"
    assert "Traceback" not in stack.output(), stack.output()


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


def test_another_user_never_sees_the_session(
    browser: Any, stack: ExampleStack, tmp_path: Path
) -> None:
    alice = open_page(browser, f"{stack.api.url}/?token=alice")
    bob = None
    try:
        session_id = create_session(alice, "Alice's session")
        send_prompt(alice, "alice's secret prompt")
        alice.wait_for_function(f"document.querySelector(\"{RESPONSE}\")?.textContent !== ''")

        bob = open_page(browser, f"{stack.api.url}/?token=bob&session={session_id}")
        # Bob's page asked the API first, got a 404, and never opened a socket to retry.
        bob.wait_for_function("document.querySelector('#error').textContent !== ''")
        assert bob.text_content("#error") == f"No session {session_id} for bob."
        assert bob.evaluate("window.stateLog") == []
        assert bob.locator("[data-testid=interaction]").count() == 0
        assert bob.text_content("#version") == "\N{EN DASH}"
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
            f"{stack.api.url.replace('http', 'ws')}/ws/sessions/{session_id}?token=bob",
        )
        assert socket == []
        status = bob.evaluate(
            """(url) => fetch(url, {
                 headers: {Authorization: "Bearer bob"}, signal: AbortSignal.timeout(5000),
               }).then((response) => response.status)""",
            f"{stack.api.url}/api/sessions/{session_id}",
        )
        assert status == 404
        bob.screenshot(path=tmp_path / "another-user.png", full_page=True)
    finally:
        alice.close()
        if bob is not None:
            bob.close()


def test_a_refused_token_opens_no_socket_to_retry(browser: Any, stack: ExampleStack) -> None:
    # The API answers 401 for a token it does not know: final, like a 404, so the page says so
    # and never opens a socket that would be refused again and again.
    page = open_page(browser, f"{stack.api.url}/?token=bad!tok&session=s1")
    try:
        page.wait_for_function("document.querySelector('#error').textContent !== ''")
        assert page.text_content("#error").startswith("Cannot open s1:")
        assert page.evaluate("window.stateLog") == []
    finally:
        page.close()

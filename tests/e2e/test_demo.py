"""The demo as a newcomer runs it: ``python -m examples.fastapi_app`` with its defaults, Chromium.

Issue 21's "demo that shows its point": the page names the API's and the worker's pids and
what each kill shows; ``kill -9`` of the API (its pid read from the page) mid-answer visibly
resumes the stream once the launcher has restarted it, and the answer ends equal to the
database's text; a prompt sent while the API was down says so in words, and once the API is
back says what to do, never "Failed to fetch" beside a live connection.

Only the ports and the SQLite file are the test's own; the answer's length and rate, the lease
and the restart delay are the launcher's defaults. The screenshots go to the test's temporary
directory (each path is printed); with ``UPDATE_DEMO_IMAGES=1`` they are also copied to
``docs/images/demo-*.png``, which the examples' README shows.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from examples.chat.worker import simulated_tokens

from .app_process import ROOT, ServerProcess, children_named, free_port, wait_until_gone

pytestmark = pytest.mark.e2e

MODULE = "examples.fastapi_app"
DEFAULT_TOKENS = 400  # RESPONSE_TOKENS's default: an 8 s answer at 50 tokens a second
# The examples' variables: none of the caller's leaks into the demo, which runs on defaults.
VARIABLES = {
    "DATABASE_URL",
    "NATS_URL",
    "NATS_PORT",
    "NATS_PASSWORD",
    "HOST",
    "PORT",
    "RESPONSE_TOKENS",
    "TOKEN_INTERVAL",
    "LEASE_SECONDS",
}
RESTART_WAIT_MS = 15_000  # the launcher's restart (1 s) and the API's start, on a busy machine
WAIT_MS = 10_000  # every other wait in the page
IMAGES = ROOT / "docs" / "images"

RESPONSE = "[data-testid=interaction][data-position='0'] [data-testid=response]"
# The first answer as the page shows it.
ANSWER = """() => {
  const item = document.querySelector("[data-testid=interaction]");
  return {
    response: item.querySelector("[data-testid=response]").textContent,
    status: item.dataset.status,
    done: item.dataset.done === "true",
    version: Number(document.querySelector("#version").textContent),
  };
}"""


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[ServerProcess]:
    """``python -m examples.fastapi_app``: the launcher, its API and its worker."""
    port = free_port()
    launcher = ServerProcess(
        [sys.executable, "-m", MODULE],
        port,
        tmp_path / "launcher.log",
        {
            "PORT": str(port),
            "NATS_PORT": str(free_port()),
            "DATABASE_URL": f"sqlite:///{tmp_path / 'demo.sqlite3'}",
        },
        ready_line="worker ready",
    )
    for name in VARIABLES - {"PORT", "NATS_PORT", "DATABASE_URL"}:
        launcher.env.pop(name, None)
    launcher.start()
    try:
        yield launcher
    finally:
        children = {pid for _, pid in started(launcher)}
        launcher.stop()  # SIGTERM: the launcher stops both children
        assert wait_until_gone(children, 10.0) == set(), "a child outlived the launcher"
    # The API's SIGKILL is the only crash: nothing raised.
    assert "Traceback" not in launcher.output(), launcher.output()[-3000:]


def started(launcher: ServerProcess) -> list[tuple[str, int]]:
    """The children the launcher started, in order, as it printed them: (name, pid)."""
    return [
        (name, int(pid))
        for name, pid in re.findall(r"started (api|worker) pid=(\d+)", launcher.output())
    ]


@pytest.fixture
def shots(tmp_path: Path) -> Iterator[list[Path]]:
    """The screenshots taken; copied to docs/images after the test when asked to."""
    taken: list[Path] = []
    yield taken
    if os.environ.get("UPDATE_DEMO_IMAGES") == "1":
        IMAGES.mkdir(parents=True, exist_ok=True)
        for path in taken:
            shutil.copyfile(path, IMAGES / path.name)
            print(f"copied to {IMAGES / path.name}")


def screenshot(page: Any, shots: list[Path], directory: Path, name: str) -> None:
    path = directory / f"demo-{name}.png"
    page.screenshot(path=path)
    shots.append(path)
    print(f"screenshot: {path}")


def test_kill_9_of_the_api_mid_answer_visibly_resumes_the_stream(
    demo: ServerProcess, browser: Any, shots: list[Path], tmp_path: Path
) -> None:
    assert demo.port is not None
    url = f"http://127.0.0.1:{demo.port}"
    pids = dict(started(demo))
    api_pid, worker_pid = pids["api"], pids["worker"]
    context = browser.new_context(viewport={"width": 860, "height": 760})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    try:
        page.goto(f"{url}/?token=alice")
        page.evaluate("window.loadMarker = 'first load'")
        # The page says what to try, with the pids to kill.
        page.wait_for_function(
            "document.querySelector('#api-pid').textContent !== '…' "
            "&& document.querySelector('#worker-pids').textContent !== '…'"
        )
        assert page.text_content("#kill-api") == f"kill -9 {api_pid}"
        assert page.text_content("#kill-worker") == f"kill -9 {worker_pid}"
        assert page.title() == "Live chat · asgi-session-sync FastAPI example"

        page.fill("#title", "Demo")
        page.click("#create")
        page.wait_for_function("document.querySelector('#state').textContent === 'live'")
        session_id = page.text_content("#session-id")
        page.fill("#prompt", "What does this demo show?")
        page.click("#send")
        page.wait_for_function(
            f"(document.querySelector(\"{RESPONSE}\")?.textContent ?? '').split(' ').length >= 25"
        )
        screenshot(page, shots, tmp_path, "1-streaming")

        [nats_server] = children_named(api_pid, "nats-server")
        os.kill(api_pid, signal.SIGKILL)
        page.wait_for_function("document.querySelector('#state').textContent === 'reconnecting'")
        # The panel shows the killed API as down.
        page.wait_for_selector("#kill-api[data-down=true]")
        down = page.evaluate(ANSWER)
        assert not down["done"], "the answer ended before the kill"
        # A prompt sent while the API is down: not sent, and the page says so in words.
        page.fill("#prompt", "Are you there?")
        page.click("#send")
        page.wait_for_function("document.querySelector('#error').dataset.kind === 'outage'")
        outage = page.text_content("#error") or ""
        assert "did not answer" in outage, outage
        assert "Failed to fetch" not in outage
        screenshot(page, shots, tmp_path, "2-api-down")

        # The launcher restarts the API; the page reconnects by itself, current at once.
        page.wait_for_function(
            "document.querySelector('#state').textContent === 'live'", timeout=RESTART_WAIT_MS
        )
        back = page.evaluate(ANSWER)
        assert back["version"] >= down["version"]
        assert len(back["response"]) >= len(down["response"])
        # The failed prompt's notice now says what to do, beside the live connection.
        page.wait_for_function("document.querySelector('#error').dataset.kind === 'note'")
        note = page.text_content("#error") or ""
        assert note == "The API is back. Your prompt was not sent: press Send to send it."
        assert page.input_value("#prompt") == "Are you there?"
        # Visibly resumes: the worker never stopped, and the text grows again on the page.
        assert not back["done"], "the answer ended before the API was back: nothing to see"
        page.wait_for_function(
            f"({ANSWER})().response.length > {len(back['response'])} + 20", timeout=WAIT_MS
        )
        # The panel names the new API process, the one the launcher started.
        page.wait_for_function(
            f"document.querySelector('#api-pid').textContent !== '{api_pid}'",
            timeout=RESTART_WAIT_MS,
        )
        [(_, first), (_, restarted)] = [child for child in started(demo) if child[0] == "api"]
        assert first == api_pid
        assert page.text_content("#kill-api") == f"kill -9 {restarted}"
        # The end of the text, where it grows, in view (the bar with the connection stays).
        page.locator("[data-testid=interaction] .meta").scroll_into_view_if_needed()
        screenshot(page, shots, tmp_path, "3-resumed")

        page.wait_for_function(f"({ANSWER})().done", timeout=WAIT_MS * 2)
        page.locator("[data-testid=interaction] .meta").scroll_into_view_if_needed()
        screenshot(page, shots, tmp_path, "4-complete")
        shown = page.evaluate(ANSWER)
        stored = httpx.get(
            f"{url}/api/sessions/{session_id}",
            headers={"Authorization": "Bearer alice"},
            timeout=5,
        ).json()
        [answer] = stored["interactions"]
        assert answer["status"] == shown["status"] == "complete"
        assert shown["response"] == answer["response"] == "".join(simulated_tokens(DEFAULT_TOKENS))
        assert shown["version"] == stored["version"]
        assert page.evaluate("window.loadMarker") == "first load", "the page was reloaded"
        assert wait_until_gone({nats_server}, 2.0) == set(), "nats-server outlived its API"
    finally:
        context.close()

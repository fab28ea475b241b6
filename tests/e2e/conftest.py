"""A real uvicorn server in a background thread, for end-to-end tests over real sockets."""

from __future__ import annotations

import os
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import uvicorn

from asgi_session_sync._types import ASGIApp, Receive, Scope, Send

# Every wait on the server thread is bounded by this many seconds.
WAIT = 5.0


class SwappableApp:
    """The ASGI app uvicorn serves: forwards to whichever app the current test installed.

    One server per WebSocket implementation serves the whole session (starting and stopping
    uvicorn costs a few hundred milliseconds), so each test swaps in its own app. Exceptions
    the app raises are kept in ``errors`` for the test to check, since uvicorn only logs them.
    """

    def __init__(self) -> None:
        self.app: ASGIApp | None = None
        self.errors: list[Exception] = []
        self._running = 0
        self._idle = threading.Condition()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.app is None:
            raise RuntimeError("no app installed: use the serve fixture")
        with self._idle:
            self._running += 1
        try:
            await self.app(scope, receive, send)
        except OSError:
            # uvicorn's ClientDisconnected: the client left while the app was sending, which
            # uvicorn itself treats as a normal end of the connection.
            raise
        except Exception as exc:
            self.errors.append(exc)
            raise
        finally:
            with self._idle:
                self._running -= 1
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no connection is inside the app; return whether that happened in time."""
        with self._idle:
            return self._idle.wait_for(lambda: self._running == 0, timeout)


class ThreadedServer(uvicorn.Server):
    """uvicorn.Server that tells another thread when its startup has finished, either way."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.startup_done = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets)
        finally:
            self.startup_done.set()


class LiveServer:
    """A running uvicorn server: ``url`` is ``ws://127.0.0.1:<port>``."""

    def __init__(self, url: str, app: SwappableApp, ws: str) -> None:
        self.url = url
        self.app = app
        self.ws = ws


@contextmanager
def uvicorn_in_thread(app: ASGIApp, *, ws: str, **options: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn (``ws`` implementation, other ``uvicorn.Config`` options) in a
    background thread on a free port of 127.0.0.1; yields the ``ws://`` base URL."""
    # Bound before uvicorn starts, so the port is known and free; uvicorn listens on it.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        ws=ws,
        lifespan="off",
        log_config=None,  # leave the test process's logging configuration alone
        log_level="warning",
        timeout_graceful_shutdown=2,  # seconds, within WAIT
        **options,
    )
    server = ThreadedServer(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{ws}", daemon=True
    )
    thread.start()
    try:
        assert server.startup_done.wait(WAIT), f"uvicorn ({ws}) did not start within {WAIT}s"
        assert server.started, f"uvicorn ({ws}) failed to start"
        yield f"ws://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=WAIT)
        sock.close()
    assert not thread.is_alive(), f"uvicorn ({ws}) did not shut down within {WAIT}s"


@pytest.fixture(scope="session", params=["websockets-sansio", "wsproto"])
def live_server(request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    """uvicorn with one of its WebSocket implementations, on a free port of 127.0.0.1."""
    ws = str(request.param)
    app = SwappableApp()
    with uvicorn_in_thread(app, ws=ws) as url:
        yield LiveServer(url, app, ws)


@pytest.fixture
def serve(live_server: LiveServer) -> Iterator[Callable[[ASGIApp], str]]:
    """``serve(app)`` serves ``app`` on the live server and returns its ``ws://`` base URL.

    On teardown, waits for the server to finish the test's connections and fails the test if
    the app raised on any of them.
    """

    def serve(app: ASGIApp) -> str:
        live_server.app.app = app
        return live_server.url

    yield serve
    # Server-side connections end after the client's: wait, so none leaks into the next test.
    idle = live_server.app.wait_idle(WAIT)
    errors = list(live_server.app.errors)
    live_server.app.errors.clear()
    live_server.app.app = None
    assert idle, f"a connection was still in the app {WAIT}s after the test"
    assert errors == [], f"the app raised on the server: {errors!r}"


# The browser tests launch the Chromium named by CHROMIUM (a path, or a command on PATH), else
# the `chromium` command on PATH; Playwright never downloads a browser of its own here.
CHROMIUM = os.environ.get("CHROMIUM") or "chromium"
# Flags for a sandbox without a display or a network beyond loopback.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


# Module scope, not session: Playwright's sync API keeps an event loop in this thread while it
# is open, and anyio tests in other modules need the thread free.
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium from the OS, driven by Playwright; skipped outside CI when absent."""
    # The executable checked here is the one launched.
    chromium = shutil.which(CHROMIUM)
    if chromium is None:
        problem = f"no Chromium executable at {CHROMIUM!r}"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser tests, but {problem}")
        pytest.skip(f"{problem}: apt-get install chromium, or set CHROMIUM to its path")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()

"""A misconfigured middleware under a real uvicorn with ``--lifespan auto``: its error is logged.

Starlette builds its middleware on the first event. Under uvicorn's default ``--lifespan auto``
an exception there reads as "ASGI 'lifespan' protocol appears unsupported", the server starts,
and every request fails with the real message only in each request's traceback. The middleware
logs the message at ERROR before raising, so it is in the server's log from the start.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.e2e

APP = textwrap.dedent(
    """
    from starlette.applications import Starlette

    from asgi_session_sync import SessionSyncMiddleware


    async def load_session(ctx):
        return {"title": "demo"}


    app = Starlette()
    # The converter Starlette users paste from their routes: refused, with the fix.
    app.add_middleware(
        SessionSyncMiddleware, loader=load_session, paths=["/ws/sessions/{session_id:str}"]
    )
    """
)
STARTUP_TIMEOUT = 20.0  # seconds


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_misconfigured_middleware_is_logged_at_error_under_lifespan_auto(
    tmp_path: Path,
) -> None:
    (tmp_path / "misconfigured.py").write_text(APP)
    port = free_port()
    log = tmp_path / "uvicorn.log"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    with log.open("w") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "misconfigured:app", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while "Application startup complete" not in log.read_text():
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)  # polling a child's log file: there is no event to await
        # The first event (lifespan) built the middleware: its error, with the fix, is in the
        # server's output before it says it started (uvicorn configures no handler for the
        # library's logger, so Python's last-resort handler prints the ERROR record).
        text = log.read_text()
        message = text.index("SessionSyncMiddleware is misconfigured: drop the converter")
        assert message < text.index("Application startup complete")
        assert "write '{session_id}'" in text
        response = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
        assert response.status_code == 500
    finally:
        server.terminate()
        server.wait(timeout=10)

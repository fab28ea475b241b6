"""The browser client shipped with the package, and a one-line way to serve it.

``static/session-sync.js`` is a dependency-free ES module (see its header for usage). Serve it
from your app with one line:

- Starlette / FastAPI: ``app.mount("/static/session-sync", StaticFiles(directory=STATIC_DIR))``,
  then import ``/static/session-sync/session-sync.js``
- Litestar: ``create_static_files_router(path="/static/session-sync", directories=[STATIC_DIR])``
- raw ASGI and anything else: route one path to :data:`client_script_app`, or serve the file at
  :data:`CLIENT_SCRIPT`.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

from ._types import Send

__all__ = ["CLIENT_SCRIPT", "STATIC_DIR", "ClientScript", "client_script_app"]

STATIC_DIR = Path(__file__).with_name("static")
"""The directory holding the browser client."""

CLIENT_SCRIPT = STATIC_DIR / "session-sync.js"
"""The browser client module's path."""


@functools.cache
def _script() -> tuple[bytes, bytes]:
    body = CLIENT_SCRIPT.read_bytes()
    return body, b'"' + hashlib.sha256(body).hexdigest()[:16].encode() + b'"'


class ClientScript:
    """ASGI app serving the browser client at whatever path it is routed to.

    ``GET`` and ``HEAD`` get the script as ``text/javascript`` with an ``ETag`` (a matching
    ``If-None-Match`` gets 304); other methods get 405. An object rather than a function, so
    routers that tell request handlers from ASGI apps by type (Starlette's ``Route``) serve it
    as an ASGI app at exactly its path.
    """

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Serve one HTTP request for the script."""
        if scope["type"] != "http":
            return
        body, etag = _script()
        method = scope.get("method", "GET")
        if method not in ("GET", "HEAD"):
            await _respond(send, 405, [(b"allow", b"GET, HEAD")], b"")
            return
        headers = [
            (b"content-type", b"text/javascript; charset=utf-8"),
            (b"etag", etag),
            (b"cache-control", b"no-cache"),
        ]
        if dict(scope.get("headers", [])).get(b"if-none-match") == etag:
            await _respond(send, 304, headers, b"")
            return
        headers.append((b"content-length", str(len(body)).encode()))
        await _respond(send, 200, headers, b"" if method == "HEAD" else body)


client_script_app = ClientScript()
"""The browser client as an ASGI app, for routers without a static files helper."""


async def _respond(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

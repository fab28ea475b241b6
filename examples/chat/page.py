"""The one page both examples serve, and the static paths it loads its files from.

Both apps serve :func:`page_html` at ``/``, :data:`PAGE_STATIC_DIR` at
:data:`PAGE_STATIC_PATH` (the page's stylesheet and script) and the library's browser client
(``asgi_session_sync.client.STATIC_DIR``) at :data:`CLIENT_STATIC_PATH`: the same page, at the
same paths, whichever framework runs the API.
"""

from __future__ import annotations

import html
from functools import cache
from pathlib import Path

__all__ = ["CLIENT_STATIC_PATH", "PAGE_STATIC_DIR", "PAGE_STATIC_PATH", "page_html"]

PAGE_STATIC_DIR = Path(__file__).with_name("static")
"""The page's own files: ``chat.css`` and ``chat.js``."""

PAGE_STATIC_PATH = "/static/chat"
"""Where both apps serve :data:`PAGE_STATIC_DIR`."""

CLIENT_STATIC_PATH = "/static/session-sync"
"""Where both apps serve the library's browser client (``session-sync.js``)."""

_TEMPLATE = Path(__file__).with_name("page.html")


@cache
def page_html(framework: str) -> str:
    """The page, titled for ``framework`` (``"FastAPI"``, ``"Litestar"``): open it as
    ``/?token=alice``."""
    return _TEMPLATE.read_text(encoding="utf-8").replace("{{framework}}", html.escape(framework))

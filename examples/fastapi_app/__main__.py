"""``python -m examples.fastapi_app [api|worker|all]``: see :mod:`examples.chat.processes`."""

from __future__ import annotations

from examples.chat.processes import main, serve

from .app import create_app
from .settings import Settings


def page_url(settings: Settings) -> str:
    """The URL to open, as alice."""
    host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(settings.host, settings.host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{settings.port}/?token=alice"


def serve_api(settings: Settings) -> None:
    """Serve the app on ``HOST``:``PORT``; print the page's URL once it listens."""
    serve(
        create_app(settings),
        settings,
        ready=f"open {page_url(settings)}  (another user: ?token=bob)",
    )


if __name__ == "__main__":
    main(None, module="examples.fastapi_app", settings=Settings, serve_api=serve_api)

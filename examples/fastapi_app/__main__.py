"""``python -m examples.fastapi_app [api|worker|all]``: see :mod:`examples.chat.processes`."""

from __future__ import annotations

import copy
from typing import Any

from uvicorn.config import LOGGING_CONFIG

from examples.chat.processes import main, serve

from .app import create_app
from .settings import Settings


def log_config() -> dict[str, Any]:
    """uvicorn's logging, plus the library's and the example's INFO lines (resyncs, streams)."""
    config: dict[str, Any] = copy.deepcopy(LOGGING_CONFIG)
    for name in ("asgi_session_sync", "examples"):
        config["loggers"][name] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


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
        log_config=log_config(),
    )


if __name__ == "__main__":
    main(None, module="examples.fastapi_app", settings=Settings.from_env, serve_api=serve_api)

"""``python -m examples.fastapi_app [api|worker|all]``: see :mod:`examples.chat.processes`."""

from __future__ import annotations

import copy
from typing import Any

import uvicorn
from uvicorn.config import LOGGING_CONFIG

from examples.chat.processes import main
from examples.chat.worker import WorkerSettings

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


def serve_api() -> None:
    """Serve the app on ``HOST``:``PORT`` and print the page's URL."""
    settings = Settings.from_env()
    app = create_app(settings)
    print(f"open {page_url(settings)}  (another user: ?token=bob)", flush=True)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=log_config(),
        # Open WebSockets never end on their own: don't wait for them forever on shutdown.
        timeout_graceful_shutdown=5,
    )


def worker_settings() -> WorkerSettings:
    """The worker's settings, from the same environment as the API's."""
    return Settings.from_env().worker()


if __name__ == "__main__":
    main(None, module="examples.fastapi_app", serve_api=serve_api, worker_settings=worker_settings)

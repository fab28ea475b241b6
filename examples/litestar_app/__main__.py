"""``python -m examples.litestar_app [api|worker|all]``: see :mod:`examples.chat.processes`."""

from __future__ import annotations

import uvicorn

from examples.chat.processes import main
from examples.chat.worker import WorkerSettings

from .app import create_app
from .settings import Settings


def serve_api() -> None:
    """Print the URL to open, and serve the API until interrupted."""
    settings = Settings.from_env()
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    print(
        f"open http://{host}:{settings.port}/?token=alice "
        f"(and http://{host}:{settings.port}/?token=bob for another user)",
        flush=True,
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        # Open WebSockets never end on their own: don't wait for them forever on shutdown.
        timeout_graceful_shutdown=5,
    )


def worker_settings() -> WorkerSettings:
    """The worker's settings, from the same environment as the API's."""
    return Settings.from_env().worker()


if __name__ == "__main__":
    main(None, module="examples.litestar_app", serve_api=serve_api, worker_settings=worker_settings)

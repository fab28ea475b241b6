"""``python -m examples.litestar_app``: serve the example with uvicorn.

Reads ``HOST`` (127.0.0.1), ``PORT`` (8001), ``DATABASE_URL`` (a SQLite file next to this
module) and ``NATS_URL`` (unset: a private nats-server starts with the app).
"""

from __future__ import annotations

import logging

import uvicorn

from .app import create_app
from .settings import Settings


def main() -> None:
    """Configure logging, print the URL to open, and serve until interrupted."""
    settings = Settings.from_env()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
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


if __name__ == "__main__":
    main()

"""asgi-session-sync in a Litestar app: a chat-like session store whose responses a worker streams.

Run it with ``python -m examples.litestar_app`` (the API and a worker, supervised; or each
alone with ``... api`` and ``... worker``) and open the URL it prints. Sessions live in
SQLAlchemy (a SQLite file, or ``DATABASE_URL``); every change bumps the session's version and
is published over NATS (a private ``nats-server``, or ``NATS_URL``); each WebSocket gets the
current state first, from ``SessionSyncMiddleware``, then the updates. See README.md here.
"""

from .app import create_app
from .settings import Settings

__all__ = ["Settings", "create_app"]

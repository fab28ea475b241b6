"""A live chat on FastAPI: SQLAlchemy sessions, NATS updates, and a page that never goes stale.

Run it from the repository root::

    python -m examples.fastapi_app

then open the URL it prints (``http://127.0.0.1:8000/?token=alice``). ``DATABASE_URL``
(SQLite in ``./fastapi_example.sqlite3`` by default, or ``postgresql://...``), ``NATS_URL``
(an embedded ``nats-server`` by default), ``HOST`` and ``PORT`` configure it.
"""

from .app import create_app
from .settings import Settings

__all__ = ["Settings", "create_app"]

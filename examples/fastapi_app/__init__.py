"""A live chat on FastAPI: SQLAlchemy sessions, a response worker, NATS updates, and a page that
never goes stale.

Run it from the repository root::

    python -m examples.fastapi_app            # the API and a worker, supervised
    python -m examples.fastapi_app api        # or each on its own
    python -m examples.fastapi_app worker

then open ``http://127.0.0.1:8000/?token=alice``. See README.md here for the settings.
"""

from .app import create_app
from .settings import Settings

__all__ = ["Settings", "create_app"]

"""``create_app``: the FastAPI app, its lifespan, and the one snapshot service its socket uses."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from sqlalchemy.ext.asyncio import create_async_engine

from asgi_session_sync import SessionSync
from asgi_session_sync.client import STATIC_DIR
from asgi_session_sync.loaders.sqlalchemy import sqlalchemy_loader
from examples.chat.live import LiveChat
from examples.chat.models import ChatSession, session_view
from examples.chat.page import CLIENT_STATIC_PATH, PAGE_STATIC_DIR, PAGE_STATIC_PATH
from examples.chat.store import ChatStore

from .routes import router
from .settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the example's API; ``settings`` default to :meth:`Settings.from_env`.

    Nothing connects until the lifespan starts: then the tables are created, the private
    ``nats-server`` starts on ``settings.nats_port`` (unless ``settings.nats_url`` names one),
    the bridge connects, and the lease sweeper starts. Responses are streamed by the worker,
    another process (``python -m examples.fastapi_app worker``).
    """
    settings = Settings.from_env() if settings is None else settings
    store = ChatStore(create_async_engine(settings.database_url))
    loader = sqlalchemy_loader(
        store.sessionmaker,
        ChatSession,
        interactions=ChatSession.interactions,
        owner=ChatSession.owner,
        version=ChatSession.version,
        serialize=session_view,  # the same shape the API returns and the worker publishes
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with store, LiveChat(store, settings, name="fastapi-example") as live:
            app.state.bridge = live.bridge
            app.state.publisher = live.publisher
            yield

    app = FastAPI(title="asgi-session-sync FastAPI example", lifespan=lifespan)
    app.state.store = store
    app.state.settings = settings
    # The snapshot service. The WebSocket route (routes.py) accepts through it, with the user
    # its dependency authenticated: no middleware, so the route is declared once, and the
    # loader checks the owner against that same user.
    app.state.sync = SessionSync(loader, version_loader=loader.version_loader)
    app.include_router(router)
    # The page (routes.py) is the one both examples serve, with its files at the same paths.
    app.mount(CLIENT_STATIC_PATH, StaticFiles(directory=STATIC_DIR))
    app.mount(PAGE_STATIC_PATH, StaticFiles(directory=PAGE_STATIC_DIR))
    return app

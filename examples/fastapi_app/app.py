"""``create_app``: the FastAPI app, its lifespan, and SessionSyncMiddleware in one line."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import anyio
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from asgi_session_sync import SessionSyncMiddleware
from asgi_session_sync.client import STATIC_DIR
from asgi_session_sync.loaders.sqlalchemy import sqlalchemy_loader
from asgi_session_sync.nats import EmbeddedNats, NatsBridge

from .auth import authenticate
from .models import Base, ChatSession
from .responder import Responder
from .routes import router
from .schemas import SessionView
from .settings import Settings
from .store import ChatStore

# Retry a lost broker often: a restarted nats-server is back in well under a second, and each
# reconnect resyncs every open WebSocket, so the sooner it happens the sooner pages are current.
NATS_RECONNECT_WAIT = 0.25


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the example app; ``settings`` default to :meth:`Settings.from_env`.

    Nothing connects until the lifespan starts: then the tables are created, the embedded
    ``nats-server`` starts (unless ``settings.nats_url`` names one), and the bridge connects.
    """
    settings = Settings.from_env() if settings is None else settings
    engine = create_async_engine(settings.database_url)
    sessionmaker = async_sessionmaker(engine, expire_on_commit=False)
    store = ChatStore(sessionmaker)
    loader = sqlalchemy_loader(
        sessionmaker,
        ChatSession,
        interactions=ChatSession.interactions,
        owner=ChatSession.owner,
        version=ChatSession.version,
        serialize=SessionView.model_validate,  # the same shape the API and publish use
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            stack.push_async_callback(engine.dispose)
            async with engine.begin() as connection:
                await connection.run_sync(Base.metadata.create_all)
            nats_url = settings.nats_url
            if nats_url is None:
                nats_url = (await stack.enter_async_context(EmbeddedNats())).url
            bridge = await stack.enter_async_context(
                NatsBridge(
                    nats_url, name="fastapi-example", reconnect_time_wait=NATS_RECONNECT_WAIT
                )
            )
            # Entered last, so it ends first: streams stop before the bridge closes.
            task_group = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(task_group.cancel_scope.cancel)
            app.state.bridge = bridge
            app.state.responder = Responder(
                store,
                bridge,
                task_group,
                tokens=settings.response_tokens,
                interval=settings.token_interval,
            )
            yield

    app = FastAPI(title="asgi-session-sync FastAPI example", lifespan=lifespan)
    app.state.store = store
    app.include_router(router)
    app.mount("/static/session-sync", StaticFiles(directory=STATIC_DIR))
    app.add_middleware(
        SessionSyncMiddleware,
        loader=loader,
        version_loader=loader.version_loader,
        paths=["/ws/sessions/{session_id}"],
        authenticate=authenticate,
    )
    return app

"""The middleware in each framework, installed with that framework's own one-line idiom.

Every app here has the same WebSocket endpoint at ``/ws/sessions/{session_id}``: it accepts,
sends "hello" at once, then echoes. The snapshot must still come first, and the user set by the
framework's authentication must reach the loader as ``ctx.user``.
"""

from __future__ import annotations

from typing import Annotated, Any

import falcon
import falcon.asgi
import pytest
from conftest import SESSION, RecordingLoader, greeting_app
from fastapi import Depends, FastAPI
from fastapi import WebSocket as FastAPIWebSocket
from fastapi import WebSocketDisconnect as FastAPIWebSocketDisconnect
from litestar import Litestar, websocket
from litestar.connection import ASGIConnection
from litestar.connection import WebSocket as LitestarWebSocket
from litestar.exceptions import NotAuthorizedException
from litestar.exceptions import WebSocketDisconnect as LitestarWebSocketDisconnect
from litestar.middleware import (
    AbstractAuthenticationMiddleware,
    AuthenticationResult,
    DefineMiddleware,
)
from quart import Quart
from quart import websocket as quart_websocket
from starlette.applications import Starlette
from starlette.authentication import (
    AuthCredentials,
    AuthenticationBackend,
    BaseUser,
    SimpleUser,
    UnauthenticatedUser,
)
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection
from starlette.routing import Mount, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from asgi_session_sync import SessionContext, SessionSyncMiddleware, Snapshot
from asgi_session_sync._types import Scope
from asgi_session_sync.testing import connect_websocket

pytestmark = pytest.mark.anyio

PATHS = ["/ws/sessions/{session_id}"]
TOKENS = {"t-alice": "alice"}


class OwnedSessionLoader(RecordingLoader):
    """Returns the session owned by the connecting user's name; records every context."""

    def result(self, ctx: SessionContext) -> Snapshot:
        return Snapshot(SESSION, owner=user_name(ctx.user), version=1)

    @property
    def users(self) -> list[str | None]:
        return [user_name(ctx.user) for ctx in self.calls]


def user_name(user: Any) -> str | None:
    """The name of a user from any of the frameworks here, ``None`` when anonymous."""
    if user is None or isinstance(user, UnauthenticatedUser):
        return None
    if isinstance(user, BaseUser):
        return user.display_name
    return str(user)


def token_of(scope: Scope) -> str | None:
    """The bearer token from the ``authorization`` header or the ``token`` query parameter."""
    conn = HTTPConnection(scope)
    header = conn.headers.get("authorization", "")
    if header.startswith("Bearer "):
        return header.removeprefix("Bearer ")
    return conn.query_params.get("token")


async def authenticate(scope: Scope) -> str | None:
    """For ``SessionSyncMiddleware(authenticate=...)``: the user named by the token."""
    token = token_of(scope)
    return None if token is None else TOKENS.get(token)


async def assert_snapshot_then_app_frames(
    app: Any, loader: OwnedSessionLoader, *, user: str | None = None, **connect: Any
) -> None:
    """Connect to session s1: the snapshot first, then the app's "hello", then an echo.

    ``app`` is ``Any`` because Litestar and Quart type their ASGI scopes as TypedDicts, which
    mypy does not accept where a ``MutableMapping`` scope is expected.
    """
    async with connect_websocket(app, "/ws/sessions/s1", **connect) as ws:
        assert await ws.receive_json() == {
            "type": "session_update",
            "session_id": "s1",
            "owner": user,
            "session": SESSION,
            "version": 1,
        }
        assert await ws.receive_text() == "hello"
        await ws.send_text("ping")
        assert await ws.receive_text() == "echo:ping"
    assert [ctx.session_id for ctx in loader.calls] == ["s1"]
    assert loader.users == [user]


BEARER_ALICE = {"headers": {"authorization": "Bearer t-alice"}}


# Raw ASGI


async def test_raw_asgi_app_wrapped_directly_gets_snapshot_first() -> None:
    loader = OwnedSessionLoader()
    app = SessionSyncMiddleware(greeting_app, loader=loader, paths=PATHS)
    await assert_snapshot_then_app_frames(app, loader)


async def test_raw_asgi_user_from_scope() -> None:
    loader = OwnedSessionLoader()
    app = SessionSyncMiddleware(greeting_app, loader=loader, paths=PATHS)
    await assert_snapshot_then_app_frames(app, loader, user="alice", scope={"user": "alice"})


# Starlette


async def starlette_endpoint(ws: WebSocket) -> None:
    await ws.accept()
    await ws.send_text("hello")
    while True:
        try:
            text = await ws.receive_text()
        except WebSocketDisconnect:
            return
        await ws.send_text("echo:" + text)


STARLETTE_ROUTES = [WebSocketRoute("/ws/sessions/{session_id}", starlette_endpoint)]


class TokenBackend(AuthenticationBackend):
    """Starlette authentication from a bearer token header or a ``token`` query parameter."""

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        name = TOKENS.get(token_of(conn.scope) or "")
        return None if name is None else (AuthCredentials(["authenticated"]), SimpleUser(name))


async def test_starlette_middleware_list_gets_snapshot_first() -> None:
    loader = OwnedSessionLoader()
    app = Starlette(
        routes=STARLETTE_ROUTES,
        middleware=[Middleware(SessionSyncMiddleware, loader=loader, paths=PATHS)],
    )
    await assert_snapshot_then_app_frames(app, loader)


async def test_starlette_add_middleware_gets_snapshot_first() -> None:
    loader = OwnedSessionLoader()
    app = Starlette(routes=STARLETTE_ROUTES)
    app.add_middleware(SessionSyncMiddleware, loader=loader, paths=PATHS)
    await assert_snapshot_then_app_frames(app, loader)


@pytest.mark.parametrize(
    "connect",
    [BEARER_ALICE, {"scope": {"query_string": b"token=t-alice"}}],
    ids=["header", "query"],
)
async def test_starlette_auth_middleware_outside_sets_ctx_user(connect: dict[str, Any]) -> None:
    loader = OwnedSessionLoader()
    app = Starlette(
        routes=STARLETTE_ROUTES,
        # Starlette runs the list top to bottom: authentication first, then the snapshot.
        middleware=[
            Middleware(AuthenticationMiddleware, backend=TokenBackend()),
            Middleware(SessionSyncMiddleware, loader=loader, paths=PATHS),
        ],
    )
    await assert_snapshot_then_app_frames(app, loader, user="alice", **connect)
    assert isinstance(loader.calls[0].user, SimpleUser)


async def test_starlette_auth_middleware_inside_sets_ctx_user() -> None:
    # The user is read when the app accepts, and Starlette's AuthenticationMiddleware writes it
    # into the same scope dict, so it is there even when it runs inside SessionSyncMiddleware.
    loader = OwnedSessionLoader()
    app = Starlette(
        routes=STARLETTE_ROUTES,
        middleware=[
            Middleware(SessionSyncMiddleware, loader=loader, paths=PATHS),
            Middleware(AuthenticationMiddleware, backend=TokenBackend()),
        ],
    )
    await assert_snapshot_then_app_frames(app, loader, user="alice", **BEARER_ALICE)


async def test_starlette_auth_added_last_runs_first_and_sets_ctx_user() -> None:
    loader = OwnedSessionLoader()
    app = Starlette(routes=STARLETTE_ROUTES)
    # add_middleware puts each one outside the ones added before it: authentication runs first.
    app.add_middleware(SessionSyncMiddleware, loader=loader, paths=PATHS)
    app.add_middleware(AuthenticationMiddleware, backend=TokenBackend())
    await assert_snapshot_then_app_frames(app, loader, user="alice", **BEARER_ALICE)


async def test_starlette_anonymous_user_reaches_loader_as_unauthenticated_user() -> None:
    loader = OwnedSessionLoader()
    app = Starlette(
        routes=STARLETTE_ROUTES,
        middleware=[
            Middleware(AuthenticationMiddleware, backend=TokenBackend()),
            Middleware(SessionSyncMiddleware, loader=loader, paths=PATHS),
        ],
    )
    await assert_snapshot_then_app_frames(app, loader)
    assert isinstance(loader.calls[0].user, UnauthenticatedUser)


async def test_starlette_mounted_sub_app_matches_its_own_route_paths() -> None:
    # Starlette 0.33 and later give a mounted app the full path and root_path="/api".
    loader = OwnedSessionLoader()
    inner = Starlette(routes=STARLETTE_ROUTES)
    inner.add_middleware(SessionSyncMiddleware, loader=loader, paths=PATHS)
    app = Starlette(routes=[Mount("/api", app=inner)])
    async with connect_websocket(app, "/api/ws/sessions/s1") as ws:
        assert (await ws.receive_json())["session_id"] == "s1"
        assert await ws.receive_text() == "hello"
    assert [ctx.scope["root_path"] for ctx in loader.calls] == ["/api"]


# FastAPI


def fastapi_app() -> FastAPI:
    app = FastAPI()

    @app.websocket("/ws/sessions/{session_id}")
    async def session_socket(ws: FastAPIWebSocket, session_id: str) -> None:
        await ws.accept()
        await ws.send_text("hello")
        while True:
            try:
                text = await ws.receive_text()
            except FastAPIWebSocketDisconnect:
                return
            await ws.send_text("echo:" + text)

    return app


async def test_fastapi_add_middleware_gets_snapshot_first() -> None:
    loader = OwnedSessionLoader()
    app = fastapi_app()
    app.add_middleware(SessionSyncMiddleware, loader=loader, paths=PATHS)
    await assert_snapshot_then_app_frames(app, loader)


async def test_fastapi_authenticate_option_sets_ctx_user() -> None:
    # FastAPI authenticates in dependencies, inside the endpoint, where no middleware sees the
    # user: the middleware's own authenticate= reads the token instead.
    loader = OwnedSessionLoader()
    app = fastapi_app()
    app.add_middleware(SessionSyncMiddleware, loader=loader, paths=PATHS, authenticate=authenticate)
    await assert_snapshot_then_app_frames(app, loader, user="alice", **BEARER_ALICE)


async def test_fastapi_authenticate_option_without_token_gives_anonymous_user() -> None:
    loader = OwnedSessionLoader()
    app = fastapi_app()
    app.add_middleware(SessionSyncMiddleware, loader=loader, paths=PATHS, authenticate=authenticate)
    await assert_snapshot_then_app_frames(app, loader)


async def current_user(ws: FastAPIWebSocket) -> str | None:
    """A FastAPI dependency: the user named by the connection's token."""
    return await authenticate(ws.scope)


# Module level: with postponed annotations FastAPI resolves Depends(current_user) in globals.
CurrentUser = Annotated[str | None, Depends(current_user)]


async def test_fastapi_dependency_user_does_not_reach_loader() -> None:
    # What authenticate= is for: a dependency's result lives in the endpoint, not in the scope.
    seen: list[str | None] = []
    app = FastAPI()

    @app.websocket("/ws/sessions/{session_id}")
    async def session_socket(ws: FastAPIWebSocket, user: CurrentUser) -> None:
        seen.append(user)
        await ws.accept()
        await ws.send_text("hello")
        assert await ws.receive_text() == "ping"
        await ws.send_text("echo:ping")
        with pytest.raises(FastAPIWebSocketDisconnect):
            await ws.receive_text()

    loader = OwnedSessionLoader()
    app.add_middleware(SessionSyncMiddleware, loader=loader, paths=PATHS)
    await assert_snapshot_then_app_frames(app, loader, user=None, **BEARER_ALICE)
    assert seen == ["alice"]


async def test_fastapi_with_starlette_auth_middleware_sets_ctx_user() -> None:
    loader = OwnedSessionLoader()
    app = fastapi_app()
    app.add_middleware(SessionSyncMiddleware, loader=loader, paths=PATHS)
    app.add_middleware(AuthenticationMiddleware, backend=TokenBackend())
    await assert_snapshot_then_app_frames(app, loader, user="alice", **BEARER_ALICE)


# Litestar
#
# ``logging_config=None``: Litestar's default installs a handler on the process's root logger.


# The handler takes no session_id argument: declaring one without ``FromPath`` is deprecated
# in Litestar 2.25, and ``FromPath`` does not exist in older 2.x releases.
@websocket("/ws/sessions/{session_id:str}")
async def litestar_socket(socket: LitestarWebSocket[Any, Any, Any]) -> None:
    await socket.accept()
    await socket.send_text("hello")
    while True:
        try:
            text = await socket.receive_text()
        except LitestarWebSocketDisconnect:
            return
        await socket.send_text("echo:" + text)


class LitestarTokenAuth(AbstractAuthenticationMiddleware):
    """Litestar authentication from a bearer token header or a ``token`` query parameter."""

    async def authenticate_request(
        self, connection: ASGIConnection[Any, Any, Any, Any]
    ) -> AuthenticationResult:
        token = token_of(connection.scope)  # type: ignore[arg-type]
        name = TOKENS.get(token or "")
        if name is None:
            raise NotAuthorizedException("a valid token is required")
        return AuthenticationResult(user=name, auth=token)


async def test_litestar_define_middleware_gets_snapshot_first() -> None:
    loader = OwnedSessionLoader()
    app = Litestar(
        route_handlers=[litestar_socket],
        logging_config=None,
        middleware=[DefineMiddleware(SessionSyncMiddleware, loader=loader, paths=PATHS)],
    )
    await assert_snapshot_then_app_frames(app, loader)


@pytest.mark.parametrize("auth_first", [True, False], ids=["auth-outside", "auth-inside"])
async def test_litestar_auth_middleware_sets_ctx_user(auth_first: bool) -> None:
    loader = OwnedSessionLoader()
    auth = DefineMiddleware(LitestarTokenAuth)
    sync = DefineMiddleware(SessionSyncMiddleware, loader=loader, paths=PATHS)
    # Litestar, like Starlette, runs the list top to bottom. The user is read when the app
    # accepts, and the auth middleware writes it into the same scope dict, so both orders work.
    app = Litestar(
        route_handlers=[litestar_socket],
        logging_config=None,
        middleware=[auth, sync] if auth_first else [sync, auth],
    )
    await assert_snapshot_then_app_frames(app, loader, user="alice", **BEARER_ALICE)


async def test_litestar_authenticate_option_sets_ctx_user() -> None:
    # For Litestar guards, which run inside the handler's layer where no middleware sees them.
    loader = OwnedSessionLoader()
    app = Litestar(
        route_handlers=[litestar_socket],
        logging_config=None,
        middleware=[
            DefineMiddleware(
                SessionSyncMiddleware,
                loader=loader,
                paths=PATHS,
                authenticate=authenticate,
            )
        ],
    )
    await assert_snapshot_then_app_frames(app, loader, user="alice", **BEARER_ALICE)


# Quart


def quart_app(loader: OwnedSessionLoader, **options: Any) -> Quart:
    app = Quart(__name__)

    @app.websocket("/ws/sessions/<session_id>")
    async def session_socket(session_id: str) -> None:
        await quart_websocket.accept()
        await quart_websocket.send("hello")
        while True:
            text = await quart_websocket.receive()
            assert isinstance(text, str)
            await quart_websocket.send("echo:" + text)

    # Quart's documented way to add ASGI middleware; mypy objects to assigning to a method.

    app.asgi_app = SessionSyncMiddleware(app.asgi_app, loader=loader, paths=PATHS, **options)  # type: ignore[method-assign]
    return app


# Quart runs its handlers in asyncio tasks (asyncio.ensure_future): it cannot run under trio.
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_quart_asgi_app_wrapped_gets_snapshot_first() -> None:
    loader = OwnedSessionLoader()
    await assert_snapshot_then_app_frames(quart_app(loader), loader)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_quart_authenticate_option_sets_ctx_user() -> None:
    # Quart has no authentication middleware that sets scope["user"]; authenticate= reads it.
    loader = OwnedSessionLoader()
    app = quart_app(loader, authenticate=authenticate)
    await assert_snapshot_then_app_frames(app, loader, user="alice", **BEARER_ALICE)


# Falcon


class FalconSessionResource:
    async def on_websocket(self, req: Any, ws: Any, session_id: str) -> None:
        await ws.accept()
        await ws.send_text("hello")
        while True:
            try:
                text = await ws.receive_text()
            except falcon.WebSocketDisconnected:
                return
            await ws.send_text("echo:" + text)


def falcon_app() -> falcon.asgi.App:
    app = falcon.asgi.App()
    app.add_route("/ws/sessions/{session_id}", FalconSessionResource())
    return app


# Falcon's WebSocket reads receive() in an asyncio task of its own: it cannot run under trio.
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_falcon_app_wrapped_gets_snapshot_first() -> None:
    loader = OwnedSessionLoader()
    app = SessionSyncMiddleware(falcon_app(), loader=loader, paths=PATHS)
    await assert_snapshot_then_app_frames(app, loader)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_falcon_authenticate_option_sets_ctx_user() -> None:
    # Falcon's middleware (process_request_ws) runs inside the app: no scope["user"] to read.
    loader = OwnedSessionLoader()
    app = SessionSyncMiddleware(falcon_app(), loader=loader, paths=PATHS, authenticate=authenticate)
    await assert_snapshot_then_app_frames(app, loader, user="alice", **BEARER_ALICE)


# Django Channels


@pytest.fixture(scope="module")
def django_settings() -> None:
    from django.conf import settings

    if not settings.configured:
        settings.configure(
            SECRET_KEY="tests-only",
            INSTALLED_APPS=[
                "django.contrib.auth",
                "django.contrib.contenttypes",
                "django.contrib.sessions",
                "channels",
            ],
            DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
        )
        import django

        django.setup()


def channels_router() -> Any:
    from channels.generic.websocket import AsyncWebsocketConsumer
    from channels.routing import URLRouter
    from django.urls import path

    class SessionConsumer(AsyncWebsocketConsumer):  # type: ignore[misc]
        async def connect(self) -> None:
            await self.accept()
            await self.send(text_data="hello")

        async def receive(self, text_data: str | None = None, bytes_data: Any = None) -> None:
            await self.send(text_data=f"echo:{text_data}")

    return URLRouter([path("ws/sessions/<session_id>", SessionConsumer.as_asgi())])


def channels_token_auth(inner: Any) -> Any:
    """A Channels auth middleware as Channels writes them: it copies the scope, then sets
    ``user`` on the copy (``BaseMiddleware.__call__`` and ``AuthMiddleware`` both do)."""
    from channels.middleware import BaseMiddleware

    class TokenAuthMiddleware(BaseMiddleware):  # type: ignore[misc]
        async def __call__(self, scope: Any, receive: Any, send: Any) -> Any:
            scope = dict(scope, user=TOKENS.get(token_of(scope) or ""))
            return await super().__call__(scope, receive, send)

    return TokenAuthMiddleware(inner)


async def channels_conversation(app: Any, headers: list[tuple[bytes, bytes]]) -> None:
    from channels.testing import WebsocketCommunicator

    communicator = WebsocketCommunicator(app, "/ws/sessions/s1", headers=headers)
    connected, _ = await communicator.connect(timeout=5)
    assert connected
    try:
        assert (await communicator.receive_json_from(timeout=5))["session_id"] == "s1"
        assert await communicator.receive_from(timeout=5) == "hello"
        await communicator.send_to(text_data="ping")
        assert await communicator.receive_from(timeout=5) == "echo:ping"
    finally:
        await communicator.disconnect()


ALICE_HEADER = [(b"authorization", b"Bearer t-alice")]


# Channels runs on asyncio (asgiref's ApplicationCommunicator).
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.usefixtures("django_settings")
async def test_channels_inside_auth_middleware_sets_ctx_user() -> None:
    loader = OwnedSessionLoader()
    app = channels_token_auth(SessionSyncMiddleware(channels_router(), loader=loader, paths=PATHS))
    await channels_conversation(app, ALICE_HEADER)
    assert loader.users == ["alice"]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.usefixtures("django_settings")
async def test_channels_outside_auth_middleware_cannot_see_the_user() -> None:
    # Channels' middleware copies the scope, so a user it sets never reaches an outer layer:
    # SessionSyncMiddleware must sit inside AuthMiddlewareStack (or pass authenticate=).
    loader = OwnedSessionLoader()
    app = SessionSyncMiddleware(channels_token_auth(channels_router()), loader=loader, paths=PATHS)
    await channels_conversation(app, ALICE_HEADER)
    assert loader.users == [None]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.usefixtures("django_settings")
async def test_channels_auth_middleware_stack_gives_anonymous_user() -> None:
    from channels.auth import AuthMiddlewareStack
    from django.contrib.auth.models import AnonymousUser

    loader = OwnedSessionLoader()
    app = AuthMiddlewareStack(SessionSyncMiddleware(channels_router(), loader=loader, paths=PATHS))
    await channels_conversation(app, [])
    assert isinstance(loader.calls[0].user, AnonymousUser)

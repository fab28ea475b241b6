"""The Litestar app: a JSON API, each session live over a WebSocket or Server-Sent Events, and
the page that uses them."""

from __future__ import annotations

import logging
import re
from typing import Annotated, Any, Literal

from litestar import (
    Controller,
    Litestar,
    MediaType,
    Request,
    Response,
    WebSocket,
    get,
    post,
    websocket,
)
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency, Provide
from litestar.exceptions import (
    HTTPException,
    NotAuthorizedException,
    NotFoundException,
    ServiceUnavailableException,
    WebSocketDisconnect,
)
from litestar.params import FromPath, JSONBody
from litestar.static_files import create_static_files_router
from litestar.status_codes import (
    HTTP_200_OK,
    HTTP_202_ACCEPTED,
    HTTP_409_CONFLICT,
    HTTP_500_INTERNAL_SERVER_ERROR,
    WS_1008_POLICY_VIOLATION,
    WS_1011_INTERNAL_ERROR,
)
from litestar.types import Scope
from msgspec import Meta, Struct
from sqlalchemy.ext.asyncio import create_async_engine

from asgi_session_sync import SessionSync
from asgi_session_sync.client import STATIC_DIR
from asgi_session_sync.loaders.sqlalchemy import sqlalchemy_loader
from examples.chat.demo import DemoView, demo_view
from examples.chat.events import SessionEvents
from examples.chat.live import HEARTBEAT, LiveChat
from examples.chat.models import ChatSession, SessionView, is_session_id, session_view
from examples.chat.page import CLIENT_STATIC_PATH, PAGE_STATIC_DIR, PAGE_STATIC_PATH, page_html
from examples.chat.stopping import StopOutcome, stop_answer
from examples.chat.store import ChatStore

from .settings import Settings

__all__ = ["create_app", "token_user"]

logger = logging.getLogger("examples.litestar_app")

_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Characters of a client-supplied value (a path) that a log line keeps.
_LOG_CHARS = 200


# Authentication: the least that makes the owner check real. The token IS the user's name;
# put your real authentication (a session cookie, a signed JWT) in token_user. The API and the
# WebSocket each call it once per connection.


def token_user(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    """The user a request or WebSocket names: ``Authorization: Bearer <user>`` or ``?token=``."""
    scheme, _, credentials = connection.headers.get("authorization", "").partition(" ")
    token = credentials if scheme.lower() == "bearer" else connection.query_params.get("token")
    return token if token is not None and _TOKEN.fullmatch(token) else None


async def provide_user(request: Request[Any, Any, Any]) -> str:
    """The ``user`` dependency of the API: the token's user, or 401."""
    user = token_user(request)
    if user is None:
        raise NotAuthorizedException("pass Authorization: Bearer <user> or ?token=<user>")
    return user


# The JSON API.


class NewSession(Struct):
    """Body of ``POST /api/sessions``."""

    title: Annotated[str, Meta(min_length=1, max_length=200)] = "New session"


class NewPrompt(Struct):
    """Body of ``POST /api/sessions/{id}/prompts``."""

    prompt: Annotated[str, Meta(min_length=1, max_length=4000)]


class StopResult(Struct):
    """Answer of ``POST /api/sessions/{id}/interactions/{position}/stop``.

    ``outcome``: ``stopping`` (202: the worker streaming it acknowledged, and ends it
    ``cancelled`` on every socket) or ``cancelled`` (200: it was still pending, and is
    cancelled now).
    """

    position: int
    outcome: Literal["stopping", "cancelled"]


class SessionController(Controller):
    """The current user's chat sessions."""

    path = "/api/sessions"

    @post("/")
    async def create_session(
        self,
        data: JSONBody[NewSession],
        user: NamedDependency[str],
        store: NamedDependency[ChatStore],
    ) -> SessionView:
        """Create an empty session owned by the user."""
        return await store.create_session(user, data.title)

    @get("/{session_id:str}")
    async def get_session(
        self,
        session_id: FromPath[str],
        user: NamedDependency[str],
        store: NamedDependency[ChatStore],
    ) -> SessionView:
        """The session as it is now: 404 unless the user owns it.

        The store checks the id's form and the owner in the query itself: a malformed id
        never reaches the database, and another user's session is never loaded, so neither
        its existence nor its size shows in the response time.
        """
        session = await store.get_session(session_id, user)
        if session is None:
            # One answer for "missing", "malformed" and "someone else's": guessing reveals nothing.
            raise NotFoundException("no such session")
        return session

    @post("/{session_id:str}/prompts", status_code=HTTP_202_ACCEPTED)
    async def add_prompt(
        self,
        session_id: FromPath[str],
        data: JSONBody[NewPrompt],
        user: NamedDependency[str],
        live: NamedDependency[LiveChat],
    ) -> SessionView:
        """Add a prompt; a worker claims it and its response streams over the WebSocket."""
        session = await live.store.add_prompt(
            session_id, user, data.prompt, claim_within=live.settings.lease_seconds
        )
        if session is None:
            raise NotFoundException("no such session")
        await live.publisher.publish_prompt(session)
        return session

    @post("/{session_id:str}/interactions/{position:int}/stop", status_code=HTTP_202_ACCEPTED)
    async def stop(
        self,
        session_id: FromPath[str],
        position: FromPath[int],
        user: NamedDependency[str],
        live: NamedDependency[LiveChat],
    ) -> Response[StopResult]:
        """Stop an answer: 202 once its worker acknowledged (it ends ``cancelled`` on every
        socket); 200 when the prompt was still pending (cancelled now); 409 when it has ended
        already; 404 unless the user owns it. Closing a page never stops an answer."""
        outcome = await stop_answer(
            live.store, live.bridge, live.publisher, session_id, user, position
        )
        if outcome is StopOutcome.STOPPING:
            return Response(StopResult(position, "stopping"), status_code=HTTP_202_ACCEPTED)
        if outcome is StopOutcome.CANCELLED:
            return Response(StopResult(position, "cancelled"), status_code=HTTP_200_OK)
        if outcome is StopOutcome.ALREADY_FINAL:
            raise HTTPException("the answer has ended already", status_code=HTTP_409_CONFLICT)
        if outcome is StopOutcome.NOT_FOUND:
            raise NotFoundException("no such interaction")
        raise ServiceUnavailableException(
            "no worker answered; if its worker is gone, the answer ends interrupted"
        )


# The live WebSocket.


@websocket("/ws/sessions/{session_id:str}")
async def session_socket(
    socket: WebSocket[Any, Any, Any],
    session_id: FromPath[str],
    sync: NamedDependency[SessionSync],
    live: NamedDependency[LiveChat],
) -> None:
    """The session's state: the snapshot at accept, then every update."""
    user = token_user(socket)
    if user is None or not is_session_id(session_id):
        # Refused before accepting: no snapshot, no updates, not even whether the id exists.
        await socket.close(code=WS_1008_POLICY_VIOLATION, reason="no such session")
        return
    # Subscribe BEFORE accepting: the snapshot is loaded during accept, so every update
    # committed after that load is already on its way to this subscription.
    async with live.bridge.subscribe(session_id) as updates:
        # socket.send takes ASGI messages: accept sends websocket.accept, then the snapshot.
        accepted = await sync.accept(socket.scope, socket.send, session_id, user=user)
        # The one owner check is the loader's: it compares the session's owner with `user`,
        # in the full load and in the version check of a client resuming with `since`. The
        # socket's state is known only when the loader vouched for this user: a snapshot was
        # sent, or the client is current. Live updates come from NATS, not from the loader,
        # so anything else is closed here, before a single update is forwarded: a failed load
        # with 1011 (the page retries), another user's or no such session with 1008 (final).
        if accepted.failed:
            await socket.close(code=WS_1011_INTERNAL_ERROR, reason="could not load the session")
            return
        if not accepted.known:
            await socket.close(code=WS_1008_POLICY_VIOLATION, reason="no such session")
            return
        try:
            # Sends each update (and each resync after NATS trouble) until the client leaves.
            await updates.forward(accepted, socket.receive, heartbeat=HEARTBEAT)
        except WebSocketDisconnect:
            return  # the client left while an update was being sent


# The live event stream (Server-Sent Events).


# No media_type="text/event-stream" here: Litestar would give the 401 and 404 answers' JSON
# that content type too. The stream sets its own headers.
@get("/sse/sessions/{session_id:str}")
async def session_events(
    session_id: FromPath[str],
    user: NamedDependency[str],
    sync: NamedDependency[SessionSync],
    live: NamedDependency[LiveChat],
) -> SessionEvents:
    """The session live over Server-Sent Events: its snapshot first, then every update, each
    with its version as ``id:``. ``EventSource`` sends no headers: pass ``?token=<user>``.

    Litestar calls the returned ASGI app with the request's raw ``send``: it starts the
    response itself, when the snapshot is ready.
    """
    # Refused here, with a status and no stream (401 from the user dependency, else 404):
    # once the stream has started its status is 200 for good. The loader checks the owner
    # again, against the same user. A malformed id never reaches the database.
    if not await live.store.is_owner(session_id, user):
        raise NotFoundException("no such session")
    return SessionEvents(sync, live.bridge, session_id, user)


# The page, and the browser client it imports.


@get("/", media_type=MediaType.HTML, include_in_schema=False)
async def index() -> str:
    """The live page, the same in both examples: open ``/?token=alice``."""
    return page_html("Litestar")


@get("/api/demo")
async def demo(user: NamedDependency[str], live: NamedDependency[LiveChat]) -> DemoView:
    """What the page's "Try it" panel shows: this API's pid, the running workers' pids (a
    roll call over NATS), and the timings the page needs."""
    return await demo_view(
        live.settings, live.bridge, framework="Litestar", module="examples.litestar_app"
    )


async def log_exception(exc: Exception, scope: Scope) -> None:
    """Log what became a 500, since the app leaves logging configuration to whoever runs it."""
    # An HTTPException is an answer the app chose (a 404, the stop endpoint's 503), not a crash.
    if isinstance(exc, HTTPException) and exc.status_code != HTTP_500_INTERNAL_SERVER_ERROR:
        return
    # The path is the client's: clipped, and quoted so that a newline cannot forge a log line.
    logger.error("unhandled exception path=%r", scope["path"][:_LOG_CHARS], exc_info=exc)


def create_app(settings: Settings) -> Litestar:
    """Build the app; nothing connects until its lifespan starts.

    The lifespan creates the tables, starts NATS (a private ``nats-server`` on
    ``settings.nats_port`` unless ``settings.nats_url`` names one), opens the bridge, starts
    the lease sweeper, and undoes all of it in reverse order on shutdown. Responses are
    streamed by the worker, another process (``python -m examples.litestar_app worker``).
    """
    store = ChatStore(create_async_engine(settings.database_url))
    live = LiveChat(store, settings, name="litestar-example")
    loader = sqlalchemy_loader(
        store.sessionmaker,
        ChatSession,
        interactions=ChatSession.interactions,
        owner=ChatSession.owner,
        version=ChatSession.version,
        serialize=session_view,  # the shape the API returns and the worker publishes
    )
    # The snapshot service: the WebSocket handler accepts through it, with the user it
    # authenticated. No middleware, so the route is declared once, by its handler.
    sync = SessionSync(loader, version_loader=loader.version_loader)
    return Litestar(
        route_handlers=[
            index,
            demo,
            SessionController,
            session_socket,
            session_events,
            # The page is the one both examples serve, with its files at the same paths.
            create_static_files_router(path=CLIENT_STATIC_PATH, directories=[STATIC_DIR]),
            create_static_files_router(path=PAGE_STATIC_PATH, directories=[PAGE_STATIC_DIR]),
        ],
        dependencies={
            "store": Provide(lambda: store, sync_to_thread=False),
            "live": Provide(lambda: live, sync_to_thread=False),
            "sync": Provide(lambda: sync, sync_to_thread=False),
            "user": Provide(provide_user),
        },
        lifespan=[store, live],
        after_exception=[log_exception],
        # Logging is configured by whoever runs the app (__main__, uvicorn, a test), not here.
        logging_config=None,
    )

"""The HTTP API, the live WebSocket, the live event stream (Server-Sent Events) and the page."""

from __future__ import annotations

from typing import Annotated

from fastapi import (
    APIRouter,
    Depends,
    HTTPException,
    Path,
    WebSocket,
    WebSocketDisconnect,
    status,
)
from fastapi.responses import HTMLResponse
from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from asgi_session_sync import SessionSync
from asgi_session_sync.nats import NatsBridge
from examples.chat.demo import demo_view
from examples.chat.events import SessionEvents
from examples.chat.live import HEARTBEAT
from examples.chat.page import page_html
from examples.chat.publishing import SessionPublisher
from examples.chat.stopping import StopOutcome, stop_answer
from examples.chat.store import ChatStore

from .auth import CurrentUser, WebSocketUser
from .schemas import DemoInfo, NewPrompt, NewSession, SessionView, StopResult
from .settings import Settings

SessionId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")]
Position = Annotated[int, Path(ge=0, le=2**31 - 1)]


# The app's parts live on app.state: the store, the settings and the snapshot service from
# create_app, the bridge and the publisher from the lifespan (they need the running event loop).
def get_store(connection: HTTPConnection) -> ChatStore:
    store: ChatStore = connection.app.state.store
    return store


def get_sync(connection: HTTPConnection) -> SessionSync:
    sync: SessionSync = connection.app.state.sync
    return sync


def get_bridge(connection: HTTPConnection) -> NatsBridge:
    bridge: NatsBridge = connection.app.state.bridge
    return bridge


def get_publisher(connection: HTTPConnection) -> SessionPublisher:
    publisher: SessionPublisher = connection.app.state.publisher
    return publisher


def get_settings(connection: HTTPConnection) -> Settings:
    settings: Settings = connection.app.state.settings
    return settings


Store = Annotated[ChatStore, Depends(get_store)]
Sync = Annotated[SessionSync, Depends(get_sync)]
Bridge = Annotated[NatsBridge, Depends(get_bridge)]
Publisher = Annotated[SessionPublisher, Depends(get_publisher)]
AppSettings = Annotated[Settings, Depends(get_settings)]

router = APIRouter()


class EventStream(Response):
    """A session's event stream (:class:`~examples.chat.events.SessionEvents`) as the response
    a FastAPI route returns: called with the request's raw ``send``, it starts the response
    itself, when the snapshot is ready."""

    media_type = "text/event-stream"

    def __init__(self, events: SessionEvents) -> None:
        super().__init__()
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.events(scope, receive, send)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> str:
    """The live page, the same in both examples: open it as ``/?token=alice``."""
    return page_html("FastAPI")


@router.get("/api/demo")
async def demo(_user: CurrentUser, bridge: Bridge, settings: AppSettings) -> DemoInfo:
    """What the page's "Try it" panel shows: this API's pid, the running workers' pids (a
    roll call over NATS), and the timings the page needs."""
    view = await demo_view(settings, bridge, framework="FastAPI", module="examples.fastapi_app")
    return DemoInfo.model_validate(view)


@router.post("/api/sessions", status_code=status.HTTP_201_CREATED)
async def create_session(body: NewSession, user: CurrentUser, store: Store) -> SessionView:
    """Create an empty session owned by the caller."""
    return SessionView.model_validate(await store.create_session(user, body.title))


@router.get("/api/sessions/{session_id}")
async def read_session(session_id: SessionId, user: CurrentUser, store: Store) -> SessionView:
    """The session's current state; 404 unless the caller owns it."""
    view = await store.get_session(session_id, user)
    if view is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such session")
    return SessionView.model_validate(view)


@router.post("/api/sessions/{session_id}/prompts", status_code=status.HTTP_202_ACCEPTED)
async def add_prompt(
    session_id: SessionId,
    body: NewPrompt,
    user: CurrentUser,
    store: Store,
    publisher: Publisher,
    settings: AppSettings,
) -> SessionView:
    """Add a prompt; a worker claims it and streams its response. Returns the new state."""
    view = await store.add_prompt(
        session_id, user, body.prompt, claim_within=settings.lease_seconds
    )
    if view is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such session")
    await publisher.publish_prompt(view)
    return SessionView.model_validate(view)


@router.post(
    "/api/sessions/{session_id}/interactions/{position}/stop",
    status_code=status.HTTP_202_ACCEPTED,
    responses={
        200: {"description": "The prompt was still pending: it is cancelled now."},
        404: {"description": "No such interaction in a session of the caller's."},
        409: {"description": "The answer has ended already."},
        503: {"description": "No worker answered: the lease sweeper will end the answer."},
    },
)
async def stop(
    session_id: SessionId,
    position: Position,
    user: CurrentUser,
    store: Store,
    bridge: Bridge,
    publisher: Publisher,
    response: Response,
) -> StopResult:
    """Stop an answer: 202 once its worker acknowledged (it ends ``cancelled`` on every
    socket). Closing or reloading a page never stops an answer; only this does."""
    outcome = await stop_answer(store, bridge, publisher, session_id, user, position)
    if outcome is StopOutcome.STOPPING:
        return StopResult(position=position, outcome="stopping")
    if outcome is StopOutcome.CANCELLED:
        response.status_code = status.HTTP_200_OK
        return StopResult(position=position, outcome="cancelled")
    if outcome is StopOutcome.ALREADY_FINAL:
        raise HTTPException(status.HTTP_409_CONFLICT, "the answer has ended already")
    if outcome is StopOutcome.NOT_FOUND:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such interaction")
    raise HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE,
        "no worker answered; if its worker is gone, the answer ends interrupted",
    )


@router.websocket("/ws/sessions/{session_id}")
async def session_socket(
    websocket: WebSocket,
    session_id: SessionId,
    user: WebSocketUser,
    sync: Sync,
    bridge: Bridge,
) -> None:
    """The session live: its snapshot first, then every published update."""
    # Subscribe BEFORE accepting: the snapshot is loaded during accept, so any update
    # published after that load is already on its way to this subscription.
    async with bridge.subscribe(session_id) as updates:
        socket = await sync.accept(websocket.scope, websocket.send, session_id, user=user)
        # The one owner check is the loader's: it compares the session's owner with `user`,
        # in the full load and in the version check of a client resuming with `since`. The
        # socket's state is known only when the loader vouched for this user: a snapshot was
        # sent, or the client is current. Live updates come from NATS, not from the loader,
        # so anything else is closed here, before a single update is forwarded: a failed load
        # with 1011 (the page retries), another user's or no such session with 1008 (final).
        if not socket.known:
            code = (
                status.WS_1011_INTERNAL_ERROR if socket.failed else status.WS_1008_POLICY_VIOLATION
            )
            await websocket.close(code)
            return
        try:
            await updates.forward(socket, websocket.receive, heartbeat=HEARTBEAT)
        except WebSocketDisconnect:
            return  # the client left while an update was being sent


@router.get(
    "/sse/sessions/{session_id}",
    response_class=EventStream,
    # For the OpenAPI docs, which otherwise read it from the response class's constructor.
    status_code=status.HTTP_200_OK,
    responses={
        200: {"description": "The snapshot as the first event, then every update."},
        401: {"description": "No token: pass ?token=<name> (EventSource sends no headers)."},
        404: {"description": "No such session of the caller's."},
    },
)
async def session_events(
    session_id: SessionId,
    user: CurrentUser,
    store: Store,
    sync: Sync,
    bridge: Bridge,
) -> EventStream:
    """The session live over Server-Sent Events: its snapshot first, then every update, each
    with its version as ``id:``. The page's ``?transport=sse`` follows it."""
    # Refused here, with a status and no stream: once the stream has started its status is
    # 200 for good. The loader checks the owner again, against the same user.
    if not await store.is_owner(session_id, user):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such session")
    return EventStream(SessionEvents(sync, bridge, session_id, user))

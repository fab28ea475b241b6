"""The HTTP API, the live WebSocket and the page."""

from __future__ import annotations

from pathlib import Path as FilePath
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, WebSocket, status
from fastapi.responses import HTMLResponse
from starlette.requests import HTTPConnection

from asgi_session_sync import get_resync
from asgi_session_sync.nats import NatsBridge

from .auth import CurrentUser, WebSocketUser
from .responder import Responder
from .schemas import NewPrompt, NewSession, SessionView
from .store import ChatStore

PAGE = FilePath(__file__).with_name("index.html").read_text(encoding="utf-8")

SessionId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")]


# The app's parts live on app.state: the store from create_app, the bridge and the responder
# from the lifespan (they need the running event loop).
def get_store(connection: HTTPConnection) -> ChatStore:
    store: ChatStore = connection.app.state.store
    return store


def get_bridge(connection: HTTPConnection) -> NatsBridge:
    bridge: NatsBridge = connection.app.state.bridge
    return bridge


def get_responder(connection: HTTPConnection) -> Responder:
    responder: Responder = connection.app.state.responder
    return responder


Store = Annotated[ChatStore, Depends(get_store)]
Bridge = Annotated[NatsBridge, Depends(get_bridge)]
ResponderDep = Annotated[Responder, Depends(get_responder)]

router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> str:
    """The live page: open it as ``/?token=alice``."""
    return PAGE


@router.post("/api/sessions", status_code=status.HTTP_201_CREATED)
async def create_session(body: NewSession, user: CurrentUser, store: Store) -> SessionView:
    """Create an empty session owned by the caller."""
    return await store.create_session(user, body.title)


@router.get("/api/sessions/{session_id}")
async def read_session(session_id: SessionId, user: CurrentUser, store: Store) -> SessionView:
    """The session's current state; 404 unless the caller owns it."""
    view = await store.get_session(session_id, user)
    if view is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such session")
    return view


@router.post("/api/sessions/{session_id}/prompts", status_code=status.HTTP_202_ACCEPTED)
async def add_prompt(
    session_id: SessionId,
    body: NewPrompt,
    user: CurrentUser,
    store: Store,
    responder: ResponderDep,
) -> SessionView:
    """Add a prompt and start streaming its response; returns the state with the prompt."""
    added = await store.add_prompt(session_id, user, body.prompt)
    if added is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such session")
    view, interaction_id = added
    # Started before publishing: a request cancelled from here on cannot lose the stream.
    responder.start(session_id, interaction_id)
    await responder.publish(view)
    return view


@router.websocket("/ws/sessions/{session_id}")
async def session_socket(
    websocket: WebSocket,
    session_id: SessionId,
    user: WebSocketUser,
    store: Store,
    bridge: Bridge,
) -> None:
    """The session live: the middleware's snapshot first, then every published update."""
    # The snapshot loader checks the owner, but live updates come from NATS, not the loader:
    # refuse other users before subscribing, or they would receive the updates.
    if not await store.is_owner(session_id, user):
        await websocket.close(status.WS_1008_POLICY_VIOLATION)
        return
    # Subscribe BEFORE accepting: the snapshot is loaded during accept, so any update
    # published after that load is already on its way to this subscription.
    async with bridge.subscribe(session_id, resync=get_resync(websocket.scope)) as updates:
        await websocket.accept()  # SessionSyncMiddleware sends the snapshot here
        await updates.forward(websocket.send_text, websocket.receive)

"""Minimal authentication: the token names the user (``?token=alice``, ``Bearer alice``).

Enough to make the owner checks real in a demo, and nothing more: anyone can claim any name.
Swap :func:`connection_user` for your real check (a session cookie, a verified JWT). Every
endpoint goes through it once, the WebSocket's included, which hands the user to the snapshot
loader: the API and the live socket always agree on who is connecting.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Depends, HTTPException, WebSocket, WebSocketException, status
from starlette.requests import HTTPConnection

_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")


def connection_user(connection: HTTPConnection) -> str | None:
    """The user an HTTP request or WebSocket names, or ``None``.

    Reads ``Authorization: Bearer <token>``, else the ``token`` query parameter (browsers
    cannot set headers on a WebSocket).
    """
    scheme, _, credentials = connection.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        token: str | None = credentials.strip()
    else:
        token = connection.query_params.get("token")
    return token if token and _TOKEN.fullmatch(token) else None


def current_user(request: HTTPConnection) -> str:
    """Dependency of the HTTP endpoints: the user, or 401."""
    user = connection_user(request)
    if user is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "pass a token: 'Authorization: Bearer <name>' or '?token=<name>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return user


def websocket_user(websocket: WebSocket) -> str:
    """Dependency of the WebSocket endpoint: the user, or the socket is closed before accept."""
    user = connection_user(websocket)
    if user is None:
        raise WebSocketException(status.WS_1008_POLICY_VIOLATION, "pass ?token=<name>")
    return user


CurrentUser = Annotated[str, Depends(current_user)]
WebSocketUser = Annotated[str, Depends(websocket_user)]

"""The events sent to clients, as pydantic models.

The wire format is the one of the design this library comes from::

    {"type": "session_update", "session_id": "a1", "owner": "alice", "session": {...}, "version": 7}

``version`` is left out when it is not known. Publishers (the NATS bridge, your own code) build
the same models, so a snapshot and a live update are the same event and a client applies both
with one code path.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

__all__ = ["SessionSynced", "SessionUpdate", "Version"]

Version = int | datetime | str
"""A session version: an int (a counter) or a timestamp (a ``datetime`` or an ISO-8601 string)."""

_WITHOUT_VERSION = {"version"}


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    type: str
    session_id: str
    version: Version | None = None

    def to_json(self) -> bytes:
        """Serialise to UTF-8 JSON bytes, leaving ``version`` out when it is not known."""
        exclude = _WITHOUT_VERSION if self.version is None else None
        return self.model_dump_json(exclude=exclude).encode()


class SessionUpdate(_Event):
    """The full current state of one session.

    Sent by the middleware as the first frame of a WebSocket, and by publishers for live
    updates. ``session`` is whatever the loader returned (a mapping or a pydantic model),
    serialised as JSON; ``owner`` is ``None`` when the loader did not say.
    """

    type: str = "session_update"
    owner: str | None = None
    session: Any


class SessionSynced(_Event):
    """Tells a resuming client that the version it already has is current.

    Sent instead of a :class:`SessionUpdate` when the client's ``since`` equals the current
    version and the middleware is configured to say so, so a client can tell "up to date"
    from "nothing sent".
    """

    type: Literal["session_synced"] = "session_synced"

"""Send the current state as the first WebSocket frame, so live UIs never show stale state."""

from .events import SessionSynced, SessionUpdate, Version
from .middleware import Authenticate, ErrorHook, SessionSyncMiddleware
from .snapshot import LoaderResult, SessionContext, SessionLoader, Snapshot

__all__ = [
    "Authenticate",
    "ErrorHook",
    "LoaderResult",
    "SessionContext",
    "SessionLoader",
    "SessionSyncMiddleware",
    "SessionSynced",
    "SessionUpdate",
    "Snapshot",
    "Version",
]

__version__ = "0.1.0"

"""Send the current state as the first WebSocket frame, so live UIs never show stale state."""

from .events import SessionSynced, SessionUpdate, Version
from .middleware import Authenticate, ErrorHook, Resync, SessionSyncMiddleware, get_resync
from .snapshot import LoaderResult, SessionContext, SessionLoader, Snapshot

__all__ = [
    "Authenticate",
    "ErrorHook",
    "LoaderResult",
    "Resync",
    "SessionContext",
    "SessionLoader",
    "SessionSyncMiddleware",
    "SessionSynced",
    "SessionUpdate",
    "Snapshot",
    "Version",
    "get_resync",
]

__version__ = "0.1.0"

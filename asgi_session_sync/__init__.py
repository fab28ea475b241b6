"""Send the current state as the first WebSocket frame, so live UIs never show stale state."""

from .events import SessionPatch, SessionSynced, SessionUpdate, Version, make_patch
from .middleware import (
    Authenticate,
    ErrorHook,
    FlightKey,
    Resync,
    SessionSyncMiddleware,
    default_flight_key,
    get_resync,
    get_snapshot_version,
)
from .snapshot import (
    LoaderResult,
    SessionContext,
    SessionLoader,
    Snapshot,
    VersionLoader,
    user_identity,
)
from .stats import MetricHook, SessionSyncStats

__all__ = [
    "Authenticate",
    "ErrorHook",
    "FlightKey",
    "LoaderResult",
    "MetricHook",
    "Resync",
    "SessionContext",
    "SessionLoader",
    "SessionPatch",
    "SessionSyncMiddleware",
    "SessionSyncStats",
    "SessionSynced",
    "SessionUpdate",
    "Snapshot",
    "Version",
    "VersionLoader",
    "default_flight_key",
    "get_resync",
    "get_snapshot_version",
    "make_patch",
    "user_identity",
]

__version__ = "0.1.0"

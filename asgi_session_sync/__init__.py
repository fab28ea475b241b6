"""Send the current state as the first WebSocket frame, so live UIs never show stale state.

The names here are what an app needs for the one-line middleware and for streaming live
updates itself; the rest is public in its own module: the wire format in
:mod:`asgi_session_sync.protocol`, the ordering rules in :mod:`asgi_session_sync.cursor`,
hook types in :mod:`asgi_session_sync.snapshot`, counters in :mod:`asgi_session_sync.stats`,
the NATS bridge in :mod:`asgi_session_sync.nats`.
"""

from .middleware import SessionSyncMiddleware
from .protocol import make_patch
from .snapshot import SessionContext, SessionLoader, Snapshot
from .sync import SessionSocket, SessionSync

__all__ = [
    "SessionContext",
    "SessionLoader",
    "SessionSocket",
    "SessionSync",
    "SessionSyncMiddleware",
    "Snapshot",
    "make_patch",
]

__version__ = "0.1.0.dev0"

"""The version fence: after a snapshot, drop the app's event frames that are not newer than it.

Apps subscribe to live updates before the snapshot is read, so nothing is missed; but an event
queued during the load can be older than the snapshot and arrive right after it, rolling the UI
back. The fence reads the app's outgoing text frames after the snapshot and drops, for the
fenced event types, those whose ``version`` is not newer than the snapshot's. It stops at the
first newer frame (the live stream has caught up) or after a bounded window of frames and
seconds, so a settled connection costs nothing.

A fenced event with a ``base_version`` is a patch (``session_patch``): it applies only to the
state at its base. After a snapshot at V the fence drops a patch whose ``version`` is not
newer than V (the snapshot already holds it) and a patch that *overlaps* V (base older than
V, version newer: it starts from a state the client never had, so applying it would corrupt
the client's state). The live stream has caught up at the first patch whose base is V. A patch
whose base is newer than V also ends the fence and passes: a patch between was lost before the
app sent it, which the fence cannot repair, and the client sees the gap (its version is not
the base) and reconnects with ``since``.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

import anyio
from pydantic_core import from_json

from .versions import PatchFit, classify_patch, is_newer

__all__ = ["VersionFence"]

logger = logging.getLogger("asgi_session_sync")


class VersionFence:
    """Decides, frame by frame, whether an app frame may follow a snapshot of ``version``.

    A text frame is dropped only when all hold: it is a JSON object whose ``type`` is one of
    ``event_types``, whose ``session_id`` is this session's (or absent), and whose ``version``
    compares with the baseline (see :mod:`asgi_session_sync.versions`) and is not newer.
    Everything else passes: binary frames, other types, frames without a comparable version.
    A frame with a ``base_version`` is a patch and is judged by
    :func:`~asgi_session_sync.versions.classify_patch`: stale and overlapping patches are
    dropped, one that chains from the baseline (or is ahead of it) ends the fence.
    """

    __slots__ = (
        "_deadline",
        "_event_types",
        "_frames_left",
        "_type_marks",
        "baseline",
        "dropped",
        "session_id",
    )

    def __init__(
        self,
        session_id: str,
        baseline: object,
        *,
        event_types: Collection[str],
        max_frames: int,
        max_seconds: float,
    ) -> None:
        self.session_id = session_id
        self.baseline = baseline
        self.dropped = 0
        self._event_types = event_types
        # Every fenced type's name must appear, quoted, in a frame that could be dropped.
        self._type_marks = tuple(f'"{event_type}"' for event_type in event_types)
        self._frames_left = max_frames
        self._deadline = anyio.current_time() + max_seconds

    def admit(self, text: str) -> bool | None:
        """False: drop ``text``. True: pass it, keep fencing. None: pass it, stop fencing."""
        self._frames_left -= 1
        if self._frames_left < 0:
            return None
        event = self._fenced_event(text)
        if event is None:
            return True
        if anyio.current_time() >= self._deadline:  # read only for frames it could drop
            return None
        version = event.get("version")
        if "base_version" in event:
            fit = classify_patch(event["base_version"], version, self.baseline)
            if fit is PatchFit.CHAINS or fit is PatchFit.AHEAD:
                return None
            if fit is PatchFit.UNORDERED:
                return True
            reason = "stale" if fit is PatchFit.STALE else "overlapping"
        else:
            newer = is_newer(version, self.baseline)
            if newer is None:
                return True
            if newer:
                return None
            reason = "stale"
        self.dropped += 1
        logger.debug(
            "fenced a %s frame session_id=%s version=%r snapshot_version=%r",
            reason,
            self.session_id,
            version,
            self.baseline,
        )
        return False

    def _fenced_event(self, text: str) -> dict[str, object] | None:
        """The frame as a dict if it is a versioned fenced event of this session, else None."""
        # Cheap tests first: most frames on a busy socket are not versioned fenced events.
        if not text.startswith("{") or '"version"' not in text:
            return None
        if not any(mark in text for mark in self._type_marks):
            return None
        try:
            # pydantic-core's parser: about twice as fast as json.loads on event frames.
            event = from_json(text, cache_strings=False)
        except ValueError:
            return None
        if not isinstance(event, dict) or event.get("type") not in self._event_types:
            return None
        if event.get("session_id", self.session_id) != self.session_id:
            return None
        if event.get("version") is None:
            return None
        return event

"""The one ordering engine: given the state a client has and a frame, emit, drop, or hold.

Every path that sends frames to a client decides through a :class:`Cursor`: the middleware
while it watches the app's first frames after the snapshot, and the hub's streams for every
live update. It does no I/O: the caller sends what it emits and, when told, repairs the
client with a fresh snapshot from the database (a *resync*), which the cursor then takes as
the truth with :meth:`Cursor.reset`.

The rules are stated once, as a table, in ``docs/concepts.md`` ("The ordering rules"); the
methods below implement them row by row. ``c`` is the version of the state the client has:
*verified* when it came from the database (a snapshot), *live* when it came from a live frame.
"Verify" is what keeps one bad message from freezing a socket: a frame that moved ``c`` far
ahead (a publisher's bug, a forged message) makes every later real update look stale, so the
first such stale frame asks the database, whose snapshot replaces the bad state. A verified
``c`` is never questioned again by stale frames, so duplicates right after a snapshot cost
nothing.
"""

from __future__ import annotations

import enum

from .protocol import Frame, Kind, Version

__all__ = ["Cursor", "Verdict"]

_MAX_COVERED = 1 << 22
"""Versions one producer's catch-up may stand for, at most (its deltas skip 1,000 versions after
each commit, so about 4,000 checkpoints' worth)."""


class Verdict(enum.Enum):
    """What to do with one frame."""

    EMIT = "emit"
    """Send it: the client can apply it."""
    DROP = "drop"
    """Do not send it: the client has it, or something newer, or it can never apply."""
    HOLD = "hold"
    """Kept by the cursor until the next snapshot: the caller must repair the client."""
    VERIFY = "verify"
    """Dropped as older than the client's live version: the caller must repair the client,
    so the database says which is right."""


class Cursor:
    """The version of the state one client has, and the ordering rules above.

    Args:
        version: The client's version, when it is known at creation (the snapshot's).
        known: Whether the client's state is known: ``True`` after a snapshot, even one
            without a version. An unknown state makes every patch wait for a repair.
        max_held_bytes: Bytes of frames held during a repair, at most (``Frame.size``);
            past it the held frames are dropped (counted in :attr:`unrepaired`): the repair's
            snapshot covers what was published before it loaded, and a later patch that does
            not chain asks for another.
    """

    __slots__ = (
        "_covered",
        "_held",
        "_known",
        "_verified",
        "held_bytes",
        "max_held_bytes",
        "repairing",
        "unrepaired",
        "version",
    )

    def __init__(
        self, version: Version | None = None, *, known: bool = False, max_held_bytes: int
    ) -> None:
        self.version = version
        """The version of the state the client has; ``None`` when unknown or unversioned."""
        self._known = known or version is not None
        self._verified = self._known
        self.repairing = False
        """Whether a repair was asked for and its snapshot has not arrived."""
        # A list, not a deque: most cursors never hold a frame, and an empty deque is 760
        # bytes of every idle socket's memory where an empty list is 56.
        self._held: list[Frame] = []
        self.held_bytes = 0
        """Bytes of the frames held for the repair."""
        self.max_held_bytes = max_held_bytes
        self.unrepaired = 0
        """Held frames dropped without being sent: the buffer overflowed or repair gave up."""
        self._covered: tuple[Version, Version] | None = None

    def offer(self, frame: Frame) -> Verdict:
        """Judge a live ``frame``; an emitted frame moves the client's version."""
        kind = frame.kind
        if kind is Kind.OTHER:
            return Verdict.EMIT
        if self.repairing:
            return self._hold(frame)
        if kind is Kind.SYNCED:
            return Verdict.DROP
        version, current = frame.version, self.version
        if kind is Kind.UPDATE:
            if version is None:
                return Verdict.EMIT
            if current is None or version > current:
                return self._emit(version)
            return self._stale(version, patch=False)
        # A patch.
        if current is None:
            return Verdict.DROP if self._known else self._repair(frame)
        assert version is not None  # parse_frame refuses a patch without one
        if frame.base_version == current:
            return self._emit(version)
        if version <= current:
            return self._stale(version, patch=True)
        return self._repair(frame)  # ahead, or overlapping the client's version

    def reset(self, snapshot: Frame) -> list[Frame]:
        """Take a snapshot from the database as the client's state; return what to send.

        The snapshot comes first, whatever its version; then the held frames, judged again
        against it: those it already covers are dropped, those that chain are sent. When it
        does not reach one (the loader is behind the publisher), that frame and the ones after
        it stay held and :attr:`repairing` stays true: catch up, load again, or
        :meth:`give_up`.
        """
        self.version = snapshot.version
        self._known = True
        self._covered = None
        return self._replay(snapshot, verified=True)

    @property
    def gap(self) -> bool:
        """Whether frames are held because they are ahead of the client's version: a
        producer's catch-up (:meth:`catch_up`) may fill the gap without a snapshot."""
        return self.repairing and bool(self._held) and self.version is not None

    def catch_up(self, patch: Frame) -> list[Frame] | None:
        """Fill a gap with ``patch`` from the producer; return what to send, or ``None``.

        ``patch`` must chain from the client's version (its ``base_version``); it is then
        sent, and the held frames judged again. It stands for the producer's own deltas from
        its ``covers_from`` to its version, so those are dropped when they arrive, as
        duplicates. The state is live, not verified: the database never committed some of
        those versions, and an older frame from another writer (a lease sweeper's, after the
        producer died) still makes the client ask the database. ``None`` (nothing changes)
        when it does not chain.
        """
        if patch.kind is not Kind.PATCH or patch.base_version != self.version:
            return None
        assert patch.version is not None
        self.version = patch.version
        start, base = patch.covers_from, patch.base_version
        # A range no producer could have published since the socket's version (a forged or
        # buggy reply) is ignored: its duplicates then ask the database, as any stale frame.
        end = patch.version
        if start is not None and base is not None and base < start <= end <= start + _MAX_COVERED:
            self._covered = (start, end)
        else:
            self._covered = None
        return self._replay(patch, verified=False)

    def _replay(self, truth: Frame, *, verified: bool) -> list[Frame]:
        """``truth`` is now the client's state: send it, then the held frames that chain."""
        self._verified = verified
        self.repairing = False
        emitted = [truth]
        held, self._held, self.held_bytes = self._held, [], 0
        for index, frame in enumerate(held):
            verdict = self.offer(frame)
            if verdict is Verdict.EMIT:
                emitted.append(frame)
            elif verdict is Verdict.VERIFY and verified:
                # Older than a frame replayed before it, and the database was just read: it
                # has spoken, so the frame is only stale. (After a producer's catch-up, the
                # repair goes on: the database must say which is right.)
                self.repairing = False
            elif verdict is Verdict.HOLD:
                # The truth does not reach it: the loader is behind the publisher. It and the
                # frames after it stay held, and the repair goes on (:attr:`repairing`).
                rest = held[index + 1 :]
                self._held.extend(rest)
                self.held_bytes += sum(frame.size for frame in rest)
                break
        return emitted

    def give_up(self) -> int:
        """Drop the held frames (the repair failed for good) and return how many."""
        dropped = len(self._held)
        self.unrepaired += dropped
        self._held.clear()
        self.held_bytes = 0
        self.repairing = False
        return dropped

    def _emit(self, version: Version) -> Verdict:
        self.version = version
        self._known = True
        self._verified = False
        return Verdict.EMIT

    def _stale(self, version: Version, *, patch: bool) -> Verdict:
        if self._verified or version == self.version:
            return Verdict.DROP
        covered = self._covered
        if patch and covered is not None and covered[0] <= version <= covered[1]:
            return Verdict.DROP  # a producer's delta its catch-up already carried
        self.repairing = True
        return Verdict.VERIFY

    def _repair(self, frame: Frame) -> Verdict:
        self.repairing = True
        return self._hold(frame)

    def _hold(self, frame: Frame) -> Verdict:
        if self.held_bytes + frame.size > self.max_held_bytes:
            self.unrepaired += len(self._held) + 1
            self._held.clear()
            self.held_bytes = 0
            return Verdict.HOLD
        self._held.append(frame)
        self.held_bytes += frame.size
        return Verdict.HOLD

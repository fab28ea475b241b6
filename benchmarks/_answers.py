"""Streamed answers for the benchmarks: the producer's two ways, its database, the tabs watching.

The answer parts (the answer-length axis of :mod:`benchmarks.token_cost`, and
:mod:`benchmarks.answer_load`) stream an LLM's answer into a session (the answer shape of
:mod:`benchmarks._sessions`) from the load generator, as the app's worker would, to a server
(:mod:`benchmarks._server` with ``--answer``) whose sockets watch the session. The server's
CPU is then the API's alone: uvicorn and the fan-out, not the producer.

- :class:`CheckpointStore`: a real SQLite file (WAL, ``synchronous=NORMAL``) holding each
  answer's text, status and version, written by compare-and-set as an app's checkpoint
  callback would (:class:`~asgi_session_sync.streaming.Checkpoint`); it counts its commits.
- :func:`library_answer`: the library's way, :class:`~asgi_session_sync.streaming.AnswerStream`
  (coalesced ``append`` deltas, checkpoints through the callback), tokens at a steady rate.
- :func:`replaced_answer`: the way before it (the example app's worker until issue 18): each
  token commits the whole text and publishes ``replace`` of it, the next token once every tab
  has this one.
- :class:`Tab`: one browser tab, a ``websockets`` client reading the answer's frames until the
  last (the one that sets the status), checked after the clock stops.
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
import time
from bisect import bisect_right
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from websockets.asyncio.client import ClientConnection

from asgi_session_sync.nats import NatsBridge
from asgi_session_sync.protocol import AnswerStatus, Version, apply_patch
from asgi_session_sync.streaming import AnswerStream, Checkpoint

from ._clients import open_client
from ._server import Broker, embedded_nats
from ._sessions import SNAPSHOT_VERSION, status_path, text_path

__all__ = [
    "CHECKPOINT_INTERVAL",
    "PUBLISH_INTERVAL",
    "AnswerEnvironment",
    "AnswerRun",
    "CheckpointStore",
    "PublishTimes",
    "Tab",
    "answer_environment",
    "library_answer",
    "replaced_answer",
    "token_ends",
]

PUBLISH_INTERVAL = 0.05
"""Seconds between two deltas of an answer, at least: ``AnswerStream``'s default."""
CHECKPOINT_INTERVAL = 0.25
"""Seconds between two checkpoints of an answer, at least: ``AnswerStream``'s default."""
PATCH = b'{"type":"session_patch"'
SNAPSHOT = b'{"type":"session_update"'


# The database.


class CheckpointStore:
    """The answers' database: a real SQLite file, written by compare-and-set; counts commits.

    One connection, in WAL mode with ``synchronous=NORMAL`` (what an app on SQLite sets), used
    from a worker thread one statement at a time. :meth:`save` is an answer's checkpoint
    callback; ``commits[session_id]`` counts what it committed.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS answers (session_id TEXT PRIMARY KEY, "
            "version INTEGER NOT NULL, text TEXT NOT NULL, status TEXT NOT NULL)"
        )
        self._db.commit()
        self._lock = anyio.Lock()
        self.commits: Counter[str] = Counter()

    def close(self) -> None:
        """Close the connection."""
        self._db.close()

    async def start(self, session_id: str, version: Version) -> None:
        """The answer's row as the app has it when the answer starts: empty, ``streaming``."""
        async with self._lock:
            await anyio.to_thread.run_sync(self._start, session_id, version)
        self.commits[session_id] = 0

    def _start(self, session_id: str, version: Version) -> None:
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO answers VALUES (?, ?, '', ?)",
                (session_id, version, AnswerStatus.STREAMING.value),
            )

    async def save(self, checkpoint: Checkpoint) -> Version:
        """Commit ``checkpoint`` if the answer is still at its base version; the version after."""
        async with self._lock:
            return await anyio.to_thread.run_sync(self._save, checkpoint)

    def _save(self, checkpoint: Checkpoint) -> Version:
        with self._db:  # one transaction: commits on leaving, rolls back on an exception
            moved = self._db.execute(
                "UPDATE answers SET version = ?, text = ?, status = ? "
                "WHERE session_id = ? AND version = ?",
                (
                    checkpoint.version,
                    checkpoint.text,
                    checkpoint.status.value,
                    checkpoint.session_id,
                    checkpoint.base_version,
                ),
            ).rowcount
            if moved:
                self.commits[checkpoint.session_id] += 1
                return checkpoint.version
            row = self._db.execute(
                "SELECT version FROM answers WHERE session_id = ?", (checkpoint.session_id,)
            ).fetchone()
            return int(row[0])

    async def row(self, session_id: str) -> tuple[Version, str, str]:
        """The answer's committed version, text and status."""
        async with self._lock:
            row = await anyio.to_thread.run_sync(
                lambda: self._db.execute(
                    "SELECT version, text, status FROM answers WHERE session_id = ?",
                    (session_id,),
                ).fetchone()
            )
        return int(row[0]), str(row[1]), str(row[2])


@dataclass(frozen=True)
class AnswerEnvironment:
    """Around an answer part's rounds: the broker, the answers' database, the producer's bridge."""

    broker: Broker
    store: CheckpointStore
    bridge: NatsBridge

    @property
    def url(self) -> str:
        """The broker's URL (a secret: hand it to servers through their environment)."""
        return self.broker.url

    @property
    def pid(self) -> int:
        """The broker's pid."""
        return self.broker.pid


@asynccontextmanager
async def answer_environment(options: Any = None) -> AsyncIterator[AnswerEnvironment]:
    """An embedded nats-server, a SQLite file in a temporary folder, and the producer's bridge."""
    with tempfile.TemporaryDirectory(prefix="answers-") as folder:
        store = CheckpointStore(Path(folder) / "answers.sqlite3")
        try:
            async with embedded_nats(options) as broker, NatsBridge(broker.url) as bridge:
                yield AnswerEnvironment(broker, store, bridge)
        finally:
            store.close()


# The producer.


class PublishTimes:
    """The producer's bridge for ``AnswerStream``, noting when each delta was published.

    ``times[(session_id, version)]`` is ``time.perf_counter()`` as ``publish_patch`` is called.
    """

    def __init__(self, bridge: NatsBridge) -> None:
        self.bridge = bridge
        self.times: dict[tuple[str, Version], float] = {}

    async def publish_patch(
        self,
        session_id: str,
        patch: Sequence[Mapping[str, Any]],
        *,
        base_version: Version,
        version: Version,
        owner: str | None = None,
    ) -> None:
        """Note the time, then publish through the bridge."""
        self.times[(session_id, version)] = time.perf_counter()
        await self.bridge.publish_patch(
            session_id, patch, base_version=base_version, version=version, owner=owner
        )

    def serve_answer(
        self,
        session_id: str,
        text_path: str,
        *,
        catch_up: Callable[[Version], bytes | None],
        stop: Callable[[], bool],
    ) -> AbstractAsyncContextManager[None]:
        """The bridge's own."""
        return self.bridge.serve_answer(session_id, text_path, catch_up=catch_up, stop=stop)


@dataclass(frozen=True)
class AnswerRun:
    """What the producer of one answer saw: its seconds, its publishes, its final version."""

    seconds: float
    publishes: int
    version: Version


async def library_answer(
    transport: PublishTimes,
    store: CheckpointStore,
    session_id: str,
    *,
    owner: str | None,
    interactions: int,
    tokens: Sequence[str],
    rate: float,
) -> AnswerRun:
    """Stream ``tokens`` at ``rate`` per second through ``AnswerStream``, as its docs show.

    Coalesced ``append`` deltas at most every :data:`PUBLISH_INTERVAL`, a checkpoint into
    ``store`` at most every :data:`CHECKPOINT_INTERVAL` and one at the end, status ``complete``.
    """
    await store.start(session_id, SNAPSHOT_VERSION)
    started = time.perf_counter()
    async with AnswerStream(
        transport,
        session_id,
        text_path=text_path(interactions),
        status_path=status_path(interactions),
        version=SNAPSHOT_VERSION,
        checkpoint=store.save,
        owner=owner,
        publish_interval=PUBLISH_INTERVAL,
        checkpoint_interval=CHECKPOINT_INTERVAL,
    ) as answer:
        for k, token in enumerate(tokens):
            await _sleep_until(started + k / rate)
            answer.append(token)
    return AnswerRun(time.perf_counter() - started, answer.publishes, answer.version)


async def replaced_answer(
    bridge: NatsBridge,
    store: CheckpointStore,
    session_id: str,
    *,
    owner: str | None,
    interactions: int,
    tokens: Sequence[str],
    rate: float,
    delivered: Callable[[int], Awaitable[None]],
) -> AnswerRun:
    """Stream ``tokens`` the way before ``AnswerStream``: commit, then ``replace`` the whole text.

    Each token commits the text so far (with the version bump) and publishes a patch that
    replaces it; the last one also sets the status. The next token comes at ``rate`` per
    second, or once ``delivered(k)`` says every tab has the ``k``-th patch, whichever is later,
    so nothing queues however long the text grows.
    """
    await store.start(session_id, SNAPSHOT_VERSION)
    started = time.perf_counter()
    version, text = SNAPSHOT_VERSION, ""
    for k, token in enumerate(tokens, 1):
        await _sleep_until(started + (k - 1) / rate)
        text += token
        last = k == len(tokens)
        status = AnswerStatus.COMPLETE if last else AnswerStatus.STREAMING
        await store.save(Checkpoint(session_id, text, status, version + 1, version))
        patch = [{"op": "replace", "path": text_path(interactions), "value": text}]
        if last:
            patch.append(
                {"op": "replace", "path": status_path(interactions), "value": status.value}
            )
        await bridge.publish_patch(
            session_id, patch, base_version=version, version=version + 1, owner=owner
        )
        version += 1
        await delivered(k)
    return AnswerRun(time.perf_counter() - started, len(tokens), version)


async def _sleep_until(moment: float) -> None:
    delay = moment - time.perf_counter()
    if delay > 0:
        await anyio.sleep(delay)


# The tabs.


@dataclass
class Tab:
    """One browser tab watching an answer: a ``websockets`` client and what it received.

    ``frames`` and ``times`` hold every frame after the snapshot with the time it was read, or
    only the last one (``keep_all=False``: a stream of whole texts would not fit in memory);
    ``count`` and ``bytes`` count them all.
    """

    ws: ClientConnection
    session_id: str
    snapshot: bytes
    frames: list[bytes] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    kept_all: bool = True
    count: int = 0
    bytes: int = 0
    not_patches: int = 0

    @classmethod
    async def open(cls, url: str, session_id: str) -> Tab:
        """Connect to the session (``url``) and read its snapshot.

        Raises:
            RuntimeError: The first frame is not the session's snapshot.
        """
        ws = await open_client(url, bound=30)
        snapshot = await ws.recv(decode=False)
        if not snapshot.startswith(SNAPSHOT):
            await ws.close()
            raise RuntimeError(f"the first frame is not a snapshot: {snapshot[:60]!r}")
        return cls(ws, session_id, snapshot)

    async def read(
        self, interactions: int, *, keep_all: bool, arrived: Callable[[], None] | None = None
    ) -> None:
        """Read frames until the one that sets the answer's status (the last of an answer).

        ``arrived`` is called after each frame.
        """
        marker = f'"path":"{status_path(interactions)}"'.encode()
        self.kept_all = keep_all
        while True:
            frame = await self.ws.recv(decode=False)
            now = time.perf_counter()
            self.count += 1
            self.bytes += len(frame)
            if not frame.startswith(PATCH):
                self.not_patches += 1
            if not keep_all:
                self.frames.clear()
                self.times.clear()
            self.frames.append(frame)
            self.times.append(now)
            if arrived is not None:
                arrived()
            if marker in frame:
                return

    def problem(self, expected: Any, version: Version) -> str | None:
        """Why the frames read do not make the expected session at ``version`` (``None``: they do).

        Every frame must be a patch; those kept must chain from the snapshot (or, when only the
        last is kept, be the one that ends at ``version``) and apply (``append`` included).
        """
        if self.not_patches:
            return f"{self.not_patches} frame(s) that are not patches (a resync?)"
        head = json.loads(self.snapshot)
        state, at = head["session"], head["version"]
        for frame in self.frames:
            patch = json.loads(frame)
            if self.kept_all and patch["base_version"] != at:
                return f"a patch from {patch['base_version']} after version {at}"
            try:
                state = apply_patch(state, patch["patch"])
            except ValueError as exc:
                return str(exc)
            at = patch["version"]
        if at != version:
            return f"the last frame is at version {at}, the answer ended at {version}"
        return None if state == expected else "the tab's session is not the answer streamed"

    def latencies(
        self, published: Mapping[tuple[str, Version], float], ends: Sequence[int]
    ) -> list[float]:
        """Seconds from publish to this tab, once per token a frame carried.

        ``ends[k]`` is where token ``k`` ends in the text (UTF-16 units); a frame carries the
        tokens that end within its ``append``.
        """
        seconds: list[float] = []
        for frame, read in zip(self.frames, self.times, strict=True):
            patch = json.loads(frame)
            sent = published[(self.session_id, patch["version"])]
            for operation in patch["patch"]:
                if operation["op"] == "append":
                    start, end = operation["offset"], operation["offset"] + len(operation["value"])
                    carried = bisect_right(ends, end) - bisect_right(ends, start)
                    seconds.extend([read - sent] * carried)
        return seconds

    async def close(self) -> None:
        """Close the connection."""
        await self.ws.close()


def token_ends(tokens: Sequence[str]) -> list[int]:
    """Where each token ends in the answer's text (ASCII tokens: UTF-16 units are characters)."""
    ends, at = [], 0
    for token in tokens:
        at += len(token)
        ends.append(at)
    return ends

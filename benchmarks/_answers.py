"""Streamed answers for the answer parts: the producer's two ways, its database, the tabs.

The producer runs in the load generator, as the app's worker would, so the server's CPU is the
API's alone. :func:`library_answer` streams through ``AnswerStream``; :func:`replaced_answer` the
way before it (each token commits and publishes the whole text). :class:`CheckpointStore` is a
real SQLite file written by compare-and-set; :class:`Tab` reads one answer, checked after the
clock.
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
import time
from bisect import bisect_right
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from itertools import accumulate
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

PUBLISH_INTERVAL = 0.05
"""Seconds between two deltas of an answer, at least: ``AnswerStream``'s default."""
CHECKPOINT_INTERVAL = 0.25
"""Seconds between two checkpoints of an answer, at least: ``AnswerStream``'s default."""


class CheckpointStore:
    """The answers' database: one SQLite connection in WAL mode with ``synchronous=NORMAL``
    (what an app on SQLite sets), used from a worker thread one statement at a time.
    :meth:`save` is an answer's checkpoint callback; ``commits[session_id]`` counts its commits."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.executescript(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; CREATE TABLE IF NOT EXISTS "
            "answers (session_id TEXT PRIMARY KEY, version INT, text TEXT, status TEXT)"
        )
        self._lock = anyio.Lock()
        self.commits: dict[str, int] = {}

    def close(self) -> None:
        """Close the connection."""
        self._db.close()

    async def _run(self, sql: str, *args: Any) -> sqlite3.Cursor:
        async with self._lock:
            return await anyio.to_thread.run_sync(self._db.execute, sql, args)

    async def start(self, session_id: str, version: Version) -> None:
        """The answer's row as the app has it when the answer starts: empty, ``streaming``."""
        sql = "INSERT OR REPLACE INTO answers VALUES (?, ?, '', ?)"
        await self._run(sql, session_id, version, AnswerStatus.STREAMING.value)
        self.commits[session_id] = 0

    async def save(self, checkpoint: Checkpoint) -> Version:
        """Commit ``checkpoint`` if the answer is still at its base version; the version after."""
        c = checkpoint
        sql = "UPDATE answers SET version = ?, text = ?, status = ? "
        sql += "WHERE session_id = ? AND version = ?"
        done = await self._run(sql, c.version, c.text, c.status.value, c.session_id, c.base_version)
        if done.rowcount:
            self.commits[c.session_id] += 1
            return c.version
        return (await self.row(c.session_id))[0]

    async def row(self, session_id: str) -> tuple[Version, str, str]:
        """The answer's committed version, text and status."""
        sql = "SELECT version, text, status FROM answers WHERE session_id = ?"
        version, text, status = (await self._run(sql, session_id)).fetchone()
        return int(version), str(text), str(status)


class TimedBridge(NatsBridge):
    """The producer's bridge, noting when each patch was published: ``times[(session_id,
    version)]`` is ``time.perf_counter()`` as ``publish_patch`` is called."""

    times: dict[tuple[str, Version], float]

    async def publish_patch(self, session_id: str, patch: Any, **kwargs: Any) -> None:
        """Note the time, then publish."""
        self.times[(session_id, kwargs["version"])] = time.perf_counter()
        await super().publish_patch(session_id, patch, **kwargs)


class Arrivals:
    """Frames the tabs have read; a producer in lock-step waits for a count."""

    def __init__(self) -> None:
        self.count, self._waiting = 0, (0, anyio.Event())

    def add(self) -> None:
        """Count one frame read."""
        self.count += 1
        if self.count >= self._waiting[0]:
            self._waiting[1].set()

    async def until(self, count: int) -> None:
        """Return once ``count`` frames in all were read."""
        if self.count < count:
            self._waiting = (count, anyio.Event())
            await self._waiting[1].wait()


@dataclass(frozen=True)
class AnswerEnvironment:
    """Around an answer part's rounds: the broker, the answers' database, the producer's bridge."""

    broker: Broker
    store: CheckpointStore
    bridge: TimedBridge


@asynccontextmanager
async def answer_environment(options: Any = None) -> AsyncIterator[AnswerEnvironment]:
    """An embedded nats-server, a SQLite file in a temporary folder, and the producer's bridge."""
    with tempfile.TemporaryDirectory(prefix="answers-") as folder:
        store = CheckpointStore(Path(folder) / "answers.sqlite3")
        try:
            async with embedded_nats() as broker, TimedBridge(broker.url) as bridge:
                bridge.times = {}
                yield AnswerEnvironment(broker, store, bridge)
        finally:
            store.close()


@dataclass(frozen=True)
class AnswerRun:
    """What the producer of one answer saw: its seconds and its final version."""

    seconds: float
    version: Version


async def library_answer(
    env: AnswerEnvironment,
    session_id: str,
    *,
    owner: str | None,
    interactions: int,
    tokens: Sequence[str],
    rate: float,
) -> AnswerRun:
    """Stream ``tokens`` at ``rate`` per second through ``AnswerStream`` as its docs show: deltas
    at most every 50 ms, a checkpoint at most every 250 ms and one at the end."""
    await env.store.start(session_id, SNAPSHOT_VERSION)
    started = time.perf_counter()
    async with AnswerStream(
        env.bridge,
        session_id,
        text_path=text_path(interactions),
        owner=owner,
        status_path=status_path(interactions),
        version=SNAPSHOT_VERSION,
        checkpoint=env.store.save,
        publish_interval=PUBLISH_INTERVAL,
        checkpoint_interval=CHECKPOINT_INTERVAL,
    ) as answer:
        for k, token in enumerate(tokens):
            await anyio.sleep(max(0, started + k / rate - time.perf_counter()))
            answer.append(token)
    return AnswerRun(time.perf_counter() - started, answer.version)


async def replaced_answer(
    env: AnswerEnvironment,
    session_id: str,
    *,
    owner: str | None,
    interactions: int,
    tokens: Sequence[str],
    rate: float,
    delivered: Callable[[int], Awaitable[None]],
) -> AnswerRun:
    """Stream ``tokens`` the way before ``AnswerStream``: each commits the text so far and
    publishes a patch replacing it (the last also sets the status), at ``rate`` per second or
    once ``delivered(k)`` says every tab has the ``k``-th patch, whichever is later."""
    await env.store.start(session_id, SNAPSHOT_VERSION)
    started, version, text = time.perf_counter(), SNAPSHOT_VERSION, ""
    for k, token in enumerate(tokens, 1):
        await anyio.sleep(max(0, started + (k - 1) / rate - time.perf_counter()))
        text += token
        status = AnswerStatus.COMPLETE if k == len(tokens) else AnswerStatus.STREAMING
        await env.store.save(Checkpoint(session_id, text, status, version + 1, version))
        patch = [{"op": "replace", "path": text_path(interactions), "value": text}]
        if k == len(tokens):
            patch.append(
                {"op": "replace", "path": status_path(interactions), "value": status.value}
            )
        await env.bridge.publish_patch(
            session_id, patch, base_version=version, version=version + 1, owner=owner
        )
        version += 1
        await delivered(k)
    return AnswerRun(time.perf_counter() - started, version)


@dataclass
class Tab:
    """One browser tab watching an answer: a ``websockets`` client and what it received.

    ``frames`` and ``times`` hold every frame after the snapshot with the time it was read, or
    only the last one (``keep_all=False``: whole texts would not fit in memory); ``count``
    and ``bytes`` count them all.
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
        """Connect to the session at ``url`` and read its snapshot (else ``ConnectionError``)."""
        ws = await open_client(url, bound=30)
        snapshot = await ws.recv(decode=False)
        if not snapshot.startswith(b'{"type":"session_update"'):
            await ws.close()
            raise ConnectionError(f"the first frame is not a snapshot: {snapshot[:60]!r}")
        return cls(ws, session_id, snapshot)

    async def read(
        self, interactions: int, *, keep_all: bool, arrived: Arrivals | None = None
    ) -> None:
        """Read frames until the one that sets the answer's status (its last)."""
        marker = f'"path":"{status_path(interactions)}"'.encode()
        self.kept_all = keep_all
        while True:
            frame = await self.ws.recv(decode=False)
            now = time.perf_counter()
            self.count, self.bytes = self.count + 1, self.bytes + len(frame)
            self.not_patches += not frame.startswith(b'{"type":"session_patch"')
            if not keep_all:
                self.frames.clear()
                self.times.clear()
            self.frames.append(frame)
            self.times.append(now)
            if arrived is not None:
                arrived.add()
            if marker in frame:
                return

    def problem(self, expected: Any, version: Version) -> str | None:
        """Why the frames do not make the expected session at ``version`` (``None``: they do):
        all must be patches; those kept must chain from the snapshot (or, when only the last
        is kept, end at ``version``) and apply."""
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
        """Seconds from publish to this tab, once per token a frame carried: the tokens that
        end (``ends[k]``, UTF-16 units) within its ``append``."""
        seconds: list[float] = []
        for frame, read in zip(self.frames, self.times, strict=True):
            patch = json.loads(frame)
            sent = published[(self.session_id, patch["version"])]
            for op in patch["patch"]:
                if op["op"] == "append":
                    start, end = op["offset"], op["offset"] + len(op["value"])
                    seconds += [read - sent] * (bisect_right(ends, end) - bisect_right(ends, start))
        return seconds

    async def close(self) -> None:
        """Close the connection."""
        await self.ws.close()


def token_ends(tokens: Sequence[str]) -> list[int]:
    """Where each token ends in the answer's text (ASCII tokens: UTF-16 units are characters)."""
    return list(accumulate(map(len, tokens)))

"""Snapshot cost: load + serialise + send of real sessions, and serialisation alone.

**Load + serialise + send**, on SQLite (aiosqlite, a temporary file) and PostgreSQL (asyncpg, a
schema of its own, dropped afterwards), for sessions of 10, 100 and 1,000 interactions (about
240 bytes each): the same two servers as the first-frame benchmark over a chat database
(:mod:`benchmarks._chat_db`). ``bare`` loads by hand with one SQLAlchemy Core ``SELECT`` and
sends the same ``SessionUpdate``; ``wrapped`` is the middleware with the library's
``sqlalchemy_loader`` (ORM). Both send the same bytes. Per connection the client times the
wait for the snapshot once the handshake is done (the middleware and the bare app both
accept before loading), that is load + serialise + send; connections are sequential, in
blocks alternating between the servers. Beside it, each loader alone, called in this process.

**Serialisation alone**, in this process: the snapshot event built from the loader's dict
(``datetime`` values included) with ``SessionUpdate(...).to_json()``, as the middleware does,
against what pydantic offers for the same output: ``pydantic_core.to_json`` on the raw dict,
a ``TypeAdapter`` of a fully typed ``TypedDict``, and a fully typed model validated then
dumped. Every candidate's output is checked to be the same bytes.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import pydantic_core
from pydantic import BaseModel, TypeAdapter
from typing_extensions import TypedDict  # pydantic needs it for TypedDict on Python < 3.12

from asgi_session_sync import SessionContext
from asgi_session_sync.events import SessionUpdate

from ._chat_db import (
    FILLER,
    SIZES,
    HandLoader,
    database,
    library_loader,
    open_engine,
    postgres_url,
    session_id_for,
)
from ._clients import open_client, rotate, server_pair
from ._overhead_server import VARIANTS
from ._report import PartResult, figure, machine_line, percentile, ratio, spread, table

__all__ = ["SnapshotCostOptions", "measure"]

DATABASES = ("sqlite", "postgresql")


@dataclass(frozen=True)
class SnapshotCostOptions:
    """How much to measure; counts are per variant per round, by session size."""

    rounds: int = 3
    databases: tuple[str, ...] = DATABASES
    connections: dict[int, int] = field(default_factory=lambda: {10: 200, 100: 100, 1000: 60})
    block: int = 10
    loads: dict[int, int] = field(default_factory=lambda: {10: 40, 100: 20, 1000: 8})
    sessions_per_size: int = 5
    serialise_rounds: int = 5
    serialise_calls: dict[int, int] = field(default_factory=lambda: {10: 2000, 100: 400, 1000: 50})
    timeout: float = 30.0


@dataclass
class LoadRound:
    """One database, size and variant in one round."""

    database: str
    size: int
    variant: str
    round: int
    connections: int
    frame_bytes: int
    errors: dict[str, int]
    p50_ms: float
    p99_ms: float
    connect_p50_ms: float
    load_alone_p50_ms: float


async def time_connections(
    url: str, count: int, bound: float
) -> tuple[list[float], list[float], set[str], Counter[str]]:
    """``count`` sequential connections: seconds handshake->snapshot and connect->snapshot.

    Each connection is bounded by ``bound`` seconds; failures are counted by kind.
    """
    waits, totals, frames, errors = [], [], set(), Counter[str]()
    for _ in range(count):
        try:
            with anyio.fail_after(bound):
                started = time.perf_counter()
                ws = await open_client(url, bound=bound)
                try:
                    opened = time.perf_counter()
                    frame = await ws.recv()
                    done = time.perf_counter()
                finally:
                    await ws.close()
        except Exception as exc:
            errors[type(exc).__name__] += 1
            continue
        waits.append(done - opened)
        totals.append(done - started)
        frames.add(frame if isinstance(frame, str) else frame.decode())
    return waits, totals, frames, errors


async def run_database_round(
    name: str, url: str, schema: str | None, number: int, options: SnapshotCostOptions
) -> tuple[list[LoadRound], list[str]]:
    """One round on one database: every size over fresh servers, then each loader alone."""
    results: list[LoadRound] = []
    problems: list[str] = []
    async with server_pair(db=url, schema=schema) as servers:
        for size in SIZES:
            ids = [session_id_for(size, k) for k in range(options.sessions_per_size)]
            waits: dict[str, list[float]] = {v: [] for v in VARIANTS}
            totals: dict[str, list[float]] = {v: [] for v in VARIANTS}
            errors: dict[str, Counter[str]] = {v: Counter() for v in VARIANTS}
            frames: dict[str, set[str]] = {v: set() for v in VARIANTS}
            for variant in VARIANTS:  # warm-up: statements compiled, pool connections open
                await time_connections(servers[variant].url(ids[0]), 3, options.timeout)
            blocks = max(1, options.connections[size] // options.block)
            for block in range(blocks):
                sid = ids[block % len(ids)]
                for variant in rotate(VARIANTS, block + number):
                    w, t, f, e = await time_connections(
                        servers[variant].url(sid), options.block, options.timeout
                    )
                    waits[variant] += w
                    totals[variant] += t
                    frames[variant] |= f
                    errors[variant] += e
            if frames["bare"] != frames["wrapped"]:
                problems.append(f"{name} {size}: the two servers sent different snapshots")
            loads = await time_loads(url, schema, ids, options.loads[size], number)
            for variant in VARIANTS:
                results.append(
                    LoadRound(
                        database=name,
                        size=size,
                        variant=variant,
                        round=number,
                        connections=len(waits[variant]),
                        frame_bytes=max((len(f.encode()) for f in frames[variant]), default=0),
                        errors=dict(errors[variant]),
                        p50_ms=percentile(waits[variant], 50) * 1000,
                        p99_ms=percentile(waits[variant], 99) * 1000,
                        connect_p50_ms=percentile(totals[variant], 50) * 1000,
                        load_alone_p50_ms=percentile(loads[variant], 50) * 1000,
                    )
                )
    return results, problems


async def time_loads(
    url: str, schema: str | None, ids: list[str], count: int, number: int
) -> dict[str, list[float]]:
    """Each loader alone in this process, alternating: seconds per call."""
    engine = open_engine(url, schema=schema, pool_size=1)
    try:
        library, by_hand = library_loader(engine), HandLoader(engine)
        seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for i in range(count + 2):  # two warm-up calls each, not counted
            sid = ids[i % len(ids)]
            for variant in rotate(VARIANTS, i + number):
                started = time.perf_counter()
                if variant == "wrapped":
                    await library(SessionContext(sid, {"type": "websocket", "path": "/"}))
                else:
                    await by_hand.load(sid)
                if i >= 2:
                    seconds[variant].append(time.perf_counter() - started)
        return seconds
    finally:
        await engine.dispose()


async def run_database(
    name: str, options: SnapshotCostOptions
) -> tuple[list[LoadRound], list[str]]:
    """Every round on one database, created and seeded here and always dropped."""
    results: list[LoadRound] = []
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="snapshot-cost-") as tmp:
        url = (
            f"sqlite+aiosqlite:///{Path(tmp) / 'chat.sqlite3'}"
            if name == "sqlite"
            else postgres_url()
        )
        async with database(url, sessions_per_size=options.sessions_per_size) as schema:
            for number in range(1, options.rounds + 1):
                mine, found = await run_database_round(name, url, schema, number, options)
                results += mine
                problems += found
                by = {(r.size, r.variant): r for r in mine}
                print(
                    f"  snapshot cost {name} round {number}: "
                    + ", ".join(
                        f"{size}: {ratio(by[size, 'wrapped'].p50_ms, by[size, 'bare'].p50_ms):.2f}x"
                        for size in SIZES
                    ),
                    file=sys.stderr,
                    flush=True,
                )
    return results, problems


# Serialisation alone.


class InteractionDict(TypedDict):
    id: int
    session_id: str
    position: int
    role: str
    content: str
    created_at: datetime


class SessionDict(TypedDict):
    id: str
    owner_id: str
    title: str
    version: int
    interactions: list[InteractionDict]


class EventDict(TypedDict):
    type: str
    session_id: str
    version: int
    owner: str
    session: SessionDict


class InteractionModel(BaseModel):
    id: int
    session_id: str
    position: int
    role: str
    content: str
    created_at: datetime


class SessionModel(BaseModel):
    id: str
    owner_id: str
    title: str
    version: int
    interactions: list[InteractionModel]


class EventModel(BaseModel):
    type: str
    session_id: str
    version: int
    owner: str
    session: SessionModel


EVENT_ADAPTER = TypeAdapter(EventDict)

SERIALISERS = (
    "SessionUpdate(...).to_json()",
    "SessionUpdate(...).model_dump_json()",
    "pydantic_core.to_json(dict)",
    "TypeAdapter(TypedDict).dump_json",
    "typed model_validate + dump_json",
)
LIBRARY = SERIALISERS[0]


def loaded_session(session_id: str, size: int) -> dict[str, Any]:
    """A session as the library's SQLAlchemy loader returns it (see benchmarks._chat_db)."""
    started = datetime(2025, 1, 1, tzinfo=timezone.utc)
    return {
        "id": session_id,
        "owner_id": "alice",
        "title": f"Session {session_id}",
        "version": 7,
        "interactions": [
            {
                "id": n + 1,
                "session_id": session_id,
                "position": n,
                "role": "user" if n % 2 == 0 else "assistant",
                "content": f"#{n}: {FILLER}",
                "created_at": started + timedelta(seconds=n),
            }
            for n in range(size)
        ],
    }


def serialise(name: str, session_id: str, session: dict[str, Any]) -> bytes:
    """The snapshot event of ``session``, as JSON bytes, the way ``name`` says."""
    if name == "SessionUpdate(...).to_json()":
        update = SessionUpdate(session_id=session_id, owner="alice", session=session, version=7)
        return update.to_json()
    if name == "SessionUpdate(...).model_dump_json()":
        text = SessionUpdate(
            session_id=session_id, owner="alice", session=session, version=7
        ).model_dump_json()
        return text.encode()
    event = {
        "type": "session_update",
        "session_id": session_id,
        "version": 7,
        "owner": "alice",
        "session": session,
    }
    if name == "pydantic_core.to_json(dict)":
        return pydantic_core.to_json(event)
    if name == "TypeAdapter(TypedDict).dump_json":
        return EVENT_ADAPTER.dump_json(event)  # type: ignore[arg-type]
    return EventModel.model_validate(event).model_dump_json().encode()


@dataclass
class SerialiseRound:
    """One serialiser and size in one round: microseconds per call."""

    serialiser: str
    size: int
    round: int
    calls: int
    frame_bytes: int
    p50_us: float
    p99_us: float


def time_serialisers(options: SnapshotCostOptions) -> tuple[list[SerialiseRound], list[str]]:
    """Every serialiser on every size, interleaved in blocks, over rounds."""
    results: list[SerialiseRound] = []
    problems: list[str] = []
    blocks = 10
    for size in SIZES:
        session_id = session_id_for(size, 0)
        session = loaded_session(session_id, size)
        outputs = {name: serialise(name, session_id, session) for name in SERIALISERS}
        if len(set(outputs.values())) != 1:
            problems.append(f"serialisation {size}: the candidates' outputs differ")
        per_block = max(1, options.serialise_calls[size] // blocks)
        for number in range(1, options.serialise_rounds + 1):
            samples: dict[str, list[float]] = {name: [] for name in SERIALISERS}
            for block in range(blocks):
                for name in rotate(SERIALISERS, block + number):
                    for _ in range(per_block):
                        started = time.perf_counter_ns()
                        serialise(name, session_id, session)
                        samples[name].append((time.perf_counter_ns() - started) / 1000)
            for name in SERIALISERS:
                results.append(
                    SerialiseRound(
                        serialiser=name,
                        size=size,
                        round=number,
                        calls=len(samples[name]),
                        frame_bytes=len(outputs[name]),
                        p50_us=percentile(samples[name], 50),
                        p99_us=percentile(samples[name], 99),
                    )
                )
    return results, problems


# Summaries and tables.


def summarise_loads(rounds: list[LoadRound]) -> dict[str, Any]:
    """Per database and size: each variant's figures across rounds, and wrapped/bare per round."""
    summary: dict[str, Any] = {}
    names = ("p50_ms", "p99_ms", "connect_p50_ms", "load_alone_p50_ms")
    for db in sorted({r.database for r in rounds}, key=DATABASES.index):
        summary[db] = {}
        for size in SIZES:
            mine = {
                v: [r for r in rounds if r.database == db and r.size == size and r.variant == v]
                for v in VARIANTS
            }
            pairs = list(zip(mine["bare"], mine["wrapped"], strict=True))
            entry: dict[str, Any] = {
                v: {n: spread(getattr(r, n) for r in rs) for n in names}
                | {
                    "connections": sum(r.connections for r in rs),
                    "errors": sum(sum(r.errors.values()) for r in rs),
                    "frame_bytes": max(r.frame_bytes for r in rs),
                }
                for v, rs in mine.items()
            }
            entry["ratio_wrapped_over_bare"] = {
                n: spread(ratio(getattr(w, n), getattr(b, n)) for b, w in pairs) for n in names
            }
            summary[db][str(size)] = entry
    return summary


def summarise_serialisers(rounds: list[SerialiseRound]) -> dict[str, Any]:
    """Per size: each serialiser across rounds, the fastest, and ratios to it per round."""
    summary: dict[str, Any] = {}
    for size in SIZES:
        mine = {s: [r for r in rounds if r.size == size and r.serialiser == s] for s in SERIALISERS}
        entry: dict[str, Any] = {
            s: {"p50_us": spread(r.p50_us for r in rs), "p99_us": spread(r.p99_us for r in rs)}
            for s, rs in mine.items()
        }
        fastest = min(
            (s for s in SERIALISERS if s != LIBRARY), key=lambda s: entry[s]["p50_us"]["median"]
        )
        entry["fastest_alternative"] = fastest
        entry["frame_bytes"] = mine[LIBRARY][0].frame_bytes
        entry["ratio_over_fastest"] = {
            s: {
                q: spread(
                    ratio(getattr(a, q), getattr(b, q))
                    for a, b in zip(mine[s], mine[fastest], strict=True)
                )
                for q in ("p50_us", "p99_us")
            }
            for s in SERIALISERS
        }
        summary[str(size)] = entry
    return summary


def format_loads(summary: dict[str, Any]) -> str:
    """A row per database and size: both variants, the ratio, and each loader alone."""
    ms, times = figure(".2f"), figure(".2f", "x")
    rows = [
        [
            "database",
            "interactions",
            "frame KB",
            "by hand p50 ms",
            "library p50 ms",
            "library/by hand p50",
            "p99 by hand",
            "p99 library",
            "library/by hand p99",
            "load alone: by hand",
            "library",
            "errors",
        ]
    ]
    for db, sizes in summary.items():
        for size, e in sizes.items():
            b, w, r = e["bare"], e["wrapped"], e["ratio_wrapped_over_bare"]
            rows.append(
                [
                    db,
                    size,
                    f"{w['frame_bytes'] / 1024:.1f}",
                    ms(b["p50_ms"]),
                    ms(w["p50_ms"]),
                    times(r["p50_ms"]),
                    ms(b["p99_ms"]),
                    ms(w["p99_ms"]),
                    times(r["p99_ms"]),
                    ms(b["load_alone_p50_ms"]),
                    ms(w["load_alone_p50_ms"]),
                    f"{b['errors'] + w['errors']}/{b['connections'] + w['connections']}",
                ]
            )
    return table(rows)


def format_serialisers(summary: dict[str, Any]) -> str:
    """A row per size and serialiser: time per call and its ratio to the fastest alternative."""
    us, times = figure(",.1f"), figure(".2f", "x")
    rows = [["interactions", "serialiser", "p50 us", "p99 us", "/ fastest p50", "/ fastest p99"]]
    for size, e in summary.items():
        for s in SERIALISERS:
            mark = " (fastest)" if s == e["fastest_alternative"] else ""
            rows.append(
                [
                    f"{size} ({e['frame_bytes'] / 1024:.1f} KB)" if s == SERIALISERS[0] else "",
                    s + mark,
                    us(e[s]["p50_us"]),
                    us(e[s]["p99_us"]),
                    times(e["ratio_over_fastest"][s]["p50_us"]),
                    times(e["ratio_over_fastest"][s]["p99_us"]),
                ]
            )
    return table(rows)


def measure(options: SnapshotCostOptions, machine: dict[str, Any]) -> PartResult:
    """Both databases, then serialisation alone; return the two tables and every figure."""
    started = time.perf_counter()
    loads: list[LoadRound] = []
    failures: list[str] = []
    for name in options.databases:
        mine, problems = anyio.run(run_database, name, options)
        loads += mine
        failures += problems
    serialised, problems = time_serialisers(options)
    failures += problems
    elapsed = time.perf_counter() - started
    load_summary = summarise_loads(loads)
    serialise_summary = summarise_serialisers(serialised)
    for db, sizes in load_summary.items():
        for size, e in sizes.items():
            if e["bare"]["errors"] or e["wrapped"]["errors"]:
                failures.append(f"snapshot cost {db} {size}: connections failed")
    counts = ", ".join(f"{options.connections[s]} x {s}" for s in SIZES)
    header = "\n".join(
        [
            "3. snapshot cost: load + serialise + send, by hand (bare app, SQLAlchemy Core) vs "
            "the library (middleware + sqlalchemy_loader, ORM)",
            f"sessions of {', '.join(map(str, SIZES))} interactions of ~240 bytes; per variant "
            f"per round: {counts} sequential connections in blocks of {options.block}, "
            f"alternating; {options.rounds} round(s) per database; times are handshake done -> "
            "snapshot received; 'load alone' is each loader called in the load generator",
            machine_line(machine),
            "figures: median (min-max) across rounds; ratios are per round",
        ]
    )
    serialise_header = (
        "serialisation alone: the snapshot event from the loader's dict to JSON bytes, "
        f"{options.serialise_rounds} round(s), candidates interleaved; ratios are to the "
        "fastest candidate other than the library's own call"
    )
    return PartResult(
        name="snapshot_cost",
        text="\n\n".join(
            [
                header,
                format_loads(load_summary),
                serialise_header,
                format_serialisers(serialise_summary),
                f"took {elapsed:.0f} s",
            ]
        ),
        data={
            "config": asdict(options),
            "elapsed_s": elapsed,
            "load_serialise_send": load_summary,
            "serialisation": serialise_summary,
            "rounds": [asdict(r) for r in loads],
            "serialisation_rounds": [asdict(r) for r in serialised],
        },
        failures=failures,
    )

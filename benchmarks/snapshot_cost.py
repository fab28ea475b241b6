"""Snapshot cost: load + serialise + send of real sessions, and serialisation alone.

**Load + serialise + send**, on SQLite (aiosqlite, a temporary file) and PostgreSQL (asyncpg, a
schema of its own, dropped afterwards), for sessions of 10, 100 and 1,000 interactions (about
240 bytes each): the same two servers as the first-frame part over the chat database
(:mod:`benchmarks._database`). ``bare`` loads by hand with one SQLAlchemy Core ``SELECT`` and
sends the same ``SessionUpdate``; ``wrapped`` is the middleware with the library's
``sqlalchemy_loader`` (ORM). Both send the same bytes. Per connection the client times the
wait for the snapshot once the handshake is done (the middleware and the bare app both
accept before loading), that is load + serialise + send; connections are sequential, in
blocks alternating between the servers. Beside it, each loader alone, called in this process.
Both databases are created once and measured in turn in every round.

**Serialisation alone**, in this process: the snapshot event built from the loader's dict
(``datetime`` values included) with ``SessionUpdate(...).to_json()``, as the middleware does,
against what pydantic offers for the same output: ``pydantic_core.to_json`` on the raw dict,
a ``TypeAdapter`` of a fully typed ``TypedDict``, and a fully typed model validated then
dumped. Every candidate's output is checked to be the same bytes. One round of it follows the
databases in every round.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, ClassVar

import pydantic_core
from pydantic import BaseModel, TypeAdapter
from typing_extensions import TypedDict  # pydantic needs it for TypedDict on Python < 3.12

from asgi_session_sync import SessionContext
from asgi_session_sync.protocol import SessionUpdate

from ._clients import first_frame, rotate, server_pair
from ._database import HandLoader, database, library_loader, open_engine, postgres_url
from ._harness import Part, Report, run_alone
from ._report import Row, compare, figure, percentile, ratio, spread
from ._report import table as format_table
from ._sessions import FILLER, session_id_for

__all__ = ["PART", "SnapshotCostOptions"]

DATABASES = ("sqlite", "postgresql")
SIZES = (10, 100, 1000)
"""Interactions per session, one group of sessions for each."""
VARIANTS = ("bare", "wrapped")


@dataclass(frozen=True)
class SnapshotCostOptions:
    """How much to measure; counts are per variant per round, by session size."""

    QUICK: ClassVar[dict[str, Any]] = {
        "rounds": 1,
        "connections": {10: 20, 100: 10, 1000: 4},
        "block": 2,
        "loads": {10: 5, 100: 3, 1000: 2},
        "serialise_calls": {10: 200, 100: 50, 1000: 10},
    }

    rounds: int = 3
    databases: tuple[str, ...] = DATABASES
    connections: dict[int, int] = field(default_factory=lambda: {10: 200, 100: 100, 1000: 60})
    block: int = 10
    loads: dict[int, int] = field(default_factory=lambda: {10: 40, 100: 20, 1000: 8})
    sessions_per_size: int = 5
    serialise_calls: dict[int, int] = field(default_factory=lambda: {10: 2000, 100: 400, 1000: 50})
    timeout: float = 30.0


async def time_connections(
    url: str, count: int, bound: float
) -> tuple[list[float], list[float], set[str], Counter[str]]:
    """``count`` sequential connections: seconds handshake->snapshot and connect->snapshot.

    Each connection is bounded by ``bound`` seconds; failures are counted by kind.
    """
    waits, totals, frames, errors = [], [], set(), Counter[str]()
    for _ in range(count):
        try:
            result = await first_frame(url, bound=bound)
        except Exception as exc:
            errors[type(exc).__name__] += 1
            continue
        waits.append(result.total - result.opened)
        totals.append(result.total)
        frames.add(result.text)
    return waits, totals, frames, errors


async def run_database_round(
    name: str, url: str, schema: str | None, number: int, options: SnapshotCostOptions
) -> list[Row]:
    """One round on one database: every size over fresh servers, then each loader alone."""
    rows: list[Row] = []
    where = ["--db", url] + (["--schema", schema] if schema else [])
    async with server_pair(VARIANTS, *where) as servers:
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
                errors["wrapped"]["snapshot differs from the hand-built one"] += 1
            loads = await time_loads(url, schema, ids, options.loads[size], number)
            for variant in VARIANTS:
                rows.append(
                    {
                        "kind": "load",
                        "database": name,
                        "size": size,
                        "variant": variant,
                        "round": number,
                        "samples": len(waits[variant]) + sum(errors[variant].values()),
                        "frame_bytes": max((len(f.encode()) for f in frames[variant]), default=0),
                        "errors": sum(errors[variant].values()),
                        "error_kinds": dict(errors[variant]),
                        "p50_ms": percentile(waits[variant], 50) * 1000,
                        "p99_ms": percentile(waits[variant], 99) * 1000,
                        "connect_p50_ms": percentile(totals[variant], 50) * 1000,
                        "load_alone_p50_ms": percentile(loads[variant], 50) * 1000,
                    }
                )
    return rows


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


@asynccontextmanager
async def databases(options: SnapshotCostOptions) -> AsyncIterator[dict[str, tuple[str, Any]]]:
    """Every database, created and seeded here and always dropped: ``{name: (url, schema)}``."""
    sizes = dict.fromkeys(SIZES, options.sessions_per_size)
    async with AsyncExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="snapshot-cost-"))
        made = {}
        for name in options.databases:
            url = (
                f"sqlite+aiosqlite:///{Path(tmp) / 'chat.sqlite3'}"
                if name == "sqlite"
                else postgres_url()
            )
            made[name] = (url, await stack.enter_async_context(database(url, sizes)))
        yield made


async def run_round(
    number: int, options: SnapshotCostOptions, env: dict[str, tuple[str, Any]]
) -> list[Row]:
    """Every database in turn, then one round of serialisation alone."""
    rows: list[Row] = []
    for name, (url, schema) in env.items():
        rows += await run_database_round(name, url, schema, number, options)
    rows += time_serialisers(number, options)
    return rows


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
        # Without the unset reset member, which to_json leaves out: the same bytes.
        text = SessionUpdate(
            session_id=session_id, owner="alice", session=session, version=7
        ).model_dump_json(exclude={"reset"})
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


def time_serialisers(number: int, options: SnapshotCostOptions) -> list[Row]:
    """One round of every serialiser on every size, interleaved in blocks."""
    rows: list[Row] = []
    blocks = 10
    for size in SIZES:
        session_id = session_id_for(size, 0)
        session = loaded_session(session_id, size)
        outputs = {name: serialise(name, session_id, session) for name in SERIALISERS}
        differ = len(set(outputs.values())) != 1
        per_block = max(1, options.serialise_calls[size] // blocks)
        samples: dict[str, list[float]] = {name: [] for name in SERIALISERS}
        for block in range(blocks):
            for name in rotate(SERIALISERS, block + number):
                for _ in range(per_block):
                    started = time.perf_counter_ns()
                    serialise(name, session_id, session)
                    samples[name].append((time.perf_counter_ns() - started) / 1000)
        for name in SERIALISERS:
            rows.append(
                {
                    "kind": "serialise",
                    "serialiser": name,
                    "size": size,
                    "round": number,
                    "samples": len(samples[name]),
                    "errors": int(differ),
                    "frame_bytes": len(outputs[name]),
                    "p50_us": percentile(samples[name], 50),
                    "p99_us": percentile(samples[name], 99),
                }
            )
    return rows


# Summaries and tables.


def summarise_serialisers(rows: list[Row]) -> dict[str, Any]:
    """Per size: each serialiser across rounds, the fastest, and ratios to it per round."""
    summary: dict[str, Any] = {}
    for size in SIZES:
        mine = {
            s: [r for r in rows if r["size"] == size and r["serialiser"] == s] for s in SERIALISERS
        }
        entry: dict[str, Any] = {
            s: {q: spread(r[q] for r in rs) for q in ("p50_us", "p99_us")} for s, rs in mine.items()
        }
        fastest = min(
            (s for s in SERIALISERS if s != LIBRARY), key=lambda s: entry[s]["p50_us"]["median"]
        )
        entry["fastest_alternative"] = fastest
        entry["frame_bytes"] = mine[LIBRARY][0]["frame_bytes"]
        entry["ratio_over_fastest"] = {
            s: {
                q: spread(ratio(a[q], b[q]) for a, b in zip(mine[s], mine[fastest], strict=True))
                for q in ("p50_us", "p99_us")
            }
            for s in SERIALISERS
        }
        summary[str(size)] = entry
    return summary


LOAD_FIGURES = ("p50_ms", "p99_ms", "connect_p50_ms", "load_alone_p50_ms", "frame_bytes")


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
    for label, e in summary.items():
        db, size = label.split("/")
        b, w, r = e["bare"], e["wrapped"], e["ratio"]
        rows.append(
            [
                db,
                size,
                f"{w['frame_bytes']['max'] / 1024:.1f}",
                ms(b["p50_ms"]),
                ms(w["p50_ms"]),
                times(r["p50_ms"]),
                ms(b["p99_ms"]),
                ms(w["p99_ms"]),
                times(r["p99_ms"]),
                ms(b["load_alone_p50_ms"]),
                ms(w["load_alone_p50_ms"]),
                f"{b['errors'] + w['errors']}/{b['samples'] + w['samples']}",
            ]
        )
    return format_table(rows)


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
    return format_table(rows)


def progress(rows: list[Row]) -> str:
    """library/by hand p50 per database and size."""
    loads = {
        (r["database"], r["size"], r["variant"]): r["p50_ms"] for r in rows if r["kind"] == "load"
    }
    return ", ".join(
        f"{db} {size}: {ratio(loads[db, size, 'wrapped'], loads[db, size, 'bare']):.2f}x"
        for db, size, variant in loads
        if variant == "bare"
    )


def report(rows: list[Row], options: SnapshotCostOptions, env: Any) -> Report:
    """The load table (both databases) and the serialisation table."""
    loads = compare(
        [r for r in rows if r["kind"] == "load"],
        LOAD_FIGURES,
        baseline="bare",
        candidate="wrapped",
        by=("database", "size"),
    )
    serialised = summarise_serialisers([r for r in rows if r["kind"] == "serialise"])
    failures = [
        f"snapshot cost {label}: connections failed or the snapshots differ"
        for label, e in loads.items()
        if e["bare"]["errors"] or e["wrapped"]["errors"]
    ] + [
        "serialisation: the candidates' outputs differ"
        for r in rows
        if r["kind"] == "serialise" and r["errors"]
    ][:1]
    counts = ", ".join(f"{options.connections[s]} x {s}" for s in SIZES)
    heading = [
        "3. snapshot cost: load + serialise + send, by hand (bare app, SQLAlchemy Core) vs "
        "the library (middleware + sqlalchemy_loader, ORM)",
        f"sessions of {', '.join(map(str, SIZES))} interactions of ~240 bytes; per variant "
        f"per round: {counts} sequential connections in blocks of {options.block}, "
        f"alternating; {options.rounds} round(s), each over {', '.join(options.databases)}; "
        "times are handshake done -> snapshot received; 'load alone' is each loader called "
        "in the load generator",
    ]
    serialise_heading = (
        "serialisation alone: the snapshot event from the loader's dict to JSON bytes, "
        "one round per round, candidates interleaved; ratios are to the fastest candidate "
        "other than the library's own call"
    )
    return Report(
        heading,
        [format_loads(loads), f"{serialise_heading}\n{format_serialisers(serialised)}"],
        {"load_serialise_send": loads, "serialisation": serialised},
        failures=failures,
    )


PART = Part(
    name="snapshot_cost",
    options=SnapshotCostOptions,
    run_round=run_round,
    progress=progress,
    report=report,
    environment=databases,
)

if __name__ == "__main__":
    sys.exit(run_alone(PART))

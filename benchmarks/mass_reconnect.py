"""Mass reconnect: every client of every session reconnects at once, with and without single-flight.

Each round starts a fresh server (:mod:`benchmarks._server`, ``wrapped``) per variant, in its
own process, whose loader (the hand-written one of :mod:`benchmarks._database`: one ``SELECT``
with a join, SQLAlchemy's asyncio extension over aiosqlite) queries a SQLite file seeded with
``sessions`` chats of ``interactions`` messages, and also sleeps ``db_latency_ms`` while holding
its pooled connection, as a round trip to a remote database would. The load generator then
opens every client at once and measures, per client, the time from starting to connect to
receiving the snapshot. Within a round single-flight is off (the baseline), then on, so both
variants see the same machine state; every figure is reported with its ratio off/on.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import anyio
from websockets.asyncio.client import ClientConnection, connect

from ._clients import Server, server_pair
from ._database import HandLoader, database, open_engine
from ._harness import Part, Report, run_alone
from ._report import Column, Row, Target, compare, comparison_table, figure, percentile
from ._server import server_args
from ._sessions import session_id_for

__all__ = ["PART", "MassReconnectOptions"]

VARIANTS = ("off", "on")  # the baseline first, in every round


@dataclass(frozen=True)
class MassReconnectOptions:
    """The storm, the database behind the loader, and the middleware's bounds."""

    QUICK: ClassVar[dict[str, Any]] = {"clients": 200, "sessions": 20, "rounds": 1}

    rounds: int = 3
    clients: int = 2000
    sessions: int = 200
    interactions: int = 20
    timeout: float = 30.0
    db_latency_ms: float = 5.0
    pool_size: int = 16
    max_concurrent_loads: int = 64


@dataclass
class ClientResult:
    """One client: seconds from starting to connect to the snapshot, or why it failed.

    ``opened`` is the part of ``latency`` spent until the WebSocket handshake completed.
    """

    latency: float | None = None
    opened: float | None = None
    finished_at: float = 0.0
    error: str | None = None


def check_frame(frame: str | bytes, session_id: str) -> str | None:
    """Return why ``frame`` is not this session's snapshot, or ``None`` when it is."""
    try:
        event = json.loads(frame)
    except ValueError:
        return "first frame is not JSON"
    if not isinstance(event, dict) or event.get("type") != "session_update":
        return "first frame is not a session_update"
    if event.get("session_id") != session_id:
        return "snapshot of another session"
    interactions = event.get("session", {}).get("interactions")
    if not interactions:
        return "snapshot without interactions"
    return None


async def reconnect_storm(
    server: Server, ids: Sequence[str], clients: int, bound: float
) -> tuple[list[ClientResult], float]:
    """Connect ``clients`` WebSockets over ``ids`` at once; return each one's result.

    Each client gets ``bound`` seconds to connect and receive its first frame.

    Every client task is created first and waits on one event, so all of them start connecting
    in the same event-loop iteration. Connections stay open until every client has its
    snapshot (or failed), as a real mass reconnect keeps them, then all close. Also returns the
    moment of the release, on the ``time.perf_counter`` clock of ``finished_at``.
    """
    all_waiting = anyio.Event()
    release = anyio.Event()
    all_answered = anyio.Event()
    waiting = [0]
    results: list[ClientResult] = []

    async def client(session_id: str) -> None:
        waiting[0] += 1
        if waiting[0] == clients:
            all_waiting.set()
        await release.wait()
        result = ClientResult()
        ws: ClientConnection | None = None
        started = time.perf_counter()
        try:
            with anyio.fail_after(bound):
                ws = await connect(
                    server.url(session_id),
                    proxy=None,
                    open_timeout=None,  # bounded by fail_after, like the wait for the frame
                    ping_interval=None,
                    close_timeout=bound,
                )
                result.opened = time.perf_counter() - started
                frame = await ws.recv()
            result.finished_at = time.perf_counter()
            result.latency = result.finished_at - started
            result.error = check_frame(frame, session_id)
        except Exception as exc:
            result.finished_at = time.perf_counter()
            result.error = type(exc).__name__
        results.append(result)
        if len(results) == clients:
            all_answered.set()
        if ws is not None:
            try:
                await all_answered.wait()
            finally:
                await ws.close()

    async with anyio.create_task_group() as tg:
        for i in range(clients):
            tg.start_soon(client, ids[i % len(ids)])
        await all_waiting.wait()
        released_at = time.perf_counter()
        release.set()
    return results, released_at


def machine_cpu_seconds() -> float:
    """CPU seconds all processes used since boot, from ``/proc/stat``; ``nan`` elsewhere."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return math.nan
    idle = fields[3] + fields[4]  # idle and iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


@dataclass
class Environment:
    """The seeded SQLite file, and how long one query takes on it alone."""

    url: str
    query_ms: float = math.nan


@asynccontextmanager
async def seeded_database(options: MassReconnectOptions) -> AsyncIterator[Environment]:
    """A SQLite file with the sessions, removed afterwards; its query timed alone."""
    with tempfile.TemporaryDirectory(prefix="mass-reconnect-") as tmp:
        env = Environment(f"sqlite+aiosqlite:///{Path(tmp) / 'sessions.sqlite3'}")
        async with database(env.url, {options.interactions: options.sessions}):
            env.query_ms = await time_query(env.url, session_id_for(options.interactions, 0))
            print(f"  one query alone: {env.query_ms:.2f} ms", file=sys.stderr, flush=True)
            yield env


async def time_query(url: str, session_id: str, repeats: int = 200) -> float:
    """Mean milliseconds of one load with no simulated latency, measured sequentially."""
    engine = open_engine(url, pool_size=1)
    try:
        loader = HandLoader(engine)
        await loader.load(session_id)  # compile the statement and open the connection once
        started = time.perf_counter()
        for _ in range(repeats):
            await loader.load(session_id)
        return (time.perf_counter() - started) / repeats * 1000
    finally:
        await engine.dispose()


async def run_round(number: int, options: MassReconnectOptions, env: Environment) -> list[Row]:
    """Both variants in turn, off then on, each against a fresh server."""
    ids = [session_id_for(options.interactions, n) for n in range(options.sessions)]
    rows = []
    for variant in VARIANTS:
        args = server_args(
            "wrapped",
            "--db",
            env.url,
            "--loader",
            "hand",
            "--single-flight",
            variant,
            "--db-latency-ms",
            str(options.db_latency_ms),
            "--pool-size",
            str(options.pool_size),
            "--max-concurrent-loads",
            str(options.max_concurrent_loads),
        )
        async with server_pair({variant: args}) as servers:
            server = servers[variant]
            before = await server.control.stats()
            machine_started = machine_cpu_seconds()
            cpu_started = time.process_time()
            results, released_at = await reconnect_storm(
                server, ids, options.clients, options.timeout
            )
            client_cpu = time.process_time() - cpu_started
            after = await server.control.stats()
            machine_cpu = machine_cpu_seconds() - machine_started
        rows.append(summarise_storm(variant, number, results, released_at, before, after))
        rows[-1]["client_cpu_s"] = client_cpu
        # Other work on the machine skews a round: keep a trace of how much there was.
        rows[-1]["other_cpu_s"] = max(0.0, machine_cpu - client_cpu - rows[-1]["server_cpu_s"])
        rows[-1]["calls_per_session"] = rows[-1]["loader_calls"] / options.sessions
    return rows


def summarise_storm(
    variant: str,
    number: int,
    results: list[ClientResult],
    released_at: float,
    before: dict[str, Any],
    after: dict[str, Any],
) -> Row:
    """One variant's row: what the clients saw, and what the server counted."""
    counters = after["middleware"]
    answered = [
        (r.latency, r.opened)
        for r in results
        if r.error is None and r.latency is not None and r.opened is not None
    ]
    latencies = [latency for latency, _ in answered]
    opened = [opened for _, opened in answered]
    waits = [latency - opened for latency, opened in answered]
    kinds = Counter(r.error for r in results if r.error is not None)
    return {
        "variant": variant,
        "round": number,
        "samples": len(results),
        "errors": sum(kinds.values()),
        "error_kinds": dict(kinds),
        "p50_ms": percentile(latencies, 50) * 1000,
        "open_p50_ms": percentile(opened, 50) * 1000,
        "open_to_snapshot_p50_ms": percentile(waits, 50) * 1000,
        "p90_ms": percentile(latencies, 90) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "max_ms": max(latencies, default=math.nan) * 1000,
        "all_current_ms": (max(r.finished_at for r in results) - released_at) * 1000,
        "loader_calls": int(counters["loads"]),
        "loader_calls_counted_by_loader": int(after["loader_calls"]),
        "mean_load_ms": counters["load_seconds_total"] / max(1, counters["loads"]) * 1000,
        "server_cpu_s": after["cpu_seconds"] - before["cpu_seconds"],
        "server_timeouts": counters["timeouts"],
        "server_errors": counters["errors"],
        "middleware": counters,
    }


def progress(rows: list[Row]) -> str:
    """Loader calls, p50 and p99 of both variants."""
    return "; ".join(
        f"single-flight {r['variant']}: loader calls {r['loader_calls']}, p50 {r['p50_ms']:.0f} "
        f"ms, p99 {r['p99_ms']:.0f} ms, errors {r['errors']}"
        for r in rows
    )


WHOLE, TENTHS, HUNDREDTHS = figure(".0f"), figure(".1f"), figure(".2f")
SEEN = [
    Column("loader calls", "loader_calls", WHOLE),
    Column("calls/session", "calls_per_session", lambda s: f"{s['median']:.2f}"),
    Column("p50 ms", "p50_ms", WHOLE),
    Column("p99 ms", "p99_ms", WHOLE),
    Column("all current ms", "all_current_ms", WHOLE),
]
COST = [
    Column("p50 open ms", "open_p50_ms", WHOLE),
    Column("p50 open->snapshot ms", "open_to_snapshot_p50_ms", WHOLE),
    Column("loader call ms (mean)", "mean_load_ms", TENTHS),
    Column("server CPU s", "server_cpu_s", HUNDREDTHS),
    Column("client CPU s", "client_cpu_s", HUNDREDTHS),
    Column("other CPU s", "other_cpu_s", HUNDREDTHS),
]


def report(rows: list[Row], options: MassReconnectOptions, env: Environment) -> Report:
    """What the clients saw, where the time went, and the single-flight target."""
    figures = [c.figure for c in SEEN + COST] + ["p90_ms", "max_ms"]
    summary = compare(rows, figures, baseline="on", candidate="off")["all"]
    sides = {v: f"single-flight {v}" for v in VARIANTS}
    tables = [
        "what the clients saw (connect -> snapshot)\n"
        + comparison_table({"all": summary}, SEEN, sides=sides, ratio_label="off / on"),
        "where the time went, and what it cost\n"
        + comparison_table(
            {"all": summary}, COST, sides=sides, ratio_label="off / on", errors=False
        ),
    ]
    notes = [
        f"round {r['round']} single-flight {r['variant']}: the middleware counted "
        f"{r['loader_calls']} loads, the loader {r['loader_calls_counted_by_loader']}"
        for r in rows
        if r["loader_calls"] != r["loader_calls_counted_by_loader"]
    ] + [
        f"round {r['round']} single-flight {r['variant']}: the server counted "
        f"{r['server_timeouts']} timeout(s) and {r['server_errors']} loader error(s)"
        for r in rows
        if r["server_timeouts"] or r["server_errors"]
    ]
    if notes:
        tables.append("\n".join(notes))
    failures = [
        f"mass reconnect single-flight {v}: {summary[v]['errors']} client error(s)"
        for v in VARIANTS
        if summary[v]["errors"]
    ]
    heading = [
        f"5. mass reconnect: {options.clients} WebSocket clients over {options.sessions} "
        f"sessions ({options.clients / options.sessions:g} each), all at once; "
        f"{options.rounds} round(s), each single-flight off then on, fresh servers",
        "server: uvicorn (one worker, websockets-sansio), own process; clients: websockets, "
        "this process; loopback",
        f"loader: one SELECT with a join on SQLite (SQLAlchemy async + aiosqlite, "
        f"{options.interactions} interactions per session): {env.query_ms:.2f} ms measured "
        f"alone, + {options.db_latency_ms:g} ms simulated remote-DB round trip (anyio.sleep "
        f"holding the pooled connection); pool {options.pool_size}, "
        f"max_concurrent_loads {options.max_concurrent_loads}",
    ]
    target = Target(
        "5. mass reconnect: loader calls per session with single-flight",
        "== 1.00",
        summary["on"]["calls_per_session"],
        summary["on"]["calls_per_session"]["max"] == 1.0,
    )
    return Report(heading, tables, summary, [target], failures)


PART = Part(
    name="mass_reconnect",
    options=MassReconnectOptions,
    run_round=run_round,
    progress=progress,
    report=report,
    environment=seeded_database,
)

if __name__ == "__main__":
    sys.exit(run_alone(PART))

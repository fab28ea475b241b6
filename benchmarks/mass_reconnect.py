"""Mass reconnect (issue 20 point 4): every client of every session reconnects at once.

``clients`` WebSockets over ``sessions`` sessions against one uvicorn worker whose loader reads
SQLite with a simulated round trip: an app loading by hand for every connection, then the same
wrapped. **The knee**: wrapped storms of ``knee`` sizes until one takes longer than
``all_current_bound``, and what bounded it: the server's CPU, the kernel's listen queue, the loads.
"""

from __future__ import annotations

import math
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

from ._clients import rotate, running_servers, storm
from ._database import sqlite_file
from ._harness import Part, Report, declared, run_alone
from ._report import Column, Goal, Row, Table, percentile
from ._server import server_args
from ._sessions import session_id_for

SIDES = {"by_hand": "loads by hand", "wrapped": "wrapped"}
PER_SESSION = 10  # clients per session in the knee's storms
QUERY_MS = 0.5  # one query alone on SQLite, without the simulated round trip (measured)


@dataclass(frozen=True)
class MassReconnectOptions:
    """The storm, the loader's database and bounds, the knee's sizes."""

    QUICK: ClassVar[dict[str, Any]] = {
        "rounds": 1,
        "clients": 300,
        "sessions": 30,
        "knee": (200, 400),
    }

    rounds: int = 3
    clients: int = 10_000
    sessions: int = 1_000
    db_latency_ms: float = 5.0
    pool_size: int = 16
    max_concurrent_loads: int = 64
    workers: int = 2
    knee: tuple[int, ...] = (2_500, 5_000, 7_500, 12_500, 15_000, 17_500)
    all_current_bound: float = 5.0
    timeout: float = 60.0


@asynccontextmanager
async def environment(options: MassReconnectOptions) -> AsyncIterator[str]:
    """A SQLite file with sessions of 20 interactions, enough for the largest storm."""
    async with sqlite_file(
        {20: max([options.sessions, *(n // PER_SESSION for n in options.knee)])}
    ) as url:
        yield url


async def one_storm(
    variant: str, clients: int, sessions: int, options: MassReconnectOptions, url: str
) -> Row:
    """``clients`` over ``sessions`` against a fresh server of ``variant``: its figures."""
    ids = [session_id_for(20, n % sessions) for n in range(clients)]
    args = [
        "--db",
        url,
        "--db-latency-ms",
        str(options.db_latency_ms),
        "--pool-size",
        str(options.pool_size),
        "--max-concurrent-loads",
        str(options.max_concurrent_loads),
    ]
    async with running_servers({variant: server_args(variant, *args)}) as servers:
        server = servers[variant]
        calls = (await server.control.ask("stats"))["loader_calls"]
        got = await storm(
            server.url(""),
            ids,
            server=server.process.pid,
            workers=options.workers,
            bound=options.timeout,
        )
        calls = (await server.control.ask("stats"))["loader_calls"] - calls
    wall = max(c[3] for c in got.clients) - got.released_at
    failed = Counter(c[4] for c in got.clients if c[4] is not None)
    done = [c[2] for c in got.clients if c[4] is None]
    connected = max((c[3] - c[2] + c[0] for c in got.clients if c[2] is not None), default=math.nan)
    return {
        "variant": variant,
        "clients": clients,
        "samples": clients,
        "error_kinds": dict(failed),
        "failed": sum(n for kind, n in failed.items() if "snapshot" not in kind),
        "not_current": failed.total(),
        "errors": failed.total(),
        "loader_calls": calls,
        "calls_per_session": calls / sessions,
        "p50_ms": percentile(done, 50) * 1e3,
        "p99_ms": percentile(done, 99) * 1e3,
        "all_current_ms": wall * 1e3,
        "connected_ms": (connected - got.released_at) * 1e3,
        "listen_drops": got.listen_drops,
        "loads_floor_ms": calls * (options.db_latency_ms + QUERY_MS) / options.pool_size,
        "server_cpu_s": got.server_cpu,
        "client_cpu_s": got.client_cpu,
        "other_cpu_s": got.machine_cpu - got.server_cpu - got.client_cpu,
        "server_busy": got.server_cpu / wall,
        "machine_busy": got.machine_cpu / wall / (os.cpu_count() or 1),
    }


async def run_round(number: int, options: MassReconnectOptions, url: str) -> list[Row]:
    """Both apps in turn; in the first round, then the knee's storms until one is too slow."""
    rows = []
    for variant in rotate(list(SIDES), number):
        rows.append(await one_storm(variant, options.clients, options.sessions, options, url))
    for size in options.knee if number == 1 else ():
        rows.append(
            await one_storm("wrapped", size, size // PER_SESSION, options, url) | {"storm": "knee"}
        )
        print(f"  knee {size}: {rows[-1]['all_current_ms']:,.0f} ms", file=sys.stderr)
        if rows[-1]["all_current_ms"] > options.all_current_bound * 1e3:
            break
    return [{"storm": "main", "round": number} | row for row in rows]


def knee(rows: list[Row], options: MassReconnectOptions) -> list[str]:
    """The largest storm all current within the bound, the first beyond it, and its bound."""
    storms = sorted((r for r in rows if r["variant"] == "wrapped"), key=lambda r: r["clients"])
    bound = options.all_current_bound * 1e3
    within = [r for r in storms if r["all_current_ms"] <= bound and not r["not_current"]]
    line = f"knee: the largest storm all current within {options.all_current_bound:g} s: "
    line += (
        f"{within[-1]['clients']:,} clients ({within[-1]['all_current_ms']:,.0f} ms)"
        if within
        else "none"
    )
    lines = [line]
    for r in [r for r in storms if r["all_current_ms"] > bound][:1]:
        floors = {
            "the server's CPU (one core)": r["server_cpu_s"] * 1e3,
            "the loads": r["loads_floor_ms"],
            "the listen queue (drops retried after 1 s)": r["connected_ms"],
        }
        lines.append(
            f"the first beyond: {r['clients']:,} clients in {r['all_current_ms']:,.0f} ms; "
            + ", ".join(f"{k} {v:,.0f} ms" for k, v in floors.items())
            + f"; both cores {r['machine_busy']:.0%} busy: bound by "
            + max(floors, key=floors.__getitem__)
        )
    return lines


def report(rows: list[Row], options: MassReconnectOptions, env: Any) -> Report:
    """The storm beside the by-hand app, what it cost, its targets, and the knee."""
    seen = [
        Column("loader calls", "loader_calls"),
        Column("calls/session", "calls_per_session", ".2f"),
        Column("failed", "failed"),
        Column("not current", "not_current"),
        Column("p50 ms", "p50_ms"),
        Column("p99 ms", "p99_ms"),
        Column("all current ms", "all_current_ms"),
    ]
    cost = [
        Column("last TCP connect ms", "connected_ms"),
        Column("listen queue drops", "listen_drops"),
        Column("loads floor ms", "loads_floor_ms"),
        Column("server CPU s", "server_cpu_s", ".2f"),
        Column("server busy", "server_busy", ".0%"),
        Column("clients' CPU s", "client_cpu_s", ".2f"),
        Column("other CPU s", "other_cpu_s", ".2f"),
        Column("both cores busy", "machine_busy", ".0%"),
    ]
    main, pair = {"storm": "main"}, [("wrapped", "by_hand")]
    tables = [
        Table(
            "storm",
            seen,
            SIDES,
            pair,
            where=main,
            title=f"{options.clients:,} over {options.sessions:,}",
        ),
        Table("cost", cost, SIDES, pair, where=main, title="where the time went"),
        Table(
            "knee",
            [*seen[4:], *cost[:5], cost[-1]],
            {"wrapped": "wrapped"},
            by=("clients",),
            where={"storm": "knee"},
            title=f"the knee: wrapped, {PER_SESSION} clients per session",
        ),
    ]
    what = f"20.4 mass reconnect {options.clients:,} over {options.sessions:,}, wrapped"
    goals = [
        Goal(
            f"{what}: loader calls per session",
            "storm",
            "calls_per_session",
            ("wrapped",),
            1,
            worst=True,
        ),
        Goal(f"{what}: clients failed", "storm", "failed", ("wrapped",), 0, worst=True),
        Goal(f"{what}: clients not current", "storm", "not_current", ("wrapped",), 0, worst=True),
    ]
    heading = [
        f"20.4 mass reconnect: {options.clients:,} WebSockets over {options.sessions:,} sessions "
        "at once against one uvicorn worker: an app loading by hand, and the same wrapped",
        f"loader: a SELECT with a join on SQLite + {options.db_latency_ms:g} ms round trip (pool "
        f"{options.pool_size}); wrapped: max_concurrent_loads {options.max_concurrent_loads}; "
        f"clients: websockets' sans-I/O protocol in {options.workers} processes",
    ]
    return declared(rows, heading=heading, tables=tables, goals=goals, notes=knee(rows, options))


PART = Part("mass_reconnect", MassReconnectOptions, run_round, report, environment=environment)

if __name__ == "__main__":
    sys.exit(run_alone(PART))

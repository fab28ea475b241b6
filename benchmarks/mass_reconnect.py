"""Mass reconnect: every client of every session reconnects at once, with and without single-flight.

One command runs the whole benchmark and prints the table::

    python -m benchmarks.mass_reconnect            # 2,000 clients over 200 sessions, 3 rounds
    python -m benchmarks.mass_reconnect --quick    # a smoke run: 200 clients, 20 sessions, 1 round

Each round starts a fresh uvicorn server in its own process (``serve`` below) on a free
loopback port, wrapped in ``SessionSyncMiddleware`` whose loader queries a SQLite file through
SQLAlchemy's asyncio extension. This process, the load generator, then opens every client at
once and measures, per client, the time from starting to connect to receiving the snapshot.
Rounds alternate single-flight off (the baseline) and on, so both variants see the same machine
state; every figure is reported with its ratio to the baseline. Results are also written as
JSON to ``benchmarks/results/mass_reconnect.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
from websockets.asyncio.client import ClientConnection, connect

from ._report import (
    PartResult,
    Spread,
    Target,
    figure,
    machine_info,
    machine_line,
    percentile,
    ratio,
    spread,
    table,
)
from ._server import (
    ServerOptions,
    seed_database,
    serve,
    session_ids,
    time_query,
)
from ._serving import raise_open_files_limit, running_server

RESULTS = Path(__file__).resolve().parent / "results" / "mass_reconnect.json"

VARIANTS = ("off", "on")  # the baseline first, in every round


@dataclass
class ClientResult:
    """One client: seconds from starting to connect to the snapshot, or why it failed.

    ``opened`` is the part of ``latency`` spent until the WebSocket handshake completed.
    """

    latency: float | None = None
    opened: float | None = None
    finished_at: float = 0.0
    error: str | None = None


@dataclass
class RoundResult:
    """One round of one variant: what the clients saw and what the server counted."""

    variant: str
    round: int
    clients: int
    errors: int
    error_kinds: dict[str, int]
    p50_ms: float
    open_p50_ms: float
    open_to_snapshot_p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    all_current_ms: float
    loader_calls: int
    loader_calls_counted_by_loader: int
    mean_load_ms: float
    server_cpu_s: float
    client_cpu_s: float
    other_cpu_s: float
    server: dict[str, Any] = field(repr=False)


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
    url: str, ids: Sequence[str], clients: int, bound: float
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
                    f"{url}/ws/sessions/{session_id}",
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


def get_json(url: str) -> dict[str, Any]:
    """GET ``url`` and decode its JSON body, ignoring any proxy set in the environment."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as response:
        payload: dict[str, Any] = json.load(response)
        return payload


def server_command(options: ServerOptions) -> list[str]:
    """The module and arguments that run ``serve`` with ``options`` in a child process."""
    return [
        "benchmarks.mass_reconnect",
        "serve",
        "--db",
        options.db,
        "--single-flight",
        "on" if options.single_flight else "off",
        "--db-latency-ms",
        str(options.latency * 1000),
        "--pool-size",
        str(options.pool_size),
        "--max-concurrent-loads",
        str(options.max_concurrent_loads),
        "--watch-stdin",
    ]


def machine_cpu_seconds() -> float:
    """CPU seconds all processes used since boot, from ``/proc/stat``; ``nan`` elsewhere."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return math.nan
    idle = fields[3] + fields[4]  # idle and iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


async def run_round(
    options: ServerOptions, variant: str, number: int, ids: Sequence[str], args: argparse.Namespace
) -> RoundResult:
    """Run one reconnect storm against a fresh server and summarise it."""
    async with running_server(server_command(options)) as server_process:
        port = server_process.port
        machine_started = machine_cpu_seconds()
        cpu_started = time.process_time()
        results, released_at = await reconnect_storm(
            f"ws://127.0.0.1:{port}", ids, args.clients, args.timeout
        )
        client_cpu = time.process_time() - cpu_started
        server = await anyio.to_thread.run_sync(get_json, f"http://127.0.0.1:{port}/stats")
        machine_cpu = machine_cpu_seconds() - machine_started
    counters = server["middleware"]
    answered = [
        (r.latency, r.opened)
        for r in results
        if r.error is None and r.latency is not None and r.opened is not None
    ]
    latencies = [latency for latency, _ in answered]
    opened = [opened for _, opened in answered]
    waits = [latency - opened for latency, opened in answered]
    kinds = Counter(r.error for r in results if r.error is not None)
    return RoundResult(
        variant=variant,
        round=number,
        clients=len(results),
        errors=sum(kinds.values()),
        error_kinds=dict(kinds),
        p50_ms=percentile(latencies, 50) * 1000,
        open_p50_ms=percentile(opened, 50) * 1000,
        open_to_snapshot_p50_ms=percentile(waits, 50) * 1000,
        p90_ms=percentile(latencies, 90) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        max_ms=max(latencies, default=math.nan) * 1000,
        all_current_ms=(max(r.finished_at for r in results) - released_at) * 1000,
        loader_calls=int(counters["loads"]),
        loader_calls_counted_by_loader=int(server["loader_calls"]),
        mean_load_ms=counters["load_seconds_total"] / max(1, counters["loads"]) * 1000,
        server_cpu_s=float(server["cpu_seconds"]),
        client_cpu_s=client_cpu,
        # Other work on the machine skews a round: keep a trace of how much there was.
        other_cpu_s=max(0.0, machine_cpu - client_cpu - float(server["cpu_seconds"])),
        server=server,
    )


async def run_benchmark(args: argparse.Namespace, db: str) -> list[RoundResult]:
    """Every round of both variants, interleaved: off, on, off, on, ..."""
    ids = session_ids(args.sessions)
    rounds: list[RoundResult] = []
    for number in range(1, args.rounds + 1):
        for variant in VARIANTS:
            options = ServerOptions(
                db=db,
                single_flight=variant == "on",
                latency=args.db_latency_ms / 1000,
                pool_size=args.pool_size,
                max_concurrent_loads=args.max_concurrent_loads,
            )
            result = await run_round(options, variant, number, ids, args)
            rounds.append(result)
            print(
                f"  round {number} single-flight {variant:>3}: loader calls {result.loader_calls}"
                f", p50 {result.p50_ms:.0f} ms, p99 {result.p99_ms:.0f} ms"
                f", errors {result.errors}",
                file=sys.stderr,
                flush=True,
            )
    return rounds


def summarise(rounds: Sequence[RoundResult], sessions: int) -> dict[str, Any]:
    """Per-variant figures across rounds, and the per-round ratios off/on."""
    summary: dict[str, Any] = {}
    for variant in VARIANTS:
        mine = [r for r in rounds if r.variant == variant]
        summary[variant] = {
            "loader_calls": spread([r.loader_calls for r in mine]),
            "calls_per_session": spread([r.loader_calls / sessions for r in mine]),
            "p50_ms": spread([r.p50_ms for r in mine]),
            "p99_ms": spread([r.p99_ms for r in mine]),
            "open_p50_ms": spread([r.open_p50_ms for r in mine]),
            "open_to_snapshot_p50_ms": spread([r.open_to_snapshot_p50_ms for r in mine]),
            "all_current_ms": spread([r.all_current_ms for r in mine]),
            "mean_load_ms": spread([r.mean_load_ms for r in mine]),
            "server_cpu_s": spread([r.server_cpu_s for r in mine]),
            "client_cpu_s": spread([r.client_cpu_s for r in mine]),
            "other_cpu_s": spread([r.other_cpu_s for r in mine]),
            "errors": sum(r.errors for r in mine),
            "attempts": sum(r.clients for r in mine),
            "server_timeouts": sum(r.server["middleware"]["timeouts"] for r in mine),
            "server_errors": sum(r.server["middleware"]["errors"] for r in mine),
        }
    pairs = list(
        zip(
            [r for r in rounds if r.variant == "off"],
            [r for r in rounds if r.variant == "on"],
            strict=True,
        )
    )
    summary["ratio_off_over_on"] = {
        name: spread([ratio(getattr(off, name), getattr(on, name)) for off, on in pairs])
        for name in (
            "loader_calls",
            "p50_ms",
            "p99_ms",
            "open_p50_ms",
            "open_to_snapshot_p50_ms",
            "all_current_ms",
            "mean_load_ms",
            "server_cpu_s",
            "client_cpu_s",
        )
    }
    return summary


def format_tables(summary: dict[str, Any]) -> str:
    """Two tables, medians with the min-max spread across rounds, each with its off/on row.

    The first is what clients saw; the second is where their time went and what it cost the
    server (and the load generator, whose CPU bounds how fast the clients themselves can go).
    """
    whole, tenths, hundredths = figure(".0f"), figure(".1f"), figure(".2f")
    latency = [
        ("loader calls", "loader_calls", whole),
        ("calls/session", "calls_per_session", lambda s: f"{s['median']:.2f}"),
        ("p50 ms", "p50_ms", whole),
        ("p99 ms", "p99_ms", whole),
        ("all current ms", "all_current_ms", whole),
    ]
    cost = [
        ("p50 open ms", "open_p50_ms", whole),
        ("p50 open->snapshot ms", "open_to_snapshot_p50_ms", whole),
        ("loader call ms (mean)", "mean_load_ms", tenths),
        ("server CPU s", "server_cpu_s", hundredths),
        ("client CPU s", "client_cpu_s", hundredths),
        ("other CPU s", "other_cpu_s", hundredths),
    ]
    errors = {v: f"{summary[v]['errors']}/{summary[v]['attempts']}" for v in VARIANTS}
    return "\n\n".join(
        [
            "what the clients saw (connect -> snapshot)\n"
            + render(summary, latency, ("errors", errors)),
            "where the time went, and what it cost\n" + render(summary, cost, None),
        ]
    )


def render(
    summary: dict[str, Any],
    columns: Sequence[tuple[str, str, Callable[[Spread], str]]],
    extra: tuple[str, dict[str, str]] | None,
) -> str:
    """One table: a row per variant, then the off/on ratios of every column."""
    ratios = summary["ratio_off_over_on"]
    header = ["variant", *(title for title, _, _ in columns)]
    rows = [header]
    for variant in VARIANTS:
        rows.append(
            [f"single-flight {variant}", *(fmt(summary[variant][key]) for _, key, fmt in columns)]
        )
    times = figure(".2f", "x")
    rows.append(
        ["off / on", *(times(ratios[key]) if key in ratios else "" for _, key, _ in columns)]
    )
    if extra is not None:
        title, cells = extra
        header.append(title)
        for row, variant in zip(rows[1:], VARIANTS, strict=False):
            row.append(cells[variant])
        rows[-1].append("")
    return table(rows)


def describe(args: argparse.Namespace, query_ms: float, machine: dict[str, Any]) -> str:
    """The lines above the table: what was measured, and how."""
    per_session = args.clients / args.sessions
    packages = machine["packages"]
    return "\n".join(
        [
            f"mass reconnect: {args.clients} WebSocket clients over {args.sessions} sessions "
            f"({per_session:g} each), all at once; {args.rounds} round(s) per variant, "
            "interleaved off/on",
            f"server: uvicorn {packages['uvicorn']} (one worker, websockets-sansio), own process;"
            f" clients: websockets {packages['websockets']}, this process; loopback",
            f"loader: one SELECT with a join on SQLite (SQLAlchemy async + aiosqlite, "
            f"{args.interactions} interactions per session): {query_ms:.2f} ms measured alone, "
            f"+ {args.db_latency_ms:g} ms simulated remote-DB round trip (anyio.sleep holding "
            f"the pooled connection); pool {args.pool_size}, "
            f"max_concurrent_loads {args.max_concurrent_loads}",
            machine_line(machine),
            "figures: median (min-max) across rounds; ratios are off/on per round",
        ]
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line: the benchmark by default, ``serve`` for the server process."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.mass_reconnect",
        description="Mass-reconnect benchmark of SessionSyncMiddleware, single-flight off vs on.",
    )
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per variant")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 200 clients, 20 sessions, 1 round"
    )
    parser.add_argument("--interactions", type=int, default=20, help="interactions per session")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-client bound, seconds")
    parser.add_argument("--json", type=Path, default=RESULTS, help="where to write the results")
    add_server_arguments(parser)
    subcommands = parser.add_subparsers(dest="command")
    serve_parser = subcommands.add_parser("serve", help="run one benchmark server (internal)")
    serve_parser.add_argument("--db", required=True)
    serve_parser.add_argument("--single-flight", choices=("on", "off"), required=True)
    serve_parser.add_argument("--port", type=int, default=0)
    serve_parser.add_argument(
        "--watch-stdin", action="store_true", help="stop when stdin closes (the parent is gone)"
    )
    add_server_arguments(serve_parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.sessions, args.rounds = 200, 20, 1
    if args.clients < 1 or args.sessions < 1 or args.rounds < 1:
        parser.error("--clients, --sessions and --rounds must be at least 1")
    return args


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Options both the benchmark and ``serve`` take: the loader's cost and bounds."""
    parser.add_argument(
        "--db-latency-ms",
        type=float,
        default=5.0,
        help="simulated remote-DB round trip per query (default 5)",
    )
    parser.add_argument("--pool-size", type=int, default=16, help="SQLAlchemy pool size")
    parser.add_argument("--max-concurrent-loads", type=int, default=64)


def measure(args: argparse.Namespace, machine: dict[str, Any]) -> PartResult:
    """Run every round on a freshly seeded database; return the tables and every figure.

    Progress goes to stderr as the rounds run. Raises ``KeyboardInterrupt`` (SIGTERM too, from
    ``main``) after stopping the servers and removing the database.
    """
    with tempfile.TemporaryDirectory(prefix="mass-reconnect-") as tmp:
        db = str(Path(tmp) / "sessions.sqlite3")
        seed_database(db, sessions_count=args.sessions, interactions_per_session=args.interactions)
        query_ms = time_query(db, session_ids(1)[0], repeats=200) * 1000
        header = describe(args, query_ms, machine)
        print(header, file=sys.stderr, flush=True)
        started = time.perf_counter()
        rounds = anyio.run(run_benchmark, args, db)
        elapsed = time.perf_counter() - started
    summary = summarise(rounds, args.sessions)
    failures = sum(summary[v]["errors"] for v in VARIANTS)
    notes = [f"run took {elapsed:.0f} s; {failures} client error(s) in all"]
    problems = [f"{failures} client error(s)"] if failures else []
    for r in rounds:
        if r.loader_calls != r.loader_calls_counted_by_loader:
            notes.append(
                f"round {r.round} single-flight {r.variant}: the middleware counted "
                f"{r.loader_calls} loads, the loader {r.loader_calls_counted_by_loader}"
            )
    for variant in VARIANTS:
        s = summary[variant]
        if s["server_timeouts"] or s["server_errors"]:
            notes.append(
                f"single-flight {variant}: server counted {s['server_timeouts']} timeout(s) and "
                f"{s['server_errors']} loader error(s)"
            )
    report = {
        "benchmark": "mass_reconnect",
        "config": {
            "clients": args.clients,
            "sessions": args.sessions,
            "rounds": args.rounds,
            "interactions_per_session": args.interactions,
            "db_latency_ms": args.db_latency_ms,
            "query_ms_measured_alone": query_ms,
            "pool_size": args.pool_size,
            "max_concurrent_loads": args.max_concurrent_loads,
            "client_timeout_s": args.timeout,
        },
        "machine": machine,
        "elapsed_s": elapsed,
        "summary": summary,
        "rounds": [asdict(r) for r in rounds],
    }
    return PartResult(
        name="mass_reconnect",
        text="\n\n".join([header, format_tables(summary), "\n".join(notes)]),
        data=report,
        failures=problems,
        targets=[
            Target(
                "5. mass reconnect: loader calls per session with single-flight",
                "== 1.00",
                summary["on"]["calls_per_session"],
                summary["on"]["calls_per_session"]["max"] == 1.0,
            )
        ],
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or, with ``serve``, one server); return the exit status."""
    args = parse_args(argv)
    raise_open_files_limit()
    if args.command == "serve":
        options = ServerOptions(
            db=args.db,
            single_flight=args.single_flight == "on",
            latency=args.db_latency_ms / 1000,
            pool_size=args.pool_size,
            max_concurrent_loads=args.max_concurrent_loads,
            port=args.port,
            watch_stdin=args.watch_stdin,
        )
        anyio.run(serve, options)
        return 0

    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop the servers and remove the database.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        result = measure(args, machine_info())
    except KeyboardInterrupt:
        print("interrupted: servers stopped, nothing written", file=sys.stderr)
        return 130
    print(result.text)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result.data, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 1 if result.failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Memory per idle connection: the server's RSS growth for 1,000 open connections, wrapped vs bare.

The same servers as the first-frame benchmark (:mod:`benchmarks._overhead_server`), fresh ones
every round. For each variant in turn (the first one changes every round): 100 connections are
opened and closed to warm the server up, ``VmRSS`` is read from ``/proc/<pid>/status``, then
1,000 connections are opened (50 at a time) and each receives its snapshot, and after a second
of quiet ``VmRSS`` is read again. The figure is the difference divided by the connections. The
connections are idle: after the snapshot, nothing is sent either way until they close.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import anyio
from websockets.asyncio.client import ClientConnection

from ._clients import Server, open_client, rotate, server_pair
from ._overhead_server import VARIANTS, memory_sessions, snapshot_text
from ._report import PartResult, figure, machine_line, ratio, spread, table
from ._serving import raise_open_files_limit

__all__ = ["IdleMemoryOptions", "measure"]


@dataclass(frozen=True)
class IdleMemoryOptions:
    """How many connections, how many rounds."""

    rounds: int = 3
    connections: int = 1000
    warmup: int = 100
    concurrency: int = 50
    settle_seconds: float = 1.0
    timeout: float = 30.0


@dataclass
class VariantRound:
    """One variant in one round: RSS before and after opening the connections."""

    variant: str
    round: int
    connections: int
    rss_before_mb: float
    rss_after_mb: float
    kb_per_connection: float


async def open_many(
    server: Server, count: int, expected: dict[str, str], options: IdleMemoryOptions
) -> list[ClientConnection]:
    """Open ``count`` connections, ``concurrency`` at a time; check each one's snapshot."""
    ids = list(expected)
    opened: list[ClientConnection] = []
    limit = anyio.Semaphore(options.concurrency)

    async def one(i: int) -> None:
        sid = ids[i % len(ids)]
        async with limit:
            ws = await open_client(server.url(sid), bound=options.timeout)
            opened.append(ws)
            if await ws.recv() != expected[sid]:
                raise AssertionError(f"the first frame of {sid} is not its snapshot")

    try:
        with anyio.fail_after(options.timeout):
            async with anyio.create_task_group() as tg:
                for i in range(count):
                    tg.start_soon(one, i)
    except BaseException:
        await close_all(opened)
        raise
    return opened


async def close_all(connections: list[ClientConnection]) -> None:
    """Close every connection, at once."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(30):
        async with anyio.create_task_group() as tg:
            for ws in connections:
                tg.start_soon(ws.close)


async def run_round(number: int, options: IdleMemoryOptions) -> list[VariantRound]:
    """One round on fresh servers: each variant warmed up, then its 1,000 connections."""
    sessions = memory_sessions(200, 20)
    expected = {sid: snapshot_text(sid, snapshot) for sid, snapshot in sessions.items()}
    results = []
    async with server_pair() as servers:
        for variant in rotate(VARIANTS, number):
            server = servers[variant]
            await close_all(await open_many(server, options.warmup, expected, options))
            await anyio.sleep(options.settle_seconds)
            before = server.process.rss_bytes()
            connections = await open_many(server, options.connections, expected, options)
            try:
                await anyio.sleep(options.settle_seconds)
                after = server.process.rss_bytes()
            finally:
                await close_all(connections)
            results.append(
                VariantRound(
                    variant=variant,
                    round=number,
                    connections=len(connections),
                    rss_before_mb=before / 2**20,
                    rss_after_mb=after / 2**20,
                    kb_per_connection=(after - before) / len(connections) / 1024,
                )
            )
    return sorted(results, key=lambda r: VARIANTS.index(r.variant))


FIGURES = ("rss_before_mb", "rss_after_mb", "kb_per_connection")


def summarise(rounds: list[VariantRound]) -> dict[str, Any]:
    """Per variant, each figure across rounds; per round, wrapped/bare and wrapped-bare."""
    mine = {v: [r for r in rounds if r.variant == v] for v in VARIANTS}
    pairs = list(zip(mine["bare"], mine["wrapped"], strict=True))
    summary: dict[str, Any] = {
        v: {name: spread(getattr(r, name) for r in rs) for name in FIGURES}
        for v, rs in mine.items()
    }
    per_connection = [(b.kb_per_connection, w.kb_per_connection) for b, w in pairs]
    summary["ratio_wrapped_over_bare"] = {
        "kb_per_connection": spread(ratio(w, b) for b, w in per_connection)
    }
    summary["wrapped_minus_bare"] = {"kb_per_connection": spread(w - b for b, w in per_connection)}
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """One row per variant, then wrapped/bare and wrapped-bare of the per-connection figure."""
    mb, kb = figure(".1f"), figure(".1f")
    rows = [["variant", "RSS before MB", "RSS with connections MB", "KB per idle connection"]]
    for v in VARIANTS:
        s = summary[v]
        rows.append([v, mb(s["rss_before_mb"]), mb(s["rss_after_mb"]), kb(s["kb_per_connection"])])
    rows.append(
        [
            "wrapped / bare",
            "",
            "",
            figure(".3f", "x")(summary["ratio_wrapped_over_bare"]["kb_per_connection"]),
        ]
    )
    difference = summary["wrapped_minus_bare"]["kb_per_connection"]
    rows.append(["wrapped - bare", "", "", figure("+.2f")(difference)])
    return table(rows)


def measure(options: IdleMemoryOptions, machine: dict[str, Any]) -> PartResult:
    """Run every round; return the table and the figures."""
    raise_open_files_limit()
    started = time.perf_counter()
    rounds: list[VariantRound] = []
    for number in range(1, options.rounds + 1):
        mine = anyio.run(run_round, number, options)
        rounds.extend(mine)
        print(
            f"  idle memory round {number}: "
            + ", ".join(f"{r.variant} {r.kb_per_connection:.1f} KB/connection" for r in mine),
            file=sys.stderr,
            flush=True,
        )
    elapsed = time.perf_counter() - started
    summary = summarise(rounds)
    header = "\n".join(
        [
            f"4. memory per idle connection: server VmRSS growth for {options.connections} open "
            "connections / connections, bare vs wrapped",
            f"each variant: {options.warmup} warm-up connections opened and closed, VmRSS, "
            f"{options.connections} connections opened ({options.concurrency} at a time, each "
            f"receives its snapshot), {options.settle_seconds:g} s idle, VmRSS; fresh servers, "
            f"{options.rounds} round(s); websockets client, no compression",
            machine_line(machine),
            "figures: median (min-max) across rounds; ratios and differences are per round",
        ]
    )
    return PartResult(
        name="idle_memory",
        text=f"{header}\n\n{format_table(summary)}\n\nround(s) took {elapsed:.0f} s",
        data={
            "config": asdict(options),
            "elapsed_s": elapsed,
            "summary": summary,
            "rounds": [asdict(r) for r in rounds],
        },
    )

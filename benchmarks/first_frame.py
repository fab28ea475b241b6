"""Connect to first frame: the middleware's cost per connection, against a bare app.

Each round starts a fresh ``bare`` and ``wrapped`` server (:mod:`benchmarks._overhead_server`),
each in its own process. The bare app sends the snapshot itself right after accepting, built
with the same ``SessionUpdate`` from the same in-memory store; the wrapped app is the same app
without that line, behind ``SessionSyncMiddleware`` with a dict-lookup loader. Every client
frame is checked to be the very same JSON.

Connections are sequential, one at a time, so latency is measured, not throughput. They go in
blocks alternating between the two servers (the first variant changes every block); per
connection the time is from starting to connect to receiving the first frame, with a
``websockets`` client. Around each block the servers' CPU seconds are read, giving the server
CPU time per connection. Figures are per round; ratios are wrapped/bare within a round.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import anyio

from ._clients import first_frame, rotate, server_pair
from ._overhead_server import VARIANTS, memory_sessions, snapshot_text
from ._report import (
    PartResult,
    Spread,
    Target,
    figure,
    machine_line,
    percentile,
    ratio,
    spread,
    table,
)

__all__ = ["FirstFrameOptions", "measure"]

TARGET = 1.05  # wrapped/bare, at p50 and at p99


@dataclass(frozen=True)
class FirstFrameOptions:
    """How much to measure: connections per variant per round, in blocks of ``block``."""

    rounds: int = 5
    connections: int = 2000
    block: int = 100
    warmup: int = 200
    sessions: int = 200
    interactions: int = 20
    timeout: float = 10.0


@dataclass
class VariantRound:
    """One variant in one round."""

    variant: str
    round: int
    connections: int
    errors: dict[str, int]
    p50_us: float
    p90_us: float
    p99_us: float
    open_p50_us: float
    server_cpu_us_per_connection: float


async def run_round(number: int, options: FirstFrameOptions) -> list[VariantRound]:
    """One round on fresh servers: warm both up, then alternate blocks of connections."""
    sessions = memory_sessions(options.sessions, options.interactions)
    ids = list(sessions)
    expected = {sid: snapshot_text(sid, snapshot) for sid, snapshot in sessions.items()}
    totals: dict[str, list[float]] = {v: [] for v in VARIANTS}
    opened: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu = dict.fromkeys(VARIANTS, 0.0)
    errors: dict[str, Counter[str]] = {v: Counter() for v in VARIANTS}
    async with server_pair() as servers:

        async def connect_block(variant: str, start: int, count: int, record: bool) -> None:
            server = servers[variant]
            for i in range(start, start + count):
                sid = ids[i % len(ids)]
                try:
                    result = await first_frame(server.url(sid), bound=options.timeout)
                except Exception as exc:
                    errors[variant][type(exc).__name__] += 1
                    continue
                if result.text != expected[sid]:
                    errors[variant]["unexpected first frame"] += 1
                elif record:
                    totals[variant].append(result.total)
                    opened[variant].append(result.opened)

        for variant in VARIANTS:
            await connect_block(variant, 0, options.warmup, record=False)
        for block in range(options.connections // options.block):
            for variant in rotate(VARIANTS, block + number):
                server = servers[variant]
                before = await server.cpu.read()
                await connect_block(variant, block * options.block, options.block, record=True)
                cpu[variant] += await server.cpu.read() - before
    return [
        VariantRound(
            variant=v,
            round=number,
            connections=len(totals[v]),
            errors=dict(errors[v]),
            p50_us=percentile(totals[v], 50) * 1e6,
            p90_us=percentile(totals[v], 90) * 1e6,
            p99_us=percentile(totals[v], 99) * 1e6,
            open_p50_us=percentile(opened[v], 50) * 1e6,
            server_cpu_us_per_connection=cpu[v] / max(1, len(totals[v])) * 1e6,
        )
        for v in VARIANTS
    ]


FIGURES = ("p50_us", "p90_us", "p99_us", "open_p50_us", "server_cpu_us_per_connection")


def summarise(rounds: list[VariantRound]) -> dict[str, Any]:
    """Per variant, each figure across rounds; per round, wrapped/bare and wrapped-bare."""
    by_variant = {v: [r for r in rounds if r.variant == v] for v in VARIANTS}
    pairs = list(zip(by_variant["bare"], by_variant["wrapped"], strict=True))
    summary: dict[str, Any] = {
        v: {name: spread(getattr(r, name) for r in mine) for name in FIGURES}
        for v, mine in by_variant.items()
    }
    summary["ratio_wrapped_over_bare"] = {
        name: spread(ratio(getattr(w, name), getattr(b, name)) for b, w in pairs)
        for name in FIGURES
    }
    summary["wrapped_minus_bare_us"] = {
        name: spread(getattr(w, name) - getattr(b, name) for b, w in pairs) for name in FIGURES
    }
    for v, mine in by_variant.items():
        summary[v]["connections"] = sum(r.connections for r in mine)
        summary[v]["errors"] = sum(sum(r.errors.values()) for r in mine)
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """One row per variant, then wrapped/bare and wrapped-bare, medians (min-max) of rounds."""
    whole, times = figure(".0f"), figure(".3f", "x")
    signed = figure("+.0f")
    rows = [
        [
            "variant",
            "p50 us",
            "p90 us",
            "p99 us",
            "p50 handshake us",
            "server CPU us/conn",
            "errors",
        ]
    ]
    for v in VARIANTS:
        s = summary[v]
        rows.append([v, *(whole(s[name]) for name in FIGURES), f"{s['errors']}/{s['connections']}"])
    r, d = summary["ratio_wrapped_over_bare"], summary["wrapped_minus_bare_us"]
    rows.append(["wrapped / bare", *(times(r[name]) for name in FIGURES), ""])
    rows.append(["wrapped - bare", *(signed(d[name]) for name in FIGURES), ""])
    return table(rows)


def measure(options: FirstFrameOptions, machine: dict[str, Any]) -> PartResult:
    """Run every round; return the table, the figures and whether the target was met."""
    started = time.perf_counter()
    rounds: list[VariantRound] = []
    for number in range(1, options.rounds + 1):
        mine = anyio.run(run_round, number, options)
        rounds.extend(mine)
        bare, wrapped = mine
        print(
            f"  first frame round {number}: p50 bare {bare.p50_us:.0f} us, wrapped "
            f"{wrapped.p50_us:.0f} us ({ratio(wrapped.p50_us, bare.p50_us):.3f}x); p99 "
            f"{ratio(wrapped.p99_us, bare.p99_us):.3f}x",
            file=sys.stderr,
            flush=True,
        )
    elapsed = time.perf_counter() - started
    summary = summarise(rounds)
    ratios: dict[str, Spread] = summary["ratio_wrapped_over_bare"]
    targets = [
        Target(
            f"1. connect->first frame {q} wrapped/bare",
            f"<= {TARGET}",
            ratios[f"{q}_us"],
            ratios[f"{q}_us"]["median"] <= TARGET,
        )
        for q in ("p50", "p99")
    ]
    failures = [
        f"first frame: {summary[v]['errors']} {v} connection(s) failed or got another frame"
        for v in VARIANTS
        if summary[v]["errors"]
    ]
    header = "\n".join(
        [
            "1. connect -> first frame: bare app sending the snapshot by hand vs the same app "
            "wrapped (in-memory loader)",
            f"{options.connections} sequential connections per variant per round, blocks of "
            f"{options.block} alternating, {options.rounds} round(s), {options.warmup} warm-up "
            f"connections each; snapshot {options.interactions} interactions "
            f"({len(snapshot_text('s0000', memory_sessions(1, options.interactions)['s0000']))}"
            " bytes); websockets client, no compression",
            machine_line(machine),
            "figures: median (min-max) across rounds; ratios and differences are per round",
        ]
    )
    return PartResult(
        name="first_frame",
        text=f"{header}\n\n{format_table(summary)}\n\nround(s) took {elapsed:.0f} s",
        data={
            "config": asdict(options),
            "elapsed_s": elapsed,
            "summary": summary,
            "rounds": [asdict(r) for r in rounds],
        },
        failures=failures,
        targets=targets,
    )

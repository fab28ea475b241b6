"""Fan-out: server CPU per delivered update, the NATS bridge against a hand-written forwarder.

Many sockets of one process watch one session, and each update the session gets must reach
every one of them. The bridge subscribes once per session per process, parses each message
once and judges it per socket (byte-bounded queue, cursor, repair); the floor is the
forwarder anyone would write first: one nats-py subscription per socket, whose callback sends
each message's text as it came (no ordering, no repair). Target: the bridge's server CPU per
delivered update at most 1.3x the forwarder's.

Each round starts both servers (:mod:`benchmarks._server` with ``--nats``: ``bare`` is the
forwarder, ``wrapped`` the bridge, each in its own process) against an embedded nats-server
that lives for the whole part. For each count of ``clients``, in an order that alternates
every count and round, and after a short warm-up stream on each server:

1. ``clients`` raw WebSocket clients connect to one session (20 interactions) and read its
   snapshot; the server subscribed each socket before accepting it.
2. The server's CPU time is read over its control socket; then the benchmark process, with
   its own nats-py client, publishes ``updates`` chained ``session_patch`` frames (what
   ``NatsBridge.publish_patch`` sends, built beforehand with
   :class:`~asgi_session_sync.protocol.SessionPatch`: versions 8, 9, ... from the snapshot's
   7, one ``replace`` of about 100 bytes each). **Paced in lock-step**: the next update is
   published once every client has received this one, so nothing queues anywhere.
3. The server's CPU time is read again. Every client checks every frame as it arrives: the
   ``k``-th must be the ``k``-th published text, byte for byte.

Figures per variant and count: **server CPU us per delivered update** (the server process's
``time.process_time()`` over the stream, divided by clients x updates), **wall us per update**
(first publish to the last client's last frame, divided by the updates) and **nats-server CPU
us per delivered update** (its threads' run time): the forwarder makes nats-server deliver
each update once per socket, the bridge once per process.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import anyio
import nats

from asgi_session_sync.protocol import SessionPatch

from ._clients import RawWebSocket, Server, rotate, server_pair
from ._harness import Part, Report, run_alone
from ._report import Column, Row, Target, compare, comparison_table, figure
from ._server import (
    NATS_URL_ENV,
    PREFIX,
    Broker,
    cpu_seconds,
    embedded_nats,
    server_args,
    subject,
)
from ._sessions import FILLER, SNAPSHOT_VERSION, memory_sessions, numbered_ids

__all__ = ["PART", "FanoutOptions"]

VARIANTS = {"forwarder": "bare", "bridge": "wrapped"}
"""Each side's name in the tables, and its server's variant."""
BOUND = 1.3  # server CPU per delivered update, bridge / forwarder, at most
SESSION = numbered_ids(1)[0]
INTERACTIONS = 20
OWNER = memory_sessions({SESSION: INTERACTIONS})[SESSION].owner


@dataclass(frozen=True)
class FanoutOptions:
    """Clients per session (one axis each), updates per stream; both variants every round."""

    QUICK: ClassVar[dict[str, Any]] = {"rounds": 1, "clients": (5, 20), "updates": 100}

    rounds: int = 3
    clients: tuple[int, ...] = (20, 100)
    updates: int = 1000
    warmup_updates: int = 50
    timeout: float = 120.0


def patch_frames(updates: int) -> list[bytes]:
    """``updates`` chained patches of the session, as ``NatsBridge.publish_patch`` sends them."""
    return [
        SessionPatch(
            session_id=SESSION,
            owner=OWNER,  # the bridge refuses frames naming another owner than the snapshot's
            base_version=SNAPSHOT_VERSION + k - 1,
            version=SNAPSHOT_VERSION + k,
            patch=[
                {
                    "op": "replace",
                    "path": f"/interactions/{INTERACTIONS - 1}/content",
                    "value": f"{k:05d} {FILLER[:94]}",
                }
            ],
        ).to_json()
        for k in range(1, updates + 1)
    ]


async def stream(
    server: Server, publisher: Any, clients: int, updates: int, options: FanoutOptions, env: Broker
) -> dict[str, float]:
    """Publish ``updates`` patches in lock-step to ``clients`` fresh sockets; return the figures.

    ``wrong`` counts the frames that were not the published text at their place.
    """
    frames = patch_frames(updates)
    texts = [frame.decode() for frame in frames]
    sockets: list[RawWebSocket] = []
    wrong = 0
    try:
        with anyio.fail_after(options.timeout):
            for _ in range(clients):
                sockets.append(await RawWebSocket.connect(server.process.port, PREFIX + SESSION))
            for ws in sockets:
                if not (await ws.receive_text()).startswith('{"type":"session_update"'):
                    raise RuntimeError("the first frame is not the session's snapshot")
            cpu_before, nats_before = await server.control.cpu(), cpu_seconds(env.pid)
            started = time.perf_counter()
            for frame, text in zip(frames, texts, strict=True):
                await publisher.publish(subject(SESSION), frame)
                for ws in sockets:
                    wrong += await ws.receive_text() != text
            wall = time.perf_counter() - started
            cpu = await server.control.cpu() - cpu_before
            nats_cpu = cpu_seconds(env.pid) - nats_before
    finally:
        with anyio.CancelScope(shield=True):
            for ws in sockets:
                await ws.close()
    delivered = clients * updates
    return {
        "cpu_us_per_delivery": cpu / delivered * 1e6,
        "wall_us_per_update": wall / updates * 1e6,
        "nats_cpu_us_per_delivery": nats_cpu / delivered * 1e6,
        "wrong": wrong,
    }


async def run_round(number: int, options: FanoutOptions, env: Broker) -> list[Row]:
    """One round on fresh servers: every count of clients, both variants, after a warm-up."""
    args = {
        variant: server_args(
            variant, "--nats", "--sessions", "1", "--interactions", str(INTERACTIONS)
        )
        for variant in VARIANTS.values()
    }
    rows: list[Row] = []
    publisher = await nats.connect(env.url)
    try:
        async with server_pair(args, env={NATS_URL_ENV: env.url}) as servers:
            for variant in VARIANTS.values():
                await stream(servers[variant], publisher, 2, options.warmup_updates, options, env)
            for turn, clients in enumerate(options.clients):
                for name in rotate(list(VARIANTS), number + turn):
                    samples = clients * options.updates
                    row: Row = {"variant": name, "clients": clients, "round": number}
                    try:
                        figures = await stream(
                            servers[VARIANTS[name]],
                            publisher,
                            clients,
                            options.updates,
                            options,
                            env,
                        )
                    except Exception as exc:
                        print(f"  fanout {name} {clients}: {exc!r}", file=sys.stderr)
                        figures = dict.fromkeys(FIGURES, float("nan")) | {"wrong": samples}
                    wrong = int(figures.pop("wrong"))
                    rows.append(row | figures | {"samples": samples, "errors": wrong})
    finally:
        with anyio.CancelScope(shield=True):
            await publisher.close()
    return rows


FIGURES = ("cpu_us_per_delivery", "wall_us_per_update", "nats_cpu_us_per_delivery")
COLUMNS = [
    Column("server CPU us/delivered update", "cpu_us_per_delivery", figure(".1f")),
    Column("wall us/update", "wall_us_per_update", figure(",.0f")),
    Column("nats-server CPU us/delivered update", "nats_cpu_us_per_delivery", figure(".1f")),
]


def progress(rows: list[Row]) -> str:
    """Server CPU per delivered update of each variant, per count of clients."""
    return ", ".join(
        f"{row['variant']} at {row['clients']}: {row['cpu_us_per_delivery']:.1f} us" for row in rows
    )


def report(rows: list[Row], options: FanoutOptions, env: Broker) -> Report:
    """Per count of clients, both variants and bridge / forwarder; a target per count."""
    summary = compare(rows, FIGURES, baseline="forwarder", candidate="bridge", by=("clients",))
    targets = [
        Target(
            f"fan-out: server CPU per delivered update at {clients} clients, bridge / forwarder",
            f"<= {BOUND}",
            entry["ratio"]["cpu_us_per_delivery"],
            entry["ratio"]["cpu_us_per_delivery"]["median"] <= BOUND,
        )
        for clients, entry in summary.items()
    ]
    failures = [
        f"fanout {row['variant']} {row['clients']} clients round {row['round']}: "
        f"{row['errors']} of {row['samples']} frames missing or wrong"
        for row in rows
        if row["errors"]
    ]
    heading = [
        "fan-out: server CPU per delivered update, NatsBridge against a hand-written forwarder",
        f"one session, {' and '.join(map(str, options.clients))} raw WebSocket clients under "
        f"uvicorn (each server its own process); {options.updates} chained session_patch "
        "frames published by the load generator to an embedded nats-server, the next once "
        "every client had the last; forwarder: a nats-py subscription per socket sending the "
        "text as it came; bridge: bridge.subscribe + SessionSync.accept + updates.forward; "
        "server CPU is the server process's time.process_time()",
    ]
    return Report(
        heading=heading,
        tables=[
            comparison_table(
                summary,
                COLUMNS,
                sides={"forwarder": "forwarder", "bridge": "bridge"},
                ratio_label="bridge / forwarder",
                group_title="clients",
            )
        ],
        summary=summary,
        targets=targets,
        failures=failures,
    )


PART = Part(
    name="fanout",
    options=FanoutOptions,
    run_round=run_round,
    progress=progress,
    report=report,
    environment=embedded_nats,
)

if __name__ == "__main__":
    sys.exit(run_alone(PART))

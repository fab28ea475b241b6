"""Fan-out: server CPU per delivered update, the NATS bridge against a hand-written forwarder.

One session watched by many sockets of one process; chained patches published in lock-step
(the next once every client has this one), each checked byte for byte by every client. The
``forwarder`` has a nats-py subscription per socket; bridge / forwarder at most 1.3.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, ClassVar

import anyio
import nats

from asgi_session_sync.protocol import SessionPatch

from ._clients import Server, measured, open_client, rotate, running_servers
from ._harness import Part, Report, declared, run_alone
from ._report import Column, Goal, Row, Table
from ._server import NATS_URL_ENV, Broker, embedded_nats, server_args, subject
from ._sessions import FILLER, SNAPSHOT_VERSION, numbered_ids

SIDES = {"forwarder": "forwarder", "bridge": "bridge"}
BOUND = 1.3  # server CPU per delivered update, bridge / forwarder, at most
SESSION = numbered_ids(1)[0]


@dataclass(frozen=True)
class FanoutOptions:
    """Clients per session (one group each), updates per stream; both variants every round."""

    QUICK: ClassVar[dict[str, Any]] = {"rounds": 1, "clients": (5, 20), "updates": 100}

    rounds: int = 3
    clients: tuple[int, ...] = (20, 100)
    updates: int = 1000
    warmup_updates: int = 50
    timeout: float = 120.0


def patch_frames(updates: int) -> list[bytes]:
    """Chained patches (versions 8, 9, ...), each a ``replace`` of ~100 bytes, as
    ``NatsBridge.publish_patch`` sends them."""
    return [
        SessionPatch(
            session_id=SESSION,
            owner=f"owner-{SESSION}",
            base_version=SNAPSHOT_VERSION + k - 1,
            version=SNAPSHOT_VERSION + k,
            patch=[
                {
                    "op": "replace",
                    "path": "/interactions/19/content",
                    "value": f"{k:05d} {FILLER[:94]}",
                }
            ],
        ).to_json()
        for k in range(1, updates + 1)
    ]


async def stream(
    server: Server, publisher: Any, clients: int, updates: int, bound: float, broker: Broker
) -> Row:
    """``updates`` patches in lock-step to ``clients`` fresh sockets; ``errors``: the frames that
    were not the published ones at their place."""
    sockets, wrong = (
        [await open_client(server.url(SESSION), bound=bound) for _ in range(clients)],
        [0],
    )
    for ws in sockets:
        if not (await ws.recv(decode=False)).startswith(b'{"type":"session_update"'):
            raise ConnectionError("the first frame is not the session's snapshot")

    async def work() -> None:
        for frame in patch_frames(updates):
            await publisher.publish(subject(SESSION), frame)
            for ws in sockets:
                wrong[0] += await ws.recv(decode=False) != frame

    got, delivered = await measured(server, broker.pid, sockets, work(), bound), clients * updates
    return {
        "samples": delivered,
        "errors": wrong[0],
        "wall_us_per_update": got["wall"] / updates * 1e6,
        "cpu_us_per_delivery": got["cpu"] / delivered * 1e6,
        "nats_cpu_us_per_delivery": got["nats_cpu"] / delivered * 1e6,
    }


async def run_round(number: int, options: FanoutOptions, broker: Broker) -> list[Row]:
    """One round on fresh servers: every count of clients, both variants, after a warm-up."""
    args = {v: server_args(v, "--sessions", "1") for v in SIDES}
    rows: list[Row] = []
    publisher = await nats.connect(broker.url)
    try:
        async with running_servers(args, env={NATS_URL_ENV: broker.url}) as servers:
            for server in servers.values():
                await stream(server, publisher, 2, options.warmup_updates, options.timeout, broker)
            for turn, clients in enumerate(options.clients):
                for name in rotate(list(SIDES), number + turn):
                    row: Row = {"variant": name, "clients": clients, "round": number}
                    try:
                        row |= await stream(
                            servers[name],
                            publisher,
                            clients,
                            options.updates,
                            options.timeout,
                            broker,
                        )
                    except Exception as exc:
                        row |= {"samples": 1, "errors": 1, "error_kinds": {repr(exc): 1}}
                    rows.append(row)
    finally:
        with anyio.CancelScope(shield=True):
            await publisher.close()
    return rows


def report(rows: list[Row], options: FanoutOptions, env: Broker) -> Report:
    """Per count of clients, both variants and bridge / forwarder; a target per count."""
    columns = [
        Column("server CPU us/delivered update", "cpu_us_per_delivery", ".1f"),
        Column("wall us/update", "wall_us_per_update"),
        Column("nats-server CPU us/delivered update", "nats_cpu_us_per_delivery", ".1f"),
    ]
    table = Table("fanout", columns, SIDES, [("bridge", "forwarder")], by=("clients",))
    goals = [
        Goal(
            f"fan-out: server CPU per delivered update at {n} clients, bridge / forwarder",
            "fanout",
            "cpu_us_per_delivery",
            ("bridge", "forwarder"),
            BOUND,
            group=str(n),
        )
        for n in options.clients
    ]
    heading = [
        "fan-out: server CPU per delivered update, NatsBridge against a hand-written forwarder",
        f"one session, {' and '.join(map(str, options.clients))} WebSocket clients of one uvicorn "
        f"process; {options.updates} chained session_patch frames published in lock-step",
    ]
    return declared(rows, heading=heading, tables=[table], goals=goals)


PART = Part("fanout", FanoutOptions, run_round, report, environment=embedded_nats)

if __name__ == "__main__":
    sys.exit(run_alone(PART))

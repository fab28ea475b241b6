"""Per-token cost as the session grows: full-state publishing against patch publishing.

A chat app streams a response token by token. Each token changes the session; the publisher
sends the change through the NATS bridge, and every WebSocket watching the session gets it.
Publishing the whole session makes a token cost as much as the session is large; publishing a
JSON Patch (issue 11) should make it cost the same at 10 interactions as at 1,000.

Each round starts a fresh server (:mod:`benchmarks._server`, ``wrapped``, ``--nats
--stream``) in its own process, connected to an embedded ``nats-server`` that lives for the
whole part (its ``max_payload`` raised to 8 MB: a full-state frame of 1,000 interactions is
about 1.1 MB).
The server holds sessions of 10, 100 and 1,000 interactions of about 1 KB each, in memory.
For every size, and for both modes in an order that changes every round and size:

1. ``clients`` WebSocket clients connect to the session; the app subscribes each socket on
   the bridge, then accepts it through ``SessionSync.accept``, which sends its snapshot.
2. The server's CPU time is read over its control socket, then the server is told to stream
   ``tokens`` tokens into the session's last interaction. For each token it updates the
   session in memory, bumps the version and publishes: ``NatsBridge.publish(session_id,
   session, owner=..., version=...)`` (**full**) or ``NatsBridge.publish_patch(session_id,
   [{"op": "replace", "path": "/interactions/<last>/content", "value": ...}],
   base_version=..., version=...)`` (**patch**). The next token goes once every socket has
   been sent this one, so nothing queues.
3. Once every client has its ``tokens`` frames the CPU time is read again.

Figures per mode and size: **bytes/token per client** (the JSON text of the frames a client
receives, WebSocket framing excluded), **server CPU us/token** (``time.process_time()`` of the
server process, all threads: publishing, receiving from NATS, forwarding to every socket;
nats-server's CPU is not in it), **wall ms/token** (from the stream request to every client
having every frame, divided by the tokens) and **nats-server CPU us/token** (the run time of
its threads in ``/proc/<pid>/task/*/schedstat``). The first client checks its frames after the clock
stops: every frame is of the mode's type, and the state they lead to equals the session the
server streamed.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import anyio
import jsonpatch
from websockets.asyncio.client import ClientConnection

from ._clients import Server, open_client, rotate, server_pair
from ._harness import Part, Report, run_alone
from ._report import (
    Column,
    Row,
    Target,
    compare,
    comparison_table,
    figure,
    ratio,
    table,
)
from ._server import NATS_URL_ENV, Broker, cpu_seconds, embedded_nats, server_args
from ._sessions import filler, memory_sessions, session_id_for, streamed_content

__all__ = ["PART", "TokenCostOptions"]

MODES = ("full", "patch")
BYTES_GROWTH = 1.2  # patches: figure at the largest size / at the smallest, at most
CPU_GROWTH = 1.2
FULL_OVER_PATCH = 100  # bytes per token at the largest size, at least
FRAME_TYPES = {"full": b'{"type":"session_update"', "patch": b'{"type":"session_patch"'}


@dataclass(frozen=True)
class TokenCostOptions:
    """Sessions, tokens and clients; every mode and size is measured once per round."""

    QUICK: ClassVar[dict[str, Any]] = {"rounds": 1, "tokens": 5, "clients": 2}

    rounds: int = 3
    sizes: tuple[int, ...] = (10, 100, 1000)
    tokens: int = 50
    clients: int = 10
    interaction_bytes: int = 1000
    warmup_tokens: int = 5
    timeout: float = 60.0


def expected_session(options: TokenCostOptions, size: int) -> Any:
    """The session of ``size`` interactions once a stream of ``tokens`` tokens is done."""
    sid = session_id_for(size, 0)
    session: Any = memory_sessions({sid: size}, text=filler(options.interaction_bytes))[sid].session
    session["interactions"][-1]["content"] = streamed_content(sid, size - 1, options.tokens)
    return session


async def stream(
    server: Server, size: int, mode: str, tokens: int, options: TokenCostOptions, env: Broker
) -> dict[str, Any]:
    """One stream to fresh clients; return its figures and what the first client received."""
    sid = session_id_for(size, 0)
    clients: list[ClientConnection] = []
    try:
        for _ in range(options.clients):
            clients.append(await open_client(server.url(sid), bound=options.timeout))
        snapshots = [await ws.recv(decode=False) for ws in clients]
        received: list[list[bytes]] = [[] for _ in clients]

        async def read(index: int) -> None:
            for _ in range(tokens):
                received[index].append(await clients[index].recv(decode=False))

        with anyio.fail_after(options.timeout):
            cpu_before, nats_before = await server.control.cpu(), cpu_seconds(env.pid)
            started = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for index in range(len(clients)):
                    tg.start_soon(read, index)
                answer = await server.control.ask(f"stream {sid} {mode} {tokens} {options.clients}")
            wall = time.perf_counter() - started
            cpu = await server.control.cpu() - cpu_before
            nats_cpu = cpu_seconds(env.pid) - nats_before
    finally:
        with anyio.CancelScope(shield=True):
            for ws in clients:
                await ws.close()
    if answer != "done":
        raise RuntimeError(f"the server did not stream: {answer}")
    return {
        "bytes": sum(len(frame) for frames in received for frame in frames),
        "cpu": cpu,
        "nats_cpu": nats_cpu,
        "wall": wall,
        "snapshot": snapshots[0],
        "frames": received[0],
    }


def check(mode: str, result: dict[str, Any], expected: Any) -> str | None:
    """Why the first client's frames are not the stream (``None`` when they are)."""
    frames: list[bytes] = result["frames"]
    if not all(frame.startswith(FRAME_TYPES[mode]) for frame in frames):
        return f"{mode}: a frame of another type (a resync?)"
    if mode == "full":
        state = json.loads(frames[-1])["session"]
    else:
        state = json.loads(result["snapshot"])["session"]
        for frame in frames:
            jsonpatch.apply_patch(state, json.loads(frame)["patch"], in_place=True)
    return None if state == expected else f"{mode}: the client's state is not the server's"


async def run_round(number: int, options: TokenCostOptions, env: Broker) -> list[Row]:
    """One round on a fresh server: every size, both modes, after a warm-up of each mode."""
    sizes = [str(size) for size in options.sizes]
    args = server_args("wrapped", "--nats", "--stream", "--sessions", "0")
    args += ["--session-sizes", *sizes]
    args += ["--interaction-bytes", str(options.interaction_bytes)]
    rows: list[Row] = []
    # The URL carries the broker's credentials: the server gets it in its environment.
    async with server_pair({"wrapped": args}, env={NATS_URL_ENV: env.url}) as servers:
        server = servers["wrapped"]
        for mode in MODES:
            await stream(server, options.sizes[0], mode, options.warmup_tokens, options, env)
        for turn, size in enumerate(options.sizes):
            expected = expected_session(options, size)
            for mode in rotate(MODES, number + turn):
                errors = 0
                try:
                    result = await stream(server, size, mode, options.tokens, options, env)
                except Exception as exc:
                    print(f"  token cost {size} {mode}: {exc!r}", file=sys.stderr)
                    errors, result = 1, None
                if result is not None and (problem := check(mode, result, expected)):
                    print(f"  token cost {size}: {problem}", file=sys.stderr)
                    errors = 1
                tokens = options.tokens
                rows.append(
                    {
                        "mode": mode,
                        "size": size,
                        "round": number,
                        "samples": 1,
                        "errors": errors,
                        "bytes_per_token": ratio(result["bytes"], tokens * options.clients)
                        if result
                        else float("nan"),
                        "cpu_us_per_token": result["cpu"] / tokens * 1e6
                        if result
                        else float("nan"),
                        "wall_ms_per_token": result["wall"] / tokens * 1e3
                        if result
                        else float("nan"),
                        "nats_cpu_us_per_token": result["nats_cpu"] / tokens * 1e6
                        if result
                        else float("nan"),
                    }
                )
    return rows


FIGURES = ("bytes_per_token", "cpu_us_per_token", "wall_ms_per_token", "nats_cpu_us_per_token")
COLUMNS = [
    Column("bytes/token per client", "bytes_per_token", figure(",.0f")),
    Column("server CPU us/token", "cpu_us_per_token", figure(",.0f")),
    Column("wall ms/token", "wall_ms_per_token", figure(".2f")),
    Column("nats-server CPU us/token", "nats_cpu_us_per_token", figure(",.0f")),
]


def progress(rows: list[Row]) -> str:
    """Bytes and CPU per token of each mode at the largest size."""
    largest = max(row["size"] for row in rows)
    return ", ".join(
        f"{row['mode']} at {largest}: {row['bytes_per_token']:,.0f} B, "
        f"{row['cpu_us_per_token']:,.0f} us CPU per token"
        for row in rows
        if row["size"] == largest
    )


def report(rows: list[Row], options: TokenCostOptions, env: Broker) -> Report:
    """Per size, both modes and full/patch; per mode, the largest size over the smallest."""
    smallest, largest = min(options.sizes), max(options.sizes)
    by_size = compare(rows, FIGURES, key="mode", baseline="patch", candidate="full", by=("size",))
    growth = compare(rows, FIGURES, key="size", baseline=smallest, candidate=largest, by=("mode",))
    growth_rows = [["mode", *(f"{c.title}: {largest} / {smallest}" for c in COLUMNS[:3])]]
    for mode in MODES:
        if mode in growth:
            growth_rows.append(
                [mode, *(figure(".3f", "x")(growth[mode]["ratio"][c.figure]) for c in COLUMNS[:3])]
            )
    targets = []
    if "patch" in growth and str(largest) in by_size:
        patch = growth["patch"]["ratio"]
        full_over_patch = by_size[str(largest)]["ratio"]["bytes_per_token"]
        targets = [
            Target(
                f"11. patches: bytes/token at {largest} / at {smallest} interactions",
                f"<= {BYTES_GROWTH}",
                patch["bytes_per_token"],
                patch["bytes_per_token"]["median"] <= BYTES_GROWTH,
            ),
            Target(
                f"11. patches: server CPU/token at {largest} / at {smallest} interactions",
                f"<= {CPU_GROWTH}",
                patch["cpu_us_per_token"],
                patch["cpu_us_per_token"]["median"] <= CPU_GROWTH,
            ),
            Target(
                f"11. bytes/token at {largest} interactions, full state / patches",
                f">= {FULL_OVER_PATCH}",
                full_over_patch,
                full_over_patch["median"] >= FULL_OVER_PATCH,
            ),
        ]
    failures = [
        f"token cost {row['size']} {row['mode']} round {row['round']}: stream failed or wrong"
        for row in rows
        if row["errors"]
    ]
    heading = [
        "11. per-token cost as the session grows: full-state publishing vs patch publishing",
        f"sessions of {', '.join(map(str, options.sizes))} interactions of ~"
        f"{options.interaction_bytes} bytes, in memory; {options.tokens} tokens streamed into "
        f"the last interaction through NatsBridge and an embedded nats-server to "
        f"{options.clients} WebSocket clients under uvicorn (wrapped app, its own process); "
        "the next token once every socket was sent the last; server CPU is the server "
        "process's time.process_time()",
    ]
    return Report(
        heading=heading,
        tables=[
            comparison_table(
                by_size,
                COLUMNS,
                sides={"full": "full state", "patch": "patch"},
                ratio_label="full / patch",
                group_title="interactions",
            ),
            "growth with the session, per round\n" + table(growth_rows),
        ],
        summary={"by_size": by_size, "growth": growth},
        targets=targets,
        failures=failures,
    )


PART = Part(
    name="token_cost",
    options=TokenCostOptions,
    run_round=run_round,
    progress=progress,
    report=report,
    environment=embedded_nats,
)

if __name__ == "__main__":
    sys.exit(run_alone(PART))

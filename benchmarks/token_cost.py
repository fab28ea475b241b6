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

**Answer length** (issue 18): one answer of 50, 1,000 and 10,000 tokens streamed into a chat
of 10 interactions, from the load generator as the app's worker would (:mod:`benchmarks._answers`:
it publishes through its own ``NatsBridge`` and checkpoints into a real SQLite file, WAL,
``synchronous=NORMAL``), to ``clients`` raw WebSocket tabs of a fresh server (``wrapped
--nats --answer``: the bridge, no producer in it, so its CPU is the API's: uvicorn and the
fan-out). Tokens come at ``token_rate`` per second, faster than an LLM's 50-100 so that 10,000
tokens take 20 s, not 200; the deltas still coalesce (the tables give tokens per frame). Two
modes, in an order that changes every round and length:

- **append**, the library's way: ``AnswerStream`` (its default intervals: a delta at most every
  50 ms, a checkpoint at most every 250 ms and one at the end, both through the callback);
- **replace**, the way before it: each token commits the whole text and publishes ``replace``
  of it (the last one also sets the status), the next once every tab has this one.

Figures per mode and length: **bytes/token per client**, **server CPU us per delivered token**
(tokens x tabs), **DB writes per answer** (the checkpoint callback's commits, counted by the
store) against the bound ``seconds / 0.25 + 2``, **tokens per frame**, **tokens/s** (the tokens
over the wall time from the first token to every tab having the last frame) and **nats-server
CPU us per delivered token**. Every tab checks its frames after the clock stops: all patches,
chained, applying (``append`` included) to the session with the whole answer, ``complete``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import anyio
import jsonpatch
from websockets.asyncio.client import ClientConnection

from ._answers import (
    CHECKPOINT_INTERVAL,
    AnswerEnvironment,
    AnswerRun,
    PublishTimes,
    Tab,
    answer_environment,
    answer_sessions,
    answer_tokens,
    answered_session,
    library_answer,
    replaced_answer,
)
from ._clients import Server, open_client, rotate, server_pair
from ._harness import Part, Report, run_alone
from ._report import (
    Column,
    Row,
    Spread,
    Target,
    compare,
    comparison_table,
    figure,
    ratio,
    table,
)
from ._server import NATS_URL_ENV, Forwarded, cpu_seconds, server_args
from ._sessions import filler, memory_sessions, numbered_ids, session_id_for, streamed_content

__all__ = ["PART", "TokenCostOptions"]

MODES = ("full", "patch")
BYTES_GROWTH = 1.2  # patches: figure at the largest size / at the smallest, at most
CPU_GROWTH = 1.2
FULL_OVER_PATCH = 100  # bytes per token at the largest size, at least
FRAME_TYPES = {"full": b'{"type":"session_update"', "patch": b'{"type":"session_patch"'}
ANSWER_MODES = ("replace", "append")
ANSWER_INTERACTIONS = 10  # the chat the answer ends
ANSWER_SESSION = numbered_ids(1)[0]
ANSWER_OWNER = answer_sessions(1, ANSWER_INTERACTIONS)[ANSWER_SESSION].owner
FRAME_BUDGET = 200  # append: bytes per token per client at the longest, at most the token's + this


@dataclass(frozen=True)
class TokenCostOptions:
    """Sessions, tokens and clients, answer lengths and their rate; every mode, size and length
    is measured once per round.

    ``tokens`` is the stream of each size, ``lengths`` the answers' (at ``token_rate`` tokens
    per second); ``timeout`` is the seconds a stream may take, beyond an answer's own length
    at its rate.
    """

    QUICK: ClassVar[dict[str, Any]] = {
        "rounds": 1,
        "tokens": 5,
        "clients": 2,
        "lengths": (50, 500),
        "token_rate": 1000.0,
    }

    rounds: int = 3
    sizes: tuple[int, ...] = (10, 100, 1000)
    tokens: int = 50
    clients: int = 10
    interaction_bytes: int = 1000
    warmup_tokens: int = 5
    lengths: tuple[int, ...] = (50, 1000, 10000)
    token_rate: float = 500.0
    timeout: float = 60.0


def expected_session(options: TokenCostOptions, size: int) -> Any:
    """The session of ``size`` interactions once a stream of ``tokens`` tokens is done."""
    sid = session_id_for(size, 0)
    session: Any = memory_sessions({sid: size}, text=filler(options.interaction_bytes))[sid].session
    session["interactions"][-1]["content"] = streamed_content(sid, size - 1, options.tokens)
    return session


async def stream(
    server: Server,
    size: int,
    mode: str,
    tokens: int,
    options: TokenCostOptions,
    env: AnswerEnvironment,
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


async def run_round(number: int, options: TokenCostOptions, env: AnswerEnvironment) -> list[Row]:
    """One round: the sizes on a fresh server, then the answer lengths on another."""
    return await size_round(number, options, env) + await length_round(number, options, env)


async def size_round(number: int, options: TokenCostOptions, env: AnswerEnvironment) -> list[Row]:
    """Every size, both modes, after a warm-up of each mode."""
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
                        "axis": "size",
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


async def answer(
    server: Server, mode: str, length: int, options: TokenCostOptions, env: AnswerEnvironment
) -> Row:
    """One answer of ``length`` tokens to fresh tabs: its figures, ``errors`` 1 if it was wrong."""
    tokens = answer_tokens(length)
    tabs: list[Tab] = []
    arrivals = Forwarded()  # frames read by the tabs, for the replace mode's lock-step
    try:
        with anyio.fail_after(options.timeout + length / options.token_rate):
            for _ in range(options.clients):
                tabs.append(await Tab.open(server.process.port, ANSWER_SESSION))
            cpu_before, nats_before = await server.control.cpu(), cpu_seconds(env.pid)
            started = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for tab in tabs:
                    tg.start_soon(
                        partial(
                            tab.read,
                            ANSWER_INTERACTIONS,
                            keep_all=mode == "append",  # whole texts would not fit in memory
                            arrived=lambda: arrivals.add(ANSWER_SESSION),
                        )
                    )
                run: AnswerRun
                if mode == "append":
                    run = await library_answer(
                        PublishTimes(env.bridge),
                        env.store,
                        ANSWER_SESSION,
                        tokens=tokens,
                        rate=options.token_rate,
                        owner=ANSWER_OWNER,
                        interactions=ANSWER_INTERACTIONS,
                    )
                else:
                    run = await replaced_answer(
                        env.bridge,
                        env.store,
                        ANSWER_SESSION,
                        tokens=tokens,
                        rate=options.token_rate,
                        delivered=lambda k: arrivals.until(ANSWER_SESSION, k * len(tabs)),
                        owner=ANSWER_OWNER,
                        interactions=ANSWER_INTERACTIONS,
                    )
            wall = time.perf_counter() - started
            cpu = await server.control.cpu() - cpu_before
            nats_cpu = cpu_seconds(env.pid) - nats_before
    finally:
        with anyio.CancelScope(shield=True):
            for tab in tabs:
                await tab.close()
    snapshot = answer_sessions(1, ANSWER_INTERACTIONS)[ANSWER_SESSION]
    expected = answered_session(snapshot, ANSWER_INTERACTIONS, tokens)
    problems = [p for tab in tabs if (p := tab.problem(expected, run.version))]
    problems += [
        f"{tab.count} frames, not {length}"
        for tab in tabs
        if mode == "replace" and tab.count != length
    ]
    for problem in problems[:3]:
        print(f"  token cost, {length} tokens, {mode}: {problem}", file=sys.stderr)
    delivered = length * len(tabs)
    writes = env.store.commits[ANSWER_SESSION]
    token_bytes = sum(map(len, tokens)) / length
    bytes_per_token = sum(tab.bytes for tab in tabs) / delivered
    return {
        "seconds": run.seconds,
        "errors": int(bool(problems)),
        "bytes_per_token": bytes_per_token,
        "bytes_over_budget": bytes_per_token / (token_bytes + FRAME_BUDGET),
        "cpu_us_per_token": cpu / delivered * 1e6,
        "db_writes": writes,
        "db_writes_over_bound": writes / (run.seconds / CHECKPOINT_INTERVAL + 2),
        "tokens_per_frame": length / tabs[0].count,
        "tokens_per_s": length / wall,
        "nats_cpu_us_per_token": nats_cpu / delivered * 1e6,
    }


async def length_round(number: int, options: TokenCostOptions, env: AnswerEnvironment) -> list[Row]:
    """Every answer length, both modes, after a warm-up of each mode, on a fresh server."""
    args = server_args("wrapped", "--nats", "--answer", "--sessions", "1")
    args += ["--interactions", str(ANSWER_INTERACTIONS)]
    rows: list[Row] = []
    async with server_pair({"wrapped": args}, env={NATS_URL_ENV: env.url}) as servers:
        server = servers["wrapped"]
        for mode in ANSWER_MODES:
            await answer(server, mode, options.warmup_tokens, options, env)
        for turn, length in enumerate(options.lengths):
            for mode in rotate(ANSWER_MODES, number + turn):
                row: Row = {"axis": "length", "mode": mode, "length": length, "round": number}
                try:
                    figures = await answer(server, mode, length, options, env)
                except Exception as exc:
                    print(f"  token cost {length} tokens {mode}: {exc!r}", file=sys.stderr)
                    figures = dict.fromkeys(LENGTH_FIGURES, float("nan")) | {"errors": 1}
                rows.append(row | {"samples": 1} | figures)
    return rows


FIGURES = ("bytes_per_token", "cpu_us_per_token", "wall_ms_per_token", "nats_cpu_us_per_token")
LENGTH_FIGURES = (
    "bytes_per_token",
    "cpu_us_per_token",
    "db_writes",
    "db_writes_over_bound",
    "tokens_per_frame",
    "tokens_per_s",
    "nats_cpu_us_per_token",
    "bytes_over_budget",
)
LENGTH_COLUMNS = [
    Column("bytes/token per client", "bytes_per_token", figure(",.1f")),
    Column("server CPU us/delivered token", "cpu_us_per_token", figure(",.2f")),
    Column("DB writes/answer", "db_writes", figure(",.0f")),
    Column("writes / (s/0.25 + 2)", "db_writes_over_bound", figure(".2f")),
    Column("tokens/frame", "tokens_per_frame", figure(".1f")),
    Column("tokens/s", "tokens_per_s", figure(",.0f")),
    Column("nats-server CPU us/delivered token", "nats_cpu_us_per_token", figure(",.2f")),
]
COLUMNS = [
    Column("bytes/token per client", "bytes_per_token", figure(",.0f")),
    Column("server CPU us/token", "cpu_us_per_token", figure(",.0f")),
    Column("wall ms/token", "wall_ms_per_token", figure(".2f")),
    Column("nats-server CPU us/token", "nats_cpu_us_per_token", figure(",.0f")),
]


def progress(rows: list[Row]) -> str:
    """Bytes and CPU per token of each mode at the largest size and at the longest answer."""
    sizes = [row for row in rows if row["axis"] == "size"]
    lengths = [row for row in rows if row["axis"] == "length"]
    largest = max((row["size"] for row in sizes), default=None)
    longest = max((row["length"] for row in lengths), default=None)
    return ", ".join(
        [
            f"{row['mode']} at {largest}: {row['bytes_per_token']:,.0f} B, "
            f"{row['cpu_us_per_token']:,.0f} us CPU per token"
            for row in sizes
            if row["size"] == largest
        ]
        + [
            f"{row['mode']} of {longest} tokens: {row['bytes_per_token']:,.0f} B, "
            f"{row['cpu_us_per_token']:,.2f} us CPU per delivered token, "
            f"{row['db_writes']} DB writes"
            for row in lengths
            if row["length"] == longest
        ]
    )


def report(rows: list[Row], options: TokenCostOptions, env: AnswerEnvironment) -> Report:
    """The sizes (full / patch, largest / smallest), then the answer lengths (replace / append,
    longest / shortest), each with its targets."""
    sizes = size_report([row for row in rows if row["axis"] == "size"], options)
    lengths = length_report([row for row in rows if row["axis"] == "length"], options)
    return Report(
        heading=sizes.heading + lengths.heading,
        tables=sizes.tables + lengths.tables,
        summary=sizes.summary | lengths.summary,
        targets=sizes.targets + lengths.targets,
        failures=sizes.failures + lengths.failures,
    )


def size_report(rows: list[Row], options: TokenCostOptions) -> Report:
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


def length_report(rows: list[Row], options: TokenCostOptions) -> Report:
    """Per answer length, both modes and replace/append; per mode, the longest over the shortest."""
    shortest, longest = min(options.lengths), max(options.lengths)
    by_length = compare(
        rows, LENGTH_FIGURES, key="mode", baseline="append", candidate="replace", by=("length",)
    )
    growth = compare(
        rows, LENGTH_FIGURES, key="length", baseline=shortest, candidate=longest, by=("mode",)
    )
    shown = [c for c in LENGTH_COLUMNS if c.figure in ("bytes_per_token", "cpu_us_per_token")]
    growth_rows = [["mode", *(f"{c.title}: {longest} / {shortest}" for c in shown)]]
    for mode in ANSWER_MODES:
        if mode in growth:
            growth_rows.append(
                [mode, *(figure(".3f", "x")(growth[mode]["ratio"][c.figure]) for c in shown)]
            )
    targets: list[Target] = []
    if "append" in growth and str(longest) in by_length:
        append = growth["append"]["ratio"]
        budget = by_length[str(longest)]["append"]["bytes_over_budget"]
        targets += [
            Target(
                f"18. append: bytes/token per client at {longest} / at {shortest} tokens",
                f"<= {BYTES_GROWTH}",
                append["bytes_per_token"],
                append["bytes_per_token"]["median"] <= BYTES_GROWTH,
            ),
            Target(
                f"18. append: bytes/token per client at {longest} tokens / (token + "
                f"{FRAME_BUDGET} B)",
                "<= 1",
                budget,
                budget["median"] <= 1,
            ),
            Target(
                f"18. append: server CPU/delivered token at {longest} / at {shortest} tokens",
                f"<= {CPU_GROWTH}",
                append["cpu_us_per_token"],
                append["cpu_us_per_token"]["median"] <= CPU_GROWTH,
            ),
        ]
    for length in options.lengths:
        writes: Spread | None = (
            by_length.get(str(length), {}).get("append", {}).get("db_writes_over_bound")
        )
        if writes is not None:
            targets.append(
                Target(
                    f"18. append: DB writes per answer of {length} tokens / "
                    f"(seconds / {CHECKPOINT_INTERVAL} + 2)",
                    "<= 1 in every round",
                    writes,
                    writes["max"] <= 1,
                )
            )
    failures = [
        f"token cost {row['length']} tokens {row['mode']} round {row['round']}: "
        "answer failed or wrong"
        for row in rows
        if row["errors"]
    ]
    heading = [
        "18. per-token cost as the answer grows: AnswerStream (coalesced appends, checkpoints) "
        "vs a commit and a replace of the whole text per token",
        f"answers of {', '.join(f'{n:,}' for n in options.lengths)} tokens at "
        f"{options.token_rate:g} tokens/s (faster than an LLM's 50-100, so that the longest "
        "is affordable) after a chat of "
        f"{ANSWER_INTERACTIONS} interactions, produced in the load generator (its own "
        "NatsBridge; checkpoints into a real SQLite file, WAL, synchronous=NORMAL) to "
        f"{options.clients} raw WebSocket tabs of a wrapped server with no producer in it; "
        "replace: the next token once every tab has the last; server CPU per delivered token "
        "(tokens x tabs) is the server process's time.process_time()",
    ]
    return Report(
        heading=heading,
        tables=[
            comparison_table(
                by_length,
                LENGTH_COLUMNS,
                sides={"replace": "replace (before)", "append": "AnswerStream"},
                ratio_label="replace / append",
                group_title="tokens",
            ),
            "growth with the answer, per round\n" + table(growth_rows),
        ],
        summary={"by_length": by_length, "length_growth": growth},
        targets=targets,
        failures=failures,
    )


PART = Part(
    name="token_cost",
    options=TokenCostOptions,
    run_round=run_round,
    progress=progress,
    report=report,
    environment=answer_environment,
)

if __name__ == "__main__":
    sys.exit(run_alone(PART))

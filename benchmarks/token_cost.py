"""Per-token cost as the session grows (full state against patches), and as the answer grows.

**Session size** (issue 11). A chat app streams a response token by token; each token changes
the session and the change goes through the NATS bridge to every WebSocket watching it. A
fresh server each round (:mod:`benchmarks._server` ``bridge --stream``, connected to an
embedded nats-server whose ``max_payload`` is 8 MB) holds sessions of 10, 100 and 1,000
interactions of about 1 KB each in memory. For every size and both modes (their order changes
every round and size), ``clients`` clients connect, the server's CPU is read, and the server
streams ``tokens`` tokens into the last interaction: per token it bumps the version and
publishes the whole session (``NatsBridge.publish``, **full**) or a JSON Patch replacing the
interaction's content (``publish_patch``, **patch**), the next once every socket was sent this
one. Figures: bytes per token per client (the frames' JSON), server CPU us per token (the
server process, all threads), wall ms per token, nats-server CPU us per token. The first client
checks after the clock that every frame is of the mode's type and they lead to the session
the server streamed.

**Answer length** (issue 18). One answer of 50, 1,000 and 10,000 tokens streamed into a chat of
10 interactions by the load generator, as the app's worker would (:mod:`benchmarks._answers`:
its own ``NatsBridge``, checkpoints into a real SQLite file), to ``clients`` tabs of a fresh
server (``bridge --answer``, no producer in it: its CPU is the API's), at ``token_rate`` tokens
per second (faster than an LLM's 50-100 so that 10,000 tokens take 20 s). Two modes: **append**,
``AnswerStream`` at its default intervals (a delta at most every 50 ms, a checkpoint at most
every 250 ms and one at the end); **replace**, the way before it: each token commits the whole
text and publishes ``replace`` of it, the next once every tab has this one. Figures: bytes per
token per client, server CPU us per delivered token (tokens x tabs), DB writes per answer against
``seconds / 0.25 + 2``, tokens per frame, tokens per second, nats-server CPU. Every tab checks
its frames after the clock: all patches, chained, applying to the whole answer, ``complete``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import anyio
import jsonpatch

from ._answers import (
    CHECKPOINT_INTERVAL,
    AnswerEnvironment,
    PublishTimes,
    Tab,
    answer_environment,
    library_answer,
    replaced_answer,
)
from ._clients import Server, open_client, rotate, running_servers
from ._harness import Part, Report, declared, run_alone
from ._report import Column, Goal, Row, Table
from ._server import NATS_URL_ENV, Forwarded, cpu_seconds, server_args
from ._sessions import (
    answer_sessions,
    answer_tokens,
    answered_session,
    filler,
    memory_sessions,
    session_id_for,
    streamed_content,
)

__all__ = ["PART", "TokenCostOptions", "check"]

FRAME_TYPES = {"full": b'{"type":"session_update"', "patch": b'{"type":"session_patch"'}
GROWTH, FULL_OVER_PATCH = 1.2, 100  # a figure at the largest / at the smallest; bytes, at 1,000
ANSWER_INTERACTIONS = 10  # the chat the answer ends
ANSWER = answer_sessions(1, ANSWER_INTERACTIONS)
ANSWER_SESSION = next(iter(ANSWER))
FRAME_BUDGET = 200  # append: bytes per token per client at the longest, at most the token's + this


@dataclass(frozen=True)
class TokenCostOptions:
    """Sessions, tokens and clients; answer lengths and their rate. ``timeout`` is the seconds
    a stream may take beyond an answer's own length at its rate."""

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


async def measured(
    server: Server, pid: int, clients: list[Any], work: Callable[[], Awaitable[Any]]
) -> dict[str, float]:
    """Run ``work`` with the clients connected; its wall and CPU seconds (server, nats-server);
    the clients are always closed."""
    try:
        cpu, nats_cpu, started = await server.control.cpu(), cpu_seconds(pid), time.perf_counter()
        await work()
        wall = time.perf_counter() - started
        return {
            "wall": wall,
            "cpu": await server.control.cpu() - cpu,
            "nats_cpu": cpu_seconds(pid) - nats_cpu,
        }
    finally:
        with anyio.CancelScope(shield=True):
            for client in clients:
                await client.close()


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


async def stream(
    server: Server,
    size: int,
    mode: str,
    tokens: int,
    options: TokenCostOptions,
    env: AnswerEnvironment,
) -> Row:
    """``tokens`` tokens into the session of ``size`` interactions, to fresh clients."""
    sid = session_id_for(size, 0)
    clients = [
        await open_client(server.url(sid), bound=options.timeout) for _ in range(options.clients)
    ]
    snapshot = [await ws.recv(decode=False) for ws in clients][0]
    received: list[list[bytes]] = [[] for _ in clients]

    async def work() -> None:
        async def read(index: int) -> None:
            for _ in range(tokens):
                received[index].append(await clients[index].recv(decode=False))

        with anyio.fail_after(options.timeout):
            async with anyio.create_task_group() as tg:
                for index in range(len(clients)):
                    tg.start_soon(read, index)
                answer = await server.control.ask(f"stream {sid} {mode} {tokens} {len(clients)}")
                if answer != "done":
                    raise RuntimeError(f"the server did not stream: {answer}")

    got = await measured(server, env.pid, clients, work)
    session: Any = memory_sessions({sid: size}, text=filler(options.interaction_bytes))[sid].session
    session["interactions"][-1]["content"] = streamed_content(sid, size - 1, tokens)
    problem = check(mode, {"snapshot": snapshot, "frames": received[0]}, session)
    return {
        "errors": int(problem is not None),
        "error_kinds": {problem: 1} if problem else {},
        "bytes_per_token": sum(map(len, sum(received, []))) / (tokens * len(clients)),
        "cpu_us_per_token": got["cpu"] / tokens * 1e6,
        "wall_ms_per_token": got["wall"] / tokens * 1e3,
        "nats_cpu_us_per_token": got["nats_cpu"] / tokens * 1e6,
    }


async def answer(
    server: Server, mode: str, length: int, options: TokenCostOptions, env: AnswerEnvironment
) -> Row:
    """One answer of ``length`` tokens to fresh tabs."""
    tokens = answer_tokens(length)
    tabs = [
        await Tab.open(server.url(ANSWER_SESSION), ANSWER_SESSION) for _ in range(options.clients)
    ]
    arrivals = Forwarded()  # frames read by the tabs, for the replace mode's lock-step
    owner, runs = ANSWER[ANSWER_SESSION].owner, []

    async def work() -> None:
        with anyio.fail_after(options.timeout + length / options.token_rate):
            async with anyio.create_task_group() as tg:
                for tab in tabs:  # replace: only the last frame kept, whole texts are large
                    tg.start_soon(
                        partial(
                            tab.read,
                            ANSWER_INTERACTIONS,
                            keep_all=mode == "append",
                            arrived=lambda: arrivals.add(ANSWER_SESSION),
                        )
                    )
                common = {
                    "owner": owner,
                    "interactions": ANSWER_INTERACTIONS,
                    "tokens": tokens,
                    "rate": options.token_rate,
                }
                if mode == "append":
                    transport = PublishTimes(env.bridge)
                    runs.append(
                        await library_answer(transport, env.store, ANSWER_SESSION, **common)
                    )
                else:
                    delivered = lambda k: arrivals.until(ANSWER_SESSION, k * len(tabs))  # noqa: E731
                    runs.append(
                        await replaced_answer(
                            env.bridge, env.store, ANSWER_SESSION, delivered=delivered, **common
                        )
                    )

    got = await measured(server, env.pid, tabs, work)
    expected = answered_session(ANSWER[ANSWER_SESSION], ANSWER_INTERACTIONS, tokens)
    problems = [p for tab in tabs if (p := tab.problem(expected, runs[0].version))]
    problems += [f"{tab.count} frames" for tab in tabs if mode == "replace" and tab.count != length]
    delivered, writes = length * len(tabs), env.store.commits[ANSWER_SESSION]
    per_token = sum(tab.bytes for tab in tabs) / delivered
    return {
        "errors": int(bool(problems)),
        "error_kinds": dict.fromkeys(problems[:3], 1),
        "bytes_per_token": per_token,
        "bytes_over_budget": per_token / (sum(map(len, tokens)) / length + FRAME_BUDGET),
        "cpu_us_per_token": got["cpu"] / delivered * 1e6,
        "db_writes": writes,
        "db_writes_over_bound": writes / (runs[0].seconds / CHECKPOINT_INTERVAL + 2),
        "tokens_per_frame": length / tabs[0].count,
        "tokens_per_s": length / got["wall"],
        "nats_cpu_us_per_token": got["nats_cpu"] / delivered * 1e6,
    }


AXES = {"size": ("full", "patch"), "length": ("replace", "append")}


def measure(
    axis: str,
    server: Server,
    value: int,
    mode: str,
    warm: bool,
    options: TokenCostOptions,
    env: AnswerEnvironment,
) -> Awaitable[Row]:
    """One stream of the session of ``value`` interactions, or one answer of ``value`` tokens;
    ``warm``: a short one, not counted."""
    tokens = options.warmup_tokens if warm else options.tokens
    if axis == "size":
        return stream(server, value, mode, tokens, options, env)
    return answer(server, mode, options.warmup_tokens if warm else value, options, env)


async def run_round(number: int, options: TokenCostOptions, env: AnswerEnvironment) -> list[Row]:
    """The sizes on a fresh server, then the answer lengths on another; each after a warm-up."""
    args = {
        "size": [
            "--stream",
            "--sessions",
            "0",
            "--session-sizes",
            *map(str, options.sizes),
            "--interaction-bytes",
            str(options.interaction_bytes),
        ],
        "length": ["--answer", "--sessions", "1", "--interactions", str(ANSWER_INTERACTIONS)],
    }
    rows: list[Row] = []
    for axis, modes in AXES.items():
        values = options.sizes if axis == "size" else options.lengths
        servers = {"bridge": server_args("bridge", *args[axis])}
        async with running_servers(servers, env={NATS_URL_ENV: env.url}) as running:
            server = running["bridge"]
            for mode in modes:
                await measure(axis, server, values[0], mode, True, options, env)
            for turn, value in enumerate(values):
                for mode in rotate(modes, number + turn):
                    row: Row = {
                        "axis": axis,
                        axis: value,
                        "mode": mode,
                        "round": number,
                        "samples": 1,
                    }
                    try:
                        row |= await measure(axis, server, value, mode, False, options, env)
                    except Exception as exc:
                        row |= {"errors": 1, "error_kinds": {repr(exc): 1}}
                    rows.append(row)
    return rows


def report(rows: list[Row], options: TokenCostOptions, env: AnswerEnvironment) -> Report:
    """Per size and per length, both modes; the growth of each; issue 11's and 18's targets."""
    smallest, largest = min(options.sizes), max(options.sizes)
    shortest, longest = min(options.lengths), max(options.lengths)
    sized = [
        Column("bytes/token per client", "bytes_per_token"),
        Column("server CPU us/token", "cpu_us_per_token"),
        Column("wall ms/token", "wall_ms_per_token", ".2f"),
        Column("nats-server CPU us/token", "nats_cpu_us_per_token"),
    ]
    lengths = [
        Column("bytes/token per client", "bytes_per_token", ",.1f"),
        Column("server CPU us/delivered token", "cpu_us_per_token", ",.2f"),
        Column("DB writes/answer", "db_writes"),
        Column("writes / (s/0.25 + 2)", "db_writes_over_bound", ".2f"),
        Column("tokens/frame", "tokens_per_frame", ".1f"),
        Column("tokens/s", "tokens_per_s"),
        Column("nats-server CPU us/delivered token", "nats_cpu_us_per_token", ",.2f"),
        Column("bytes / (token + 200 B)", "bytes_over_budget", ".3f"),
    ]
    size_axis, length_axis = {"axis": "size"}, {"axis": "length"}
    tables = [
        Table(
            "by_size",
            sized,
            {"full": "full state", "patch": "patch"},
            key="mode",
            by=("size",),
            ratios=[("full", "patch")],
            where=size_axis,
        ),
        Table(
            "size_growth",
            sized[:3],
            {smallest: f"{smallest}", largest: f"{largest}"},
            key="size",
            by=("mode",),
            ratios=[(largest, smallest)],
            where=size_axis,
            title="growth with the session, per round",
        ),
        Table(
            "by_length",
            lengths,
            {"replace": "replace (before)", "append": "AnswerStream"},
            key="mode",
            by=("length",),
            ratios=[("replace", "append")],
            where=length_axis,
        ),
        Table(
            "length_growth",
            lengths[:2],
            {shortest: f"{shortest}", longest: f"{longest}"},
            key="length",
            by=("mode",),
            ratios=[(longest, shortest)],
            where=length_axis,
            title="growth with the answer, per round",
        ),
    ]
    grew = (largest, smallest)
    longer = (longest, shortest)
    goals = [
        Goal(
            f"11 patches: bytes/token at {largest} / at {smallest} interactions",
            "size_growth",
            "bytes_per_token",
            grew,
            GROWTH,
            group="patch",
        ),
        Goal(
            f"11 patches: server CPU/token at {largest} / at {smallest} interactions",
            "size_growth",
            "cpu_us_per_token",
            grew,
            GROWTH,
            group="patch",
        ),
        Goal(
            f"11 bytes/token at {largest} interactions, full state / patches",
            "by_size",
            "bytes_per_token",
            ("full", "patch"),
            FULL_OVER_PATCH,
            at_most=False,
            group=str(largest),
        ),
        Goal(
            f"18 append: bytes/token per client at {longest} / at {shortest} tokens",
            "length_growth",
            "bytes_per_token",
            longer,
            GROWTH,
            group="append",
        ),
        Goal(
            f"18 append: bytes/token per client at {longest} tokens / (token + {FRAME_BUDGET} B)",
            "by_length",
            "bytes_over_budget",
            ("append",),
            1,
            group=str(longest),
        ),
        Goal(
            f"18 append: server CPU/delivered token at {longest} / at {shortest} tokens",
            "length_growth",
            "cpu_us_per_token",
            longer,
            GROWTH,
            group="append",
        ),
        *(
            Goal(
                f"18 append: DB writes per answer of {n} tokens / (seconds / "
                f"{CHECKPOINT_INTERVAL} + 2)",
                "by_length",
                "db_writes_over_bound",
                ("append",),
                1,
                group=str(n),
                worst=True,
            )
            for n in options.lengths
        ),
    ]
    heading = [
        "11 per-token cost as the session grows, full state vs patches; 18 as the answer grows, "
        "AnswerStream vs a commit and a replace of the whole text per token",
        f"sizes: sessions of {', '.join(map(str, options.sizes))} interactions of ~"
        f"{options.interaction_bytes} bytes, {options.tokens} tokens streamed by the server "
        f"through NatsBridge to {options.clients} WebSocket clients; lengths: answers of "
        f"{', '.join(f'{n:,}' for n in options.lengths)} tokens at {options.token_rate:g} "
        f"tokens/s after a chat of {ANSWER_INTERACTIONS} interactions, produced in the load "
        f"generator (checkpoints into SQLite, WAL) to {options.clients} tabs",
    ]
    return declared(rows, heading=heading, tables=tables, goals=goals)


PART = Part("token_cost", TokenCostOptions, run_round, report, environment=answer_environment)

if __name__ == "__main__":
    sys.exit(run_alone(PART))

"""Per-token cost as the session grows (issue 11) and as the answer grows (issue 18).

Both axes stream tokens from the load generator, as the app's worker would, through its own
``NatsBridge`` and an embedded nats-server (``max_payload`` 8 MB), to ``clients`` WebSockets of
a fresh ``bridge`` server (:mod:`benchmarks._server`) per round: the server's CPU (all its
threads) is the API's, uvicorn and the fan-out. Each stream has a session of its own, and every
client checks its frames after the clock stops.

- **size**: ``tokens`` tokens into the last interaction of a session of 10, 100 and 1,000
  interactions of ~1 KB, each published as the whole session (``publish``, **full**) or a JSON
  Patch replacing the interaction's content (``publish_patch``, **patch**), the next once every
  client has this one. Figures per token: bytes per client, server and nats-server CPU, wall.
- **length**: an answer of 50, 1,000 and 10,000 tokens after a chat of 10 interactions at
  ``token_rate`` tokens/s, through ``AnswerStream`` (**append**: a delta at most every 50 ms, a
  checkpoint into SQLite at most every 250 ms) or the way before it (**replace**: each token
  commits and publishes the whole text, the next once every tab has it). Figures: bytes and
  CPU per delivered token (tokens x tabs), DB writes against ``seconds / 0.25 + 2``, tokens per
  frame and per second.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import anyio
import jsonpatch

from ._answers import (
    CHECKPOINT_INTERVAL,
    AnswerEnvironment,
    Arrivals,
    Tab,
    answer_environment,
    library_answer,
    replaced_answer,
)
from ._clients import Server, open_client, rotate, running_servers
from ._harness import Part, Report, declared, run_alone
from ._report import Column, Goal, Row, Table
from ._server import NATS_URL_ENV, cpu_seconds, server_args
from ._sessions import SNAPSHOT_VERSION, answer_sessions, answer_tokens, answered_session
from ._sessions import filler, memory_sessions, session_id_for, streamed_content

FRAME_TYPES = {"full": b'{"type":"session_update"', "patch": b'{"type":"session_patch"'}
GROWTH, FULL_OVER_PATCH = 1.2, 100  # a figure at the largest / the smallest; bytes at 1,000
CHAT = 10  # interactions before the answer
FRAME_BUDGET = 200  # append: bytes per token per client at the longest, at most the token's + this


@dataclass(frozen=True)
class TokenCostOptions:
    """Sizes, tokens and clients; answer lengths and their rate. ``timeout`` is the seconds a
    stream may take beyond an answer's own length at its rate."""

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
    server: Server,
    env: AnswerEnvironment,
    clients: Sequence[Any],
    work: Callable[[], Awaitable[Any]],
    bound: float,
) -> dict[str, float]:
    """Run ``work`` (bounded) with the clients connected: its wall seconds and the CPU seconds
    of the server and of nats-server; the clients are always closed."""
    try:
        cpu, nats_cpu = await server.control.cpu(), cpu_seconds(env.broker.pid)
        started = time.perf_counter()
        with anyio.fail_after(bound):
            await work()
        wall = time.perf_counter() - started
        cpu, nats_cpu = await server.control.cpu() - cpu, cpu_seconds(env.broker.pid) - nats_cpu
        return {"wall": wall, "cpu": cpu, "nats_cpu": nats_cpu}
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
    sid: str,
    size: int,
    mode: str,
    tokens: int,
    options: TokenCostOptions,
    env: AnswerEnvironment,
) -> Row:
    """``tokens`` tokens into session ``sid`` of ``size`` interactions, to fresh clients."""
    snapshot = memory_sessions({sid: size}, text=filler(options.interaction_bytes))[sid]
    session: Any = snapshot.session
    clients = [
        await open_client(server.url(sid), bound=options.timeout) for _ in range(options.clients)
    ]
    head = [await ws.recv(decode=False) for ws in clients][0]
    received: list[list[bytes]] = [[] for _ in clients]
    arrivals = Arrivals()

    async def read(ws: Any, frames: list[bytes]) -> None:
        for _ in range(tokens):
            frames.append(await ws.recv(decode=False))
            arrivals.add()

    async def work() -> None:
        async with anyio.create_task_group() as tg:
            for ws, frames in zip(clients, received):
                tg.start_soon(read, ws, frames)
            for k in range(1, tokens + 1):
                content = streamed_content(sid, size - 1, k)
                session["interactions"][-1]["content"] = content
                version, owner = SNAPSHOT_VERSION + k, snapshot.owner
                if mode == "full":
                    await env.bridge.publish(sid, session, owner=owner, version=version)
                else:
                    patch = [
                        {
                            "op": "replace",
                            "path": f"/interactions/{size - 1}/content",
                            "value": content,
                        }
                    ]
                    await env.bridge.publish_patch(
                        sid, patch, base_version=version - 1, version=version, owner=owner
                    )
                await arrivals.until(k * len(clients))

    got = await measured(server, env, clients, work, options.timeout)
    problem = check(mode, {"snapshot": head, "frames": received[0]}, session)
    return {
        "errors": int(problem is not None),
        "error_kinds": {problem: 1} if problem else {},
        "bytes_per_token": sum(len(f) for frames in received for f in frames)
        / tokens
        / len(clients),
        "cpu_us_per_token": got["cpu"] / tokens * 1e6,
        "wall_ms_per_token": got["wall"] / tokens * 1e3,
        "nats_cpu_us_per_token": got["nats_cpu"] / tokens * 1e6,
    }


async def answer(
    server: Server,
    sid: str,
    mode: str,
    length: int,
    options: TokenCostOptions,
    env: AnswerEnvironment,
) -> Row:
    """One answer of ``length`` tokens into session ``sid``, to fresh tabs."""
    tokens, arrivals, runs = answer_tokens(length), Arrivals(), []
    tabs = [await Tab.open(server.url(sid), sid) for _ in range(options.clients)]
    snapshot = answer_sessions(int(sid[1:]) + 1, CHAT)[sid]
    common = {
        "owner": snapshot.owner,
        "interactions": CHAT,
        "tokens": tokens,
        "rate": options.token_rate,
    }

    async def work() -> None:
        async with anyio.create_task_group() as tg:
            for tab in tabs:  # replace: only the last frame kept, whole texts are large
                tg.start_soon(partial(tab.read, CHAT, keep_all=mode == "append", arrived=arrivals))
            if mode == "append":
                runs.append(await library_answer(env, sid, **common))
            else:
                delivered = lambda k: arrivals.until(k * len(tabs))  # noqa: E731
                runs.append(await replaced_answer(env, sid, delivered=delivered, **common))

    got = await measured(server, env, tabs, work, options.timeout + length / options.token_rate)
    expected = answered_session(snapshot, CHAT, tokens)
    problems = [p for tab in tabs if (p := tab.problem(expected, runs[0].version))]
    problems += [f"{tab.count} frames" for tab in tabs if mode == "replace" and tab.count != length]
    delivered, writes = length * len(tabs), env.store.commits[sid]
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


async def run_round(number: int, options: TokenCostOptions, env: AnswerEnvironment) -> list[Row]:
    """The sizes on a fresh server, then the lengths on another; each stream its own session,
    after a short warm-up of each mode."""
    rows: list[Row] = []
    sized = ["--sessions", "0", "--sizes", *map(str, options.sizes)]
    sized += ["--interaction-bytes", str(options.interaction_bytes)]
    answers = [
        "--answer",
        "--sessions",
        str(2 * len(options.lengths) + 2),
        "--interactions",
        str(CHAT),
    ]
    for axis, values, modes, args in (
        ("size", options.sizes, ("full", "patch"), sized),
        ("length", options.lengths, ("replace", "append"), answers),
    ):
        servers = {"bridge": server_args("bridge", *args)}
        async with running_servers(servers, env={NATS_URL_ENV: env.broker.url}) as running:
            plan = [(values[0], mode, True) for mode in modes]
            plan += [
                (v, m, False) for turn, v in enumerate(values) for m in rotate(modes, number + turn)
            ]
            for index, (value, mode, warm) in enumerate(plan):
                if axis == "size":
                    sid = session_id_for(value, modes.index(mode) + 2 * warm)
                    tokens = options.warmup_tokens if warm else options.tokens
                    measure = stream(running["bridge"], sid, value, mode, tokens, options, env)
                else:
                    length = options.warmup_tokens if warm else value
                    measure = answer(running["bridge"], f"s{index:04d}", mode, length, options, env)
                row: Row = {"axis": axis, axis: value, "mode": mode, "round": number, "samples": 1}
                try:
                    row |= await measure
                except Exception as exc:
                    row |= {"errors": 1, "error_kinds": {repr(exc): 1}}
                rows += [] if warm else [row]
    return rows


def report(rows: list[Row], options: TokenCostOptions, env: AnswerEnvironment) -> Report:
    """Per size and per length, both modes; the growth of each; issue 11's and 18's targets."""
    small, large = min(options.sizes), max(options.sizes)
    short, long = min(options.lengths), max(options.lengths)
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
    by_size, by_length = {"axis": "size"}, {"axis": "length"}
    tables = [
        Table(
            "by_size",
            sized,
            {"full": "full state", "patch": "patch"},
            key="mode",
            by=("size",),
            ratios=[("full", "patch")],
            where=by_size,
        ),
        Table(
            "size_growth",
            sized[:3],
            {small: f"{small}", large: f"{large}"},
            key="size",
            by=("mode",),
            ratios=[(large, small)],
            where=by_size,
            title="growth with the session",
        ),
        Table(
            "by_length",
            lengths,
            {"replace": "replace (before)", "append": "AnswerStream"},
            key="mode",
            by=("length",),
            ratios=[("replace", "append")],
            where=by_length,
        ),
        Table(
            "length_growth",
            lengths[:2],
            {short: f"{short}", long: f"{long}"},
            key="length",
            by=("mode",),
            ratios=[(long, short)],
            where=by_length,
            title="growth with the answer",
        ),
    ]
    goals = [
        Goal(
            f"11 patches: bytes/token at {large} / at {small} interactions",
            "size_growth",
            "bytes_per_token",
            (large, small),
            GROWTH,
            group="patch",
        ),
        Goal(
            f"11 patches: server CPU/token at {large} / at {small} interactions",
            "size_growth",
            "cpu_us_per_token",
            (large, small),
            GROWTH,
            group="patch",
        ),
        Goal(
            f"11 bytes/token at {large} interactions, full state / patches",
            "by_size",
            "bytes_per_token",
            ("full", "patch"),
            FULL_OVER_PATCH,
            at_most=False,
            group=str(large),
        ),
        Goal(
            f"18 append: bytes/token per client at {long} / at {short} tokens",
            "length_growth",
            "bytes_per_token",
            (long, short),
            GROWTH,
            group="append",
        ),
        Goal(
            f"18 append: bytes/token per client at {long} tokens / (token + {FRAME_BUDGET} B)",
            "by_length",
            "bytes_over_budget",
            ("append",),
            1,
            group=str(long),
        ),
        Goal(
            f"18 append: server CPU/delivered token at {long} / at {short} tokens",
            "length_growth",
            "cpu_us_per_token",
            (long, short),
            GROWTH,
            group="append",
        ),
        *(
            Goal(
                f"18 append: DB writes per answer of {n} tokens / (seconds / 0.25 + 2)",
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
        "11 per-token cost as the session grows, full state vs patches; 18 as the answer "
        "grows, AnswerStream vs a commit and a replace of the whole text per token",
        f"sizes {', '.join(map(str, options.sizes))} interactions of ~{options.interaction_bytes}"
        f" bytes, {options.tokens} tokens; answers of {', '.join(f'{n:,}' for n in options.lengths)}"
        f" tokens at {options.token_rate:g} tokens/s after {CHAT} interactions; produced in the "
        f"load generator through its NatsBridge to {options.clients} WebSocket clients",
    ]
    return declared(rows, heading=heading, tables=tables, goals=goals)


PART = Part("token_cost", TokenCostOptions, run_round, report, environment=answer_environment)

if __name__ == "__main__":
    sys.exit(run_alone(PART))

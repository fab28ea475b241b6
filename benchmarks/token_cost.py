"""Per-token cost as the session grows (issue 11) and as the answer grows (issue 18).

The load generator streams through its own ``NatsBridge`` to clients of a ``bridge`` server.
**size**: tokens into sessions of 10, 100 and 1,000 interactions, as the whole session (full) or
a patch; **length**: answers of 50 to 10,000 tokens through ``AnswerStream`` (append) or a commit
and a replace of the whole text per token (replace).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
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
from ._clients import Server, measured, open_client, rotate, running_servers
from ._harness import Part, Report, declared, run_alone
from ._report import Column, Goal, Row, Table
from ._server import NATS_URL_ENV, server_args
from ._sessions import (
    SNAPSHOT_VERSION,
    answer_sessions,
    answer_tokens,
    answered_session,
    filler,
    memory_sessions,
    session_id_for,
    streamed_content,
)

FRAME_TYPES = {"full": b'{"type":"session_update"', "patch": b'{"type":"session_patch"'}
GROWTH, FULL_OVER_PATCH = 1.2, 100  # a figure at the largest / the smallest; bytes at 1,000
CHAT, FRAME_BUDGET = 10, 200  # interactions before the answer; bytes per token beyond its own


@dataclass(frozen=True)
class TokenCostOptions:
    """Sizes, tokens and clients; answer lengths and their rate. ``timeout`` is the seconds a
    stream may take beyond an answer's own length at its rate."""

    QUICK: ClassVar[dict[str, Any]] = {"rounds": 1, "tokens": 5, "clients": 2}
    QUICK |= {"lengths": (50, 500), "token_rate": 1000.0}

    rounds: int = 3
    sizes: tuple[int, ...] = (10, 100, 1000)
    tokens: int = 50
    clients: int = 10
    interaction_bytes: int = 1000
    warmup_tokens: int = 5
    lengths: tuple[int, ...] = (50, 1000, 10000)
    token_rate: float = 500.0
    timeout: float = 60.0


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


@dataclass
class Streams:
    """One round's streams on one server."""

    server: Server
    options: TokenCostOptions
    env: AnswerEnvironment

    async def size(self, sid: str, size: int, mode: str, tokens: int) -> Row:
        """``tokens`` tokens into session ``sid`` of ``size`` interactions, to fresh clients."""
        options, bridge = self.options, self.env.bridge
        snapshot = memory_sessions({sid: size}, text=filler(options.interaction_bytes))[sid]
        session: Any = snapshot.session
        clients = [
            await open_client(self.server.url(sid), bound=30) for _ in range(options.clients)
        ]
        heads = [await ws.recv(decode=False) for ws in clients]
        received: list[list[bytes]] = [[] for _ in clients]
        arrivals, path = Arrivals(), f"/interactions/{size - 1}/content"

        async def read(ws: Any, frames: list[bytes]) -> None:
            for _ in range(tokens):
                frames.append(await ws.recv(decode=False))
                arrivals.add()

        async def work() -> None:
            async with anyio.create_task_group() as tg:
                for ws, frames in zip(clients, received, strict=True):
                    tg.start_soon(read, ws, frames)
                for k in range(1, tokens + 1):
                    session["interactions"][-1]["content"] = text = streamed_content(
                        sid, size - 1, k
                    )
                    version, owner = SNAPSHOT_VERSION + k, snapshot.owner
                    if mode == "full":
                        await bridge.publish(sid, session, owner=owner, version=version)
                    else:
                        patch = [{"op": "replace", "path": path, "value": text}]
                        await bridge.publish_patch(
                            sid, patch, base_version=version - 1, version=version, owner=owner
                        )
                    await arrivals.until(k * len(clients))

        got = await measured(self.server, self.env.broker.pid, clients, work(), options.timeout)
        problem = check(mode, {"snapshot": heads[0], "frames": received[0]}, session)
        per_client = sum(len(f) for frames in received for f in frames) / len(clients)
        row = {"errors": int(bool(problem)), "error_kinds": {problem: 1} if problem else {}}
        return row | {
            "bytes_per_token": per_client / tokens,
            "cpu_us_per_token": got["cpu"] / tokens * 1e6,
            "wall_ms_per_token": got["wall"] / tokens * 1e3,
            "nats_cpu_us_per_token": got["nats_cpu"] / tokens * 1e6,
        }

    async def length(self, sid: str, mode: str, length: int) -> Row:
        """One answer of ``length`` tokens into session ``sid``, to fresh tabs."""
        options, tokens, arrivals, runs = self.options, answer_tokens(length), Arrivals(), []
        tabs = [await Tab.open(self.server.url(sid), sid) for _ in range(options.clients)]
        snapshot = answer_sessions(int(sid[1:]) + 1, CHAT)[sid]
        common = {"owner": snapshot.owner, "interactions": CHAT, "tokens": tokens}
        common["rate"] = options.token_rate

        async def work() -> None:
            async with anyio.create_task_group() as tg:
                for tab in tabs:  # replace: only the last frame kept, whole texts are large
                    tg.start_soon(
                        partial(tab.read, CHAT, keep_all=mode == "append", arrived=arrivals)
                    )
                if mode == "append":
                    runs.append(await library_answer(self.env, sid, **common))
                else:
                    delivered = lambda k: arrivals.until(k * len(tabs))  # noqa: E731
                    runs.append(await replaced_answer(self.env, sid, delivered=delivered, **common))

        bound = options.timeout + length / options.token_rate
        got = await measured(self.server, self.env.broker.pid, tabs, work(), bound)
        expected = answered_session(snapshot, CHAT, tokens)
        problems = [p for tab in tabs if (p := tab.problem(expected, runs[0].version))]
        problems += [f"{t.count} frames" for t in tabs if mode == "replace" and t.count != length]
        delivered, writes = length * len(tabs), self.env.store.commits[sid]
        per_token = sum(tab.bytes for tab in tabs) / delivered
        row = {"errors": int(bool(problems)), "error_kinds": dict.fromkeys(problems[:3], 1)}
        return row | {
            "bytes_per_token": per_token,
            "cpu_us_per_token": got["cpu"] / delivered * 1e6,
            "bytes_over_budget": per_token / (sum(map(len, tokens)) / length + FRAME_BUDGET),
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
    answers = ["--answer", "--sessions", str(2 * len(options.lengths) + 2)]
    answers += ["--interactions", str(CHAT)]
    axes = {"size": (options.sizes, ("full", "patch"), sized)}
    axes["length"] = (options.lengths, ("replace", "append"), answers)
    for axis, (values, modes, args) in axes.items():
        servers = {"bridge": server_args("bridge", *args)}
        async with running_servers(servers, env={NATS_URL_ENV: env.broker.url}) as running:
            streams = Streams(running["bridge"], options, env)
            plan = [(values[0], mode, True) for mode in modes]
            plan += [(v, m, False) for n, v in enumerate(values) for m in rotate(modes, number + n)]
            for index, (value, mode, warm) in enumerate(plan):
                row: Row = {"axis": axis, axis: value, "mode": mode, "round": number, "samples": 1}
                tokens = options.warmup_tokens if warm else value
                try:
                    if axis == "size":
                        sid = session_id_for(value, modes.index(mode) + 2 * warm)
                        tokens = options.warmup_tokens if warm else options.tokens
                        row |= await streams.size(sid, value, mode, tokens)
                    else:
                        row |= await streams.length(f"s{index:04d}", mode, tokens)
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
    tables = []
    for axis, columns, pair, ends in (
        ("size", sized, ("full", "patch"), (large, small)),
        ("length", lengths, ("replace", "append"), (long, short)),
    ):
        where, names, grew = {"axis": axis}, dict(zip(pair, pair, strict=True)), {}
        grew = {ends[1]: str(ends[1]), ends[0]: str(ends[0])}
        growth = columns[: 3 if axis == "size" else 2]  # bytes, CPU (and wall for sizes)
        mine = {"by": (axis,), "where": where}
        tables.append(Table(f"by_{axis}", columns, names, [pair], key="mode", **mine))
        mine = {"by": ("mode",), "where": where, "title": f"growth with the {axis}"}
        tables.append(Table(f"{axis}_growth", growth, grew, [ends], key=axis, **mine))
    big, longer, fp = (large, small), (long, short), ("full", "patch")
    at_big, at_long = f"at {large} / at {small} interactions", f"at {long} / at {short} tokens"
    goals = [
        Goal(f"11 patches: bytes/token {at_big}", "size_growth", "bytes_per_token", big, GROWTH),
        Goal(f"11 patches: server CPU/token {at_big}", "size_growth", "cpu_us_per_token", big, 1.2),
        Goal(
            f"18 append: bytes/token per client {at_long}",
            "length_growth",
            "bytes_per_token",
            longer,
            GROWTH,
        ),
        Goal(
            f"18 append: server CPU/delivered token {at_long}",
            "length_growth",
            "cpu_us_per_token",
            longer,
            GROWTH,
        ),
    ]
    goals = [replace(g, group="patch" if g.table == "size_growth" else "append") for g in goals]
    goals += [
        Goal(
            f"11 bytes/token at {large} interactions, full state / patches",
            "by_size",
            "bytes_per_token",
            fp,
            FULL_OVER_PATCH,
            at_most=False,
            group=str(large),
        ),
        Goal(
            f"18 append: bytes/token per client at {long} tokens / (token + 200 B)",
            "by_length",
            "bytes_over_budget",
            ("append",),
            1,
            group=str(long),
        ),
    ]
    writes = "18 append: DB writes per answer of {} tokens / (seconds / 0.25 + 2)"
    for n in options.lengths:
        goal = Goal(writes.format(n), "by_length", "db_writes_over_bound", ("append",), 1)
        goals.append(replace(goal, group=str(n), worst=True))
    heading = [
        "11 per-token cost as the session grows, full state vs patches; 18 as the answer grows, "
        "AnswerStream vs a commit and a replace of the whole text per token",
        f"sizes {', '.join(map(str, options.sizes))} of ~{options.interaction_bytes} B per "
        f"interaction, {options.tokens} tokens; answers of {', '.join(map(str, options.lengths))}"
        f" tokens at {options.token_rate:g}/s after {CHAT} interactions; {options.clients} clients",
    ]
    return declared(rows, heading=heading, tables=tables, goals=goals)


PART = Part("token_cost", TokenCostOptions, run_round, report, environment=answer_environment)

if __name__ == "__main__":
    sys.exit(run_alone(PART))

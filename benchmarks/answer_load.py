"""Sustained answer load: many answers at once, the bridge against a hand-written forwarder.

``answers`` sessions each stream an LLM answer at ``token_rate`` tokens per second at the same
time, and ``tabs`` WebSocket clients watch each one: can one API process on this machine keep
up, and what does the bridge cost per token it delivers? The floor is the forwarder anyone
would write first (the ``forwarder`` server of :mod:`benchmarks.fanout`): a nats-py
subscription per socket whose callback sends each message's text as it came, with no fence, no
ordering and no repair. Target: the bridge's server CPU per delivered token at most 1.3x the
forwarder's.

Each round starts both servers (:mod:`benchmarks._server` ``--answer``: the ``forwarder`` and
the ``bridge``, each in its own process, ``answers`` sessions of 20 interactions and an empty
answer) against an embedded nats-server that lives for the whole part.
For each variant, in an order that alternates every round, after a short warm-up load:

1. ``answers`` x ``tabs`` WebSocket clients connect (``tabs`` per session) and read their
   snapshot.
2. The server's CPU time is read; then the load generator, as the app's workers would, streams
   every answer through ``AnswerStream`` (:func:`benchmarks._answers.library_answer`: its own
   ``NatsBridge``, coalesced ``append`` deltas at most every 50 ms, checkpoints into a real
   SQLite file at most every 250 ms and at the end). The answers start within one publish
   interval of each other, so their deltas spread over it.
3. Once every tab has its answer's last frame (the one that sets the status ``complete``), the
   server's CPU time is read again. Each tab then checks its frames: all patches, chained from
   its snapshot, applying to the session with the whole answer.

Figures per variant: **delivered tokens/s** (tokens x tabs over the wall time from the first
token to the last tab's last frame), **p50 and p99 token latency** (for each token and tab,
from the producer calling ``publish_patch`` with the delta that carries it to the tab reading
that frame; both ends are in the load generator, so one clock), **DB commits/s** (the
checkpoints of all answers), **server CPU us per delivered token** (the server process's
``time.process_time()``, all threads), **nats-server CPU us per delivered token** and **tokens
per frame**.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import anyio

from ._answers import (
    PUBLISH_INTERVAL,
    AnswerEnvironment,
    PublishTimes,
    Tab,
    answer_environment,
    library_answer,
    token_ends,
)
from ._clients import Server, rotate, running_servers
from ._harness import Part, Report, declared, run_alone
from ._report import Column, Goal, Row, Table, percentile
from ._server import NATS_URL_ENV, cpu_seconds, server_args
from ._sessions import answer_sessions, answer_tokens, answered_session

__all__ = ["PART", "AnswerLoadOptions"]

SIDES = {"forwarder": "forwarder", "bridge": "bridge"}
BOUND = 1.3  # server CPU per delivered token, bridge / forwarder, at most
INTERACTIONS = 20


@dataclass(frozen=True)
class AnswerLoadOptions:
    """Answers at once, tabs per answer, their rate and length; both variants every round.

    ``timeout`` is the seconds a load may take beyond its answers' length at their rate.
    """

    QUICK: ClassVar[dict[str, Any]] = {"rounds": 1, "answers": 4, "tabs": 2, "tokens": 50}

    rounds: int = 3
    answers: int = 20
    tabs: int = 5
    token_rate: float = 50.0
    tokens: int = 500
    warmup_tokens: int = 10
    timeout: float = 60.0


async def load(
    server: Server, tokens: int, options: AnswerLoadOptions, env: AnswerEnvironment
) -> Row:
    """Stream every answer at once to fresh tabs; the figures, and the tabs that were wrong."""
    sessions = answer_sessions(options.answers, INTERACTIONS)
    words = answer_tokens(tokens)
    transport = PublishTimes(env.bridge)
    tabs: list[Tab] = []
    versions: dict[str, int] = {}
    try:
        with anyio.fail_after(options.timeout + tokens / options.token_rate):
            for session_id in sessions:
                for _ in range(options.tabs):
                    tabs.append(await Tab.open(server.url(session_id), session_id))

            async def produce(index: int, session_id: str) -> None:
                await anyio.sleep(index * PUBLISH_INTERVAL / len(sessions))
                run = await library_answer(
                    transport,
                    env.store,
                    session_id,
                    owner=sessions[session_id].owner,
                    interactions=INTERACTIONS,
                    tokens=words,
                    rate=options.token_rate,
                )
                versions[session_id] = run.version

            cpu_before, nats_before = await server.control.cpu(), cpu_seconds(env.pid)
            started = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for tab in tabs:
                    tg.start_soon(partial(tab.read, INTERACTIONS, keep_all=True))
                for index, session_id in enumerate(sessions):
                    tg.start_soon(produce, index, session_id)
            wall = time.perf_counter() - started
            cpu = await server.control.cpu() - cpu_before
            nats_cpu = cpu_seconds(env.pid) - nats_before
    finally:
        with anyio.CancelScope(shield=True):
            for tab in tabs:
                await tab.close()
    expected = {sid: answered_session(s, INTERACTIONS, words) for sid, s in sessions.items()}
    problems = [
        f"{tab.session_id}: {problem}"
        for tab in tabs
        if (problem := tab.problem(expected[tab.session_id], versions[tab.session_id]))
    ]
    for problem in problems[:3]:
        print(f"  answer load, {server.variant}: {problem}", file=sys.stderr)
    ends = token_ends(words)
    latencies = [s for tab in tabs for s in tab.latencies(transport.times, ends)]
    delivered = len(latencies)
    return {
        "samples": len(tabs),
        "errors": len(problems),
        "delivered_tokens_per_s": delivered / wall,
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
        "db_commits_per_s": sum(env.store.commits[sid] for sid in sessions) / wall,
        "cpu_us_per_token": cpu / delivered * 1e6,
        "nats_cpu_us_per_token": nats_cpu / delivered * 1e6,
        "tokens_per_frame": delivered / sum(tab.count for tab in tabs),
    }


async def run_round(number: int, options: AnswerLoadOptions, env: AnswerEnvironment) -> list[Row]:
    """One round on fresh servers: both variants, each after a warm-up load."""
    args = {v: server_args(v, "--answer", "--sessions", str(options.answers)) for v in SIDES}
    rows: list[Row] = []
    async with running_servers(args, env={NATS_URL_ENV: env.url}) as servers:
        for server in servers.values():
            await load(server, options.warmup_tokens, options, env)
        for name in rotate(list(SIDES), number):
            row: Row = {"variant": name, "round": number}
            try:
                row |= await load(servers[name], options.tokens, options, env)
            except Exception as exc:
                samples = options.answers * options.tabs
                row |= {"samples": samples, "errors": samples, "error_kinds": {repr(exc): 1}}
            rows.append(row)
    return rows


def report(rows: list[Row], options: AnswerLoadOptions, env: AnswerEnvironment) -> Report:
    """Both variants and bridge / forwarder; the target on server CPU per delivered token."""
    columns = [
        Column("delivered tokens/s", "delivered_tokens_per_s"),
        Column("p50 ms", "p50_ms", ".1f"),
        Column("p99 ms", "p99_ms", ".1f"),
        Column("DB commits/s", "db_commits_per_s", ".1f"),
        Column("server CPU us/delivered token", "cpu_us_per_token", ".2f"),
        Column("nats-server CPU us/delivered token", "nats_cpu_us_per_token", ".2f"),
        Column("tokens/frame", "tokens_per_frame", ".2f"),
    ]
    table = Table("answer_load", columns, SIDES, ratios=[("bridge", "forwarder")])
    goal = Goal(
        f"18 answer load: server CPU per delivered token at {options.answers} answers x "
        f"{options.tabs} tabs, bridge / forwarder",
        "answer_load",
        "cpu_us_per_token",
        ("bridge", "forwarder"),
        BOUND,
    )
    heading = [
        "18 sustained answer load: NatsBridge against a hand-written forwarder",
        f"{options.answers} answers at once, {options.tokens} tokens each at "
        f"{options.token_rate:g} tokens/s, each watched by {options.tabs} WebSocket tabs of one "
        "uvicorn process; produced in the load generator through AnswerStream (appends every "
        "50 ms, checkpoints into SQLite every 250 ms) and an embedded nats-server; latency from "
        "publish_patch to the tab reading the frame",
    ]
    return declared(rows, heading=heading, tables=[table], goals=[goal])


PART = Part("answer_load", AnswerLoadOptions, run_round, report, environment=answer_environment)

if __name__ == "__main__":
    sys.exit(run_alone(PART))

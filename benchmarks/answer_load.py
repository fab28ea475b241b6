"""Sustained answer load (issue 18): many answers at once, the bridge against a forwarder.

``answers`` sessions each stream an answer at ``token_rate`` tokens/s at once, each watched by
``tabs`` WebSockets of one process: the ``forwarder`` (a nats-py subscription per socket) or the
``bridge``. Latency is from ``publish_patch`` to the tab reading the frame; server CPU per
delivered token (tokens x tabs), bridge / forwarder, at most 1.3.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import anyio

from ._answers import (
    PUBLISH_INTERVAL,
    AnswerEnvironment,
    Tab,
    answer_environment,
    library_answer,
    token_ends,
)
from ._clients import Server, measured, rotate, running_servers
from ._harness import Part, Report, declared, run_alone
from ._report import Column, Goal, Row, Table, percentile
from ._server import NATS_URL_ENV, server_args
from ._sessions import answer_sessions, answer_tokens, answered_session

SIDES = {"forwarder": "forwarder", "bridge": "bridge"}
BOUND = 1.3  # server CPU per delivered token, bridge / forwarder, at most
CHAT = 20  # interactions before the answer


@dataclass(frozen=True)
class AnswerLoadOptions:
    """Answers at once, tabs per answer, their rate and length; ``timeout`` is the seconds a
    load may take beyond its answers' length at their rate."""

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
    """Stream every answer at once to fresh tabs: the figures, and the tabs that were wrong."""
    sessions, words = answer_sessions(options.answers, CHAT), answer_tokens(tokens)
    versions: dict[str, int] = {}
    tabs = [await Tab.open(server.url(sid), sid) for sid in sessions for _ in range(options.tabs)]

    async def produce(index: int, sid: str) -> None:
        await anyio.sleep(index * PUBLISH_INTERVAL / len(sessions))
        run = await library_answer(
            env,
            sid,
            owner=sessions[sid].owner,
            interactions=CHAT,
            tokens=words,
            rate=options.token_rate,
        )
        versions[sid] = run.version

    async def work() -> None:
        async with anyio.create_task_group() as tg:
            for tab in tabs:
                tg.start_soon(partial(tab.read, CHAT, keep_all=True))
            for index, sid in enumerate(sessions):
                tg.start_soon(produce, index, sid)

    bound = options.timeout + tokens / options.token_rate
    got = await measured(server, env.broker.pid, tabs, work(), bound)
    wall, cpu, nats_cpu = got["wall"], got["cpu"], got["nats_cpu"]
    expected = {sid: answered_session(s, CHAT, words) for sid, s in sessions.items()}
    problems = [
        p for tab in tabs if (p := tab.problem(expected[tab.session_id], versions[tab.session_id]))
    ]
    latencies = [s for tab in tabs for s in tab.latencies(env.bridge.times, token_ends(words))]
    delivered = len(latencies)
    return {
        "samples": len(tabs),
        "errors": len(problems),
        "error_kinds": dict.fromkeys(problems[:3], 1),
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
    async with running_servers(args, env={NATS_URL_ENV: env.broker.url}) as servers:
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
    what = f"{options.answers} answers x {options.tabs} tabs"
    goal = Goal(
        f"18 answer load: server CPU per delivered token at {what}, bridge / forwarder",
        "answer_load",
        "cpu_us_per_token",
        ("bridge", "forwarder"),
        BOUND,
    )
    heading = [
        "18 sustained answer load: NatsBridge against a hand-written forwarder",
        f"{what}, {options.tokens} tokens each at {options.token_rate:g} tokens/s through "
        "AnswerStream in the load generator (checkpoints into SQLite); one uvicorn process",
    ]
    return declared(rows, heading=heading, tables=[table], goals=[goal])


PART = Part("answer_load", AnswerLoadOptions, run_round, report, environment=answer_environment)

if __name__ == "__main__":
    sys.exit(run_alone(PART))

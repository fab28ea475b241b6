"""Scale-out: two replicas of the FastAPI example, one database, a two-node NATS cluster.

A client on replica A receives every update written and published through replica B, in order;
reconnecting to replica B, it gets the same state as its snapshot.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import nats
import pytest
from websockets.asyncio.client import ClientConnection, connect

from asgi_session_sync.protocol import apply_patch

from .app_process import AppProcess, NatsProcess, WorkerProcess, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

ALICE = {"Authorization": "Bearer alice"}
WAIT = 20.0


@pytest.fixture
def anyio_backend() -> str:
    # nats-py and the websockets client run on asyncio only.
    return "asyncio"


def nats_cluster(tmp_path: Path, size: int) -> list[NatsProcess]:
    routes = [free_port() for _ in range(size)]
    nodes = []
    for index in range(size):
        node = NatsProcess(free_port(), tmp_path / f"nats-{index}.log")
        others = ",".join(f"nats://127.0.0.1:{port}" for port in routes if port != routes[index])
        node.command += [
            "--cluster_name",
            "scale-out",
            "--cluster",
            f"nats://127.0.0.1:{routes[index]}",
            "--routes",
            others,
        ]
        nodes.append(node)
    return nodes


@asynccontextmanager
async def deployment(tmp_path: Path) -> AsyncIterator[tuple[list[NatsProcess], list[AppProcess]]]:
    nodes = nats_cluster(tmp_path, 2)
    database = f"sqlite+aiosqlite:///{tmp_path / 'shared.sqlite3'}"
    replicas = [
        AppProcess(
            "examples.fastapi_app",
            free_port(),
            {"DATABASE_URL": database, "NATS_URL": node.url},
            tmp_path / f"replica-{name}.log",
        )
        for name, node in zip("ab", nodes, strict=True)
    ]
    # The example's responses are streamed by a worker process; it publishes through B.
    worker = WorkerProcess(
        "examples.fastapi_app",
        # A short answer (1.2 s), still several deltas and a checkpoint or more.
        {"DATABASE_URL": database, "NATS_URL": nodes[1].url, "RESPONSE_TOKENS": "60"},
        tmp_path / "worker.log",
    )
    try:
        for process in (*nodes, *replicas, worker):
            await anyio.to_thread.run_sync(process.start)
        yield nodes, replicas
    finally:
        for process in (worker, *replicas, *nodes):
            process.stop()
    for replica in replicas:
        assert "Traceback" not in replica.output(), replica.output()[-3000:]


async def next_event(ws: ClientConnection) -> dict[str, Any]:
    with anyio.fail_after(WAIT):
        event: dict[str, Any] = json.loads(await ws.recv())
    return event


async def wait_for_route(ws: ClientConnection, node: NatsProcess, session_id: str) -> None:
    """Publish probes through ``node`` until one reaches ``ws``: interest crossed the route."""
    async with AsyncExitStack() as stack:
        client = await nats.connect(node.url)
        stack.push_async_callback(client.close)
        probe = json.dumps({"type": "probe", "session_id": session_id}).encode()
        with anyio.fail_after(WAIT):
            while True:
                await client.publish(f"session_sync.{session_id}", probe)
                with anyio.move_on_after(0.2):
                    if (await next_event(ws))["type"] == "probe":
                        break
        # Probes still in flight arrive before anything published later: drain them.
        await client.flush()


def finished(state: dict[str, Any]) -> bool:
    interactions = state.get("interactions") or [{}]
    return bool(interactions[-1].get("done"))


async def test_updates_through_replica_b_reach_a_client_of_replica_a(tmp_path: Path) -> None:
    async with (
        deployment(tmp_path) as (nodes, (a, b)),
        httpx.AsyncClient(headers=ALICE, timeout=WAIT) as http,
    ):
        created = (await http.post(f"{a.url}/api/sessions", json={"title": "scale"})).json()
        session_id = created["id"]
        ws_path = f"/ws/sessions/{session_id}?token=alice"
        async with connect(a.url.replace("http", "ws") + ws_path) as on_a:
            snapshot = await next_event(on_a)
            assert snapshot["version"] == created["version"]
            await wait_for_route(on_a, nodes[1], session_id)

            response = await http.post(
                f"{b.url}/api/sessions/{session_id}/prompts", json={"prompt": "hello"}
            )
            assert response.status_code == 202
            # The prompt and the claim come as patches, the answer as append deltas (and
            # checkpoints), each chained on the update before.
            seen, state = [snapshot], snapshot["session"]
            while not finished(state):
                event = await next_event(on_a)
                if event["type"] == "session_patch":
                    assert event["base_version"] == seen[-1]["version"], (event, seen[-1])
                    state = apply_patch(state, event["patch"])
                elif event["type"] == "session_update":
                    state = event["session"]
                else:
                    continue
                seen.append(event)
        versions = [event["version"] for event in seen]
        # Every update written through B arrived at A, in order, none missing: the chain above
        # never broke, and no full update (a resync) was needed to mend it.
        assert [event["type"] for event in seen[1:]] == ["session_patch"] * (len(seen) - 1)
        assert versions == sorted(versions)
        assert len(versions) > 3
        assert state["interactions"][0]["status"] == "complete"

        async with connect(b.url.replace("http", "ws") + ws_path) as on_b:
            from_b = await next_event(on_b)
            assert from_b["version"] == seen[-1]["version"]
            assert from_b["session"] == {**state, "version": from_b["version"]}

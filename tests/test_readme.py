"""The README's FastAPI example runs as written and sends the snapshot first."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from asgi_session_sync.testing import connect_websocket

pytestmark = pytest.mark.anyio

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_fastapi_app() -> Any:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    [example] = [block for block in blocks if "app = FastAPI()" in block]
    namespace: dict[str, Any] = {}
    exec(compile(example, str(README), "exec"), namespace)
    return namespace["app"]


async def test_readme_fastapi_example_sends_the_snapshot_first() -> None:
    async with connect_websocket(readme_fastapi_app(), "/ws/sessions/demo") as ws:
        assert await ws.receive_json() == {
            "type": "session_update",
            "session_id": "demo",
            "owner": "alice",
            "session": {"title": "Demo", "interactions": []},
            "version": 1,
        }
        await ws.send_text("ping")
        assert await ws.receive_text() == "ping"

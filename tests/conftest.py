from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from asgi_session_sync.nats import EmbeddedNats


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def nats_server() -> AsyncIterator[EmbeddedNats]:
    """A private nats-server on a free port of 127.0.0.1, stopped after the test.

    nats-py runs on asyncio only: modules using it set ``anyio_backend`` to ``"asyncio"``.
    """
    async with EmbeddedNats() as server:
        yield server

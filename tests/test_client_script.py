from __future__ import annotations

import httpx
import pytest
from litestar import Litestar, asgi
from starlette.applications import Starlette

from asgi_session_sync.client import CLIENT_SCRIPT, client_script_app

pytestmark = pytest.mark.anyio

SCRIPT = CLIENT_SCRIPT.read_bytes()


def starlette_app() -> Starlette:
    app = Starlette()
    app.add_route("/session-sync.js", client_script_app)
    return app


def litestar_app() -> Litestar:
    return Litestar(
        route_handlers=[asgi("/session-sync.js", copy_scope=True)(client_script_app)],
        logging_config=None,
    )


@pytest.mark.parametrize("make_app", [starlette_app, litestar_app], ids=["starlette", "litestar"])
async def test_script_is_served_at_its_exact_path_with_an_etag(make_app: object) -> None:
    transport = httpx.ASGITransport(app=make_app())  # type: ignore[operator]
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        response = await http.get("/session-sync.js")
        assert response.status_code == 200  # no redirect to /session-sync.js/
        assert response.headers["content-type"] == "text/javascript; charset=utf-8"
        assert response.content == SCRIPT
        etag = response.headers["etag"]
        again = await http.get("/session-sync.js", headers={"if-none-match": etag})
        assert again.status_code == 304
        assert again.content == b""
        head = await http.head("/session-sync.js")
        assert head.status_code == 200
        assert head.content == b""


async def test_other_methods_are_refused() -> None:
    transport = httpx.ASGITransport(app=starlette_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        response = await http.post("/session-sync.js")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD"

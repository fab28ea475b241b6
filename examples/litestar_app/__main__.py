"""``python -m examples.litestar_app [api|worker|all]``: see :mod:`examples.chat.processes`."""

from __future__ import annotations

from examples.chat.processes import main, serve

from .app import create_app
from .settings import Settings


def serve_api(settings: Settings) -> None:
    """Serve the API until interrupted; print the URL to open once it listens."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    serve(
        create_app(settings),
        settings,
        ready=(
            f"open http://{host}:{settings.port}/?token=alice "
            f"(and http://{host}:{settings.port}/?token=bob for another user)"
        ),
    )


if __name__ == "__main__":
    main(None, module="examples.litestar_app", settings=Settings, serve_api=serve_api)

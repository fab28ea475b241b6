"""``GET /api/demo``: what the page's "Try it" panel shows.

The API's pid, the running workers' pids (from a roll call, :mod:`.roll_call`), and the
timings the page needs: how long an answer may go without a delta before the page says it
has stalled, and how long a dead worker's lease runs. Nothing here is needed to use the
library: it only lets the demo say which process to kill, and what each kill shows.
"""

from __future__ import annotations

import os
from typing import TypedDict

from asgi_session_sync.nats import NatsBridge

from .roll_call import WorkerView, running_workers
from .settings import ChatSettings
from .worker import PUBLISH_INTERVAL

__all__ = ["DemoView", "demo_view"]


class DemoView(TypedDict):
    """The body of ``GET /api/demo``.

    ``framework`` and ``module`` name the example (``python -m <module>``); ``api_pid`` is
    the process that answered; ``workers`` the workers that answered a roll call just now.
    ``publish_interval`` and ``token_interval`` (seconds) tell the page how long an answer
    may go without a delta before it says the answer has stalled; ``lease_seconds``, how
    long after its worker's last checkpoint a dead worker's answer ends ``interrupted``.
    """

    framework: str
    module: str
    api_pid: int
    workers: list[WorkerView]
    response_tokens: int
    token_interval: float
    publish_interval: float
    lease_seconds: float


async def demo_view(
    settings: ChatSettings, bridge: NatsBridge, *, framework: str, module: str
) -> DemoView:
    """What the page's "Try it" panel shows, now."""
    return {
        "framework": framework,
        "module": module,
        "api_pid": os.getpid(),
        "workers": await running_workers(bridge),
        "response_tokens": settings.response_tokens,
        "token_interval": settings.token_interval,
        "publish_interval": PUBLISH_INTERVAL,
        "lease_seconds": settings.lease_seconds,
    }

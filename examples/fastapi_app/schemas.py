"""What the API returns and what clients receive over the WebSocket: one shape for both."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from examples.chat.models import InteractionStatus


class InteractionView(BaseModel):
    """One interaction as clients see it (:class:`examples.chat.models.InteractionView`).

    ``status``: ``pending`` (no worker has claimed the prompt yet), ``streaming``,
    ``complete``, ``cancelled`` (stopped by the user) or ``interrupted`` (see
    ``interrupted`` for why). ``done``: nothing changes it any more.
    """

    position: int
    prompt: str
    response: str
    status: InteractionStatus
    done: bool
    interrupted: str | None


class SessionView(BaseModel):
    """A session's whole state, as the API documents and returns it.

    The same shape as the snapshot and every live update
    (:class:`examples.chat.models.SessionView`): ``SessionView.model_validate(view)``.
    """

    id: str
    owner: str
    title: str
    version: int
    interactions: list[InteractionView]


class NewSession(BaseModel):
    """Body of ``POST /api/sessions``."""

    title: str = Field(default="New session", min_length=1, max_length=200)


class NewPrompt(BaseModel):
    """Body of ``POST /api/sessions/{session_id}/prompts``."""

    prompt: str = Field(min_length=1, max_length=4000)


class StopResult(BaseModel):
    """Answer of ``POST /api/sessions/{session_id}/interactions/{position}/stop``.

    ``outcome``: ``stopping`` (202: the worker streaming it acknowledged, and ends it
    ``cancelled`` on every socket) or ``cancelled`` (200: it was still pending, and is
    cancelled now).
    """

    position: int
    outcome: Literal["stopping", "cancelled"]


class WorkerInfo(BaseModel):
    """A worker that answered the roll call (:class:`examples.chat.roll_call.WorkerView`)."""

    pid: int
    name: str


class DemoInfo(BaseModel):
    """Answer of ``GET /api/demo``: what the page's "Try it" panel shows
    (:class:`examples.chat.demo.DemoView`).

    ``api_pid``: the API process that answered; ``workers``: those that answered a roll call
    just now. The intervals (seconds) tell the page when an answer has stalled, and when a
    dead worker's lease runs out.
    """

    framework: str
    module: str
    api_pid: int
    workers: list[WorkerInfo]
    response_tokens: int
    token_interval: float
    publish_interval: float
    lease_seconds: float

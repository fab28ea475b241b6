"""What the API returns and what clients receive over the WebSocket: one shape for both."""

from __future__ import annotations

from pydantic import BaseModel, Field


class InteractionView(BaseModel):
    """One interaction as clients see it (:class:`examples.chat.models.InteractionView`)."""

    position: int
    prompt: str
    response: str
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

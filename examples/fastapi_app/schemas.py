"""What the API returns and what clients receive over the WebSocket: one shape for both."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class InteractionView(BaseModel):
    """One interaction as clients see it."""

    model_config = ConfigDict(from_attributes=True)

    position: int
    prompt: str
    response: str
    done: bool


class SessionView(BaseModel):
    """A session's whole state: the snapshot, every live update, and the API's answer.

    Built from a ``ChatSession`` row with its interactions loaded
    (``SessionView.model_validate(row)``).
    """

    model_config = ConfigDict(from_attributes=True)

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

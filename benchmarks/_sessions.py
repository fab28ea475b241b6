"""The sessions every benchmark serves: ids, data, the snapshot frame, the answer being streamed.

A session is a chat: a title and its interactions (position, role, content, creation time), in
memory (a dict lookup, so only the middleware is measured) or stored by
:mod:`benchmarks._database`. Nothing here imports a database driver or a client.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import pydantic_core

from asgi_session_sync import Snapshot
from asgi_session_sync.protocol import AnswerStatus

SNAPSHOT_VERSION = 7
# About 240 bytes per message: a 20-interaction snapshot is ~6.5 KB of JSON, like a short chat.
FILLER = "lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 4


def filler(size: int) -> str:
    """Lorem ipsum of exactly ``size`` characters (:data:`FILLER` is 228)."""
    return (FILLER * (size // len(FILLER) + 1))[:size]


def numbered_ids(count: int) -> list[str]:
    """Ids of ``count`` sessions of the in-memory store: ``s0000``, ``s0001``, ..."""
    return [f"s{i:04d}" for i in range(count)]


def session_id_for(size: int, number: int) -> str:
    """The id of the ``number``-th session of ``size`` interactions: ``n100-003``."""
    return f"n{size}-{number:03d}"


def memory_sessions(sizes: Mapping[str, int], *, text: str = FILLER) -> dict[str, Snapshot]:
    """Sessions of ``sizes[id]`` interactions, each content ``"<id> #<position>: <text>"``,
    owned by ``owner-<id>``, at :data:`SNAPSHOT_VERSION`."""
    return {
        sid: Snapshot(
            {
                "id": sid,
                "title": f"Session {sid}",
                "interactions": [
                    {
                        "position": n,
                        "role": "user" if n % 2 == 0 else "assistant",
                        "content": f"{sid} #{n}: {text}",
                        "created_at": f"2025-01-01T00:{n // 60 % 60:02d}:{n % 60:02d}+00:00",
                    }
                    for n in range(size)
                ],
            },
            owner=f"owner-{sid}",
            version=SNAPSHOT_VERSION,
        )
        for sid, size in sizes.items()
    }


def snapshot_json(session_id: str, snapshot: Snapshot) -> bytes:
    """The snapshot frame as an app encodes it by hand: the event's dict through
    ``pydantic_core.to_json``, the fastest way pydantic offers, the middleware's very bytes."""
    event = {"type": "session_update", "session_id": session_id, "version": snapshot.version}
    event |= {"owner": snapshot.owner, "session": snapshot.session}
    return pydantic_core.to_json(event)


def snapshot_text(session_id: str, snapshot: Snapshot) -> str:
    """:func:`snapshot_json` as the text of a WebSocket frame."""
    return snapshot_json(session_id, snapshot).decode()


def snapshot_event(text: str, version: Any) -> str:
    """The snapshot frame as an event stream's first event, written by hand."""
    return f"event: session_update\nid: {version}\ndata: {text}\n\n"


def answer_tokens(count: int) -> list[str]:
    """``count`` tokens: the words of :data:`FILLER`, each with a leading space (4 to 12
    characters, 7.1 on average; ASCII, so a token's UTF-16 length is its bytes)."""
    words = FILLER.split()
    return [f" {words[i % len(words)]}" for i in range(count)]


def streamed_content(session_id: str, position: int, tokens: int) -> str:
    """An interaction's content once ``tokens`` tokens of a streamed response arrived."""
    return f"{session_id} #{position}:" + "".join(answer_tokens(tokens))


def with_answer(snapshot: Snapshot) -> None:
    """Append the answer being streamed to a chat: ``content`` ``""``, ``status`` streaming."""
    interactions = snapshot.session["interactions"]  # type: ignore[index]
    interactions.append(
        {
            "position": len(interactions),
            "role": "assistant",
            "content": "",
            "status": AnswerStatus.STREAMING.value,
            "created_at": "2025-01-01T01:00:00+00:00",
        }
    )


def answer_sessions(count: int, interactions: int) -> dict[str, Snapshot]:
    """What ``--sessions count --interactions interactions --answer`` serves."""
    sessions = memory_sessions(dict.fromkeys(numbered_ids(count), interactions))
    for snapshot in sessions.values():
        with_answer(snapshot)
    return sessions


def text_path(interactions: int) -> str:
    """The answer's text, after ``interactions`` interactions."""
    return f"/interactions/{interactions}/content"


def status_path(interactions: int) -> str:
    """The answer's status, after ``interactions`` interactions."""
    return f"/interactions/{interactions}/status"


def answered_session(snapshot: Snapshot, interactions: int, tokens: Sequence[str]) -> Any:
    """The session once the answer of ``tokens`` is complete."""
    session: Any = json.loads(json.dumps(snapshot.session))
    answer = session["interactions"][interactions]
    answer |= {"content": "".join(tokens), "status": AnswerStatus.COMPLETE.value}
    return session

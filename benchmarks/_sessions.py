"""The sessions every benchmark serves: their ids, their data, their snapshot, their answer.

A session is a chat: a title and its interactions (messages), each with a position, a role, a
content and a creation time. This module builds them for the in-memory store (a dict lookup,
so that only the middleware is measured); :mod:`benchmarks._database` stores the same chats in
the one database schema. An answer session ends with an assistant interaction being streamed
(``content`` ``""``, ``status`` ``"streaming"``), for the answer parts. Nothing here imports a
database driver or a client, so a server over the memory store stays as small as its app.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from asgi_session_sync import Snapshot
from asgi_session_sync.protocol import AnswerStatus, SessionUpdate

__all__ = [
    "FILLER",
    "SNAPSHOT_VERSION",
    "answer_sessions",
    "answer_tokens",
    "answered_session",
    "filler",
    "memory_sessions",
    "numbered_ids",
    "session_id_for",
    "snapshot_event",
    "snapshot_text",
    "status_path",
    "streamed_content",
    "text_path",
    "with_answer",
]

SNAPSHOT_VERSION = 7
# About 240 bytes per message: a 20-interaction snapshot is ~6.5 KB of JSON, like a short chat.
FILLER = "lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 4


def filler(size: int) -> str:
    """Lorem ipsum of exactly ``size`` characters (the default :data:`FILLER` is 228)."""
    return (FILLER * (size // len(FILLER) + 1))[:size]


def numbered_ids(count: int) -> list[str]:
    """Ids of ``count`` sessions of the in-memory store: ``s0000``, ``s0001``, ..."""
    return [f"s{i:04d}" for i in range(count)]


def session_id_for(size: int, number: int) -> str:
    """The id of the ``number``-th session of ``size`` interactions: ``n100-003``."""
    return f"n{size}-{number:03d}"


def memory_sessions(sizes: Mapping[str, int], *, text: str = FILLER) -> dict[str, Snapshot]:
    """Sessions of ``sizes[id]`` interactions each, with owner and version, for a dict store.

    Each interaction's content is ``"<id> #<position>: <text>"``.
    """
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
            owner=f"user{i % 50}",
            version=SNAPSHOT_VERSION,
        )
        for i, (sid, size) in enumerate(sizes.items())
    }


def streamed_content(session_id: str, position: int, tokens: int) -> str:
    """An interaction's content once ``tokens`` tokens of a streamed response arrived."""
    return f"{session_id} #{position}:" + "".join(answer_tokens(tokens))


def snapshot_text(session_id: str, snapshot: Snapshot) -> str:
    """The snapshot frame, as an app builds it by hand: the library's event, ``to_json``.

    The same JSON the middleware sends (it serialises the same ``SessionUpdate``, leaving out
    the unset ``reset`` member as ``to_json`` does).
    """
    event = SessionUpdate(
        session_id=session_id,
        owner=snapshot.owner,
        session=snapshot.session,
        version=snapshot.version,
    )
    return event.to_json().decode()


def snapshot_event(text: str, version: Any) -> str:
    """The snapshot frame as an event stream's event, written by hand: what the middleware
    sends on a served event stream (``event:``, ``id:`` the version, ``data:`` the JSON)."""
    return f"event: session_update\nid: {version}\ndata: {text}\n\n"


# The answer being streamed.


def with_answer(snapshot: Snapshot) -> None:
    """Add the answer being streamed to a chat of :func:`memory_sessions`, last: an assistant
    interaction with ``content`` ``""`` and ``status`` ``"streaming"``."""
    session = snapshot.session
    assert isinstance(session, dict)
    interactions = session["interactions"]
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
    """What ``--sessions count --interactions interactions --answer`` serves (ids ``s0000``...)."""
    sessions = memory_sessions(dict.fromkeys(numbered_ids(count), interactions))
    for snapshot in sessions.values():
        with_answer(snapshot)
    return sessions


def text_path(interactions: int) -> str:
    """The answer's text in a session of ``interactions`` interactions before it."""
    return f"/interactions/{interactions}/content"


def status_path(interactions: int) -> str:
    """The answer's status in a session of ``interactions`` interactions before it."""
    return f"/interactions/{interactions}/status"


def answer_tokens(count: int) -> list[str]:
    """An answer of ``count`` tokens: the words of :data:`FILLER`, each with a leading space.

    4 to 12 characters each, 7.1 on average; ASCII, so a token's UTF-16 length is its bytes.
    """
    words = FILLER.split()
    return [f" {words[i % len(words)]}" for i in range(count)]


def answered_session(snapshot: Snapshot, interactions: int, tokens: Sequence[str]) -> Any:
    """The session once the answer of ``tokens`` is complete."""
    session: Any = json.loads(json.dumps(snapshot.session))
    session["interactions"][interactions] |= {
        "content": "".join(tokens),
        "status": AnswerStatus.COMPLETE.value,
    }
    return session

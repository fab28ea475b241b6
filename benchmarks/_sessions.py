"""The sessions every benchmark serves: their ids, their data, and their snapshot frame.

A session is a chat: a title and its interactions (messages), each with a position, a role, a
content and a creation time. This module builds them for the in-memory store (a dict lookup,
so that only the middleware is measured); :mod:`benchmarks._database` stores the same chats in
the one database schema. Nothing here imports a database driver, so a server over the memory
store stays as small as the app it stands for.
"""

from __future__ import annotations

from collections.abc import Mapping

from asgi_session_sync import Snapshot
from asgi_session_sync.protocol import SessionUpdate

__all__ = [
    "FILLER",
    "SNAPSHOT_VERSION",
    "filler",
    "memory_sessions",
    "numbered_ids",
    "session_id_for",
    "snapshot_text",
    "streamed_content",
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
    """An interaction's content once ``tokens`` tokens of a streamed response arrived.

    Tokens are the words of :data:`FILLER`, each with its leading space (5 to 12 characters).
    """
    words = FILLER.split()
    return f"{session_id} #{position}:" + "".join(
        f" {words[i % len(words)]}" for i in range(tokens)
    )


def snapshot_text(session_id: str, snapshot: Snapshot) -> str:
    """The snapshot frame, as a bare app builds it: the library's event, ``to_json``.

    The same JSON the middleware sends (it serialises the same ``SessionUpdate``, leaving out
    the unset ``reset`` member as ``to_json`` does).
    """
    return (
        SessionUpdate(
            session_id=session_id,
            owner=snapshot.owner,
            session=snapshot.session,
            version=snapshot.version,
        )
        .to_json()
        .decode()
    )

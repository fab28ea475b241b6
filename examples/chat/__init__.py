"""The chat both examples share: its tables, its store, the response worker and the lease sweeper.

The FastAPI and the Litestar examples differ in their web framework only: the API and the
WebSocket endpoint are theirs; everything below the HTTP layer, and the page, is here, once.

* :mod:`.models`: the tables, and the JSON shape clients see.
* :mod:`.store`: every read and write, each one transaction that moves the session's version.
* :mod:`.worker`: the process that streams responses: it claims a prompt, streams its answer
  through an :class:`~asgi_session_sync.streaming.AnswerStream` (``append`` deltas, a few
  checkpoints a second), and keeps a lease on the interaction while it streams.
* :mod:`.stopping`: what the stop endpoints do: ask the answer's worker, or cancel a prompt
  still pending.
* :mod:`.leases`: the API's sweeper that marks an interaction whose lease expired as interrupted.
* :mod:`.processes`: ``python -m examples.<app> [api|worker]``, and both at once.
* :mod:`.preflight`: the checks each process runs on its settings before it starts.
* :mod:`.page`: the one page both examples serve (``page.html``, ``static/``), at the same paths.
* :mod:`.demo`: ``GET /api/demo``, what the page's "Try it" panel shows (the pids to kill).
* :mod:`.roll_call`: the workers' answers to a roll call over NATS, with their pids.
"""

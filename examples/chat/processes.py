"""``python -m examples.<app> [api|worker|all]``: the API, the worker, or both supervised.

``api`` serves the app with uvicorn (and its private nats-server, unless ``NATS_URL`` is set);
``worker`` streams the responses; ``all`` (the default) starts both as child processes, prints
their pids, restarts either one a second after it dies (so ``kill -9 <pid>`` shows a restart),
and stops both on Ctrl+C or SIGTERM.

The private nats-server admits only the password in ``NATS_PASSWORD``. ``all`` makes one per
run, unless it is set, and gives it to both children in their environment: never on a
command line, which every local account can read with ``ps``. A restarted API starts its
server with the same password, so the worker reconnects. Run apart, both need the same one.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence

import anyio
import anyio.abc

from .worker import WorkerSettings, run_worker

__all__ = ["main"]

logger = logging.getLogger("examples.chat")

# Seconds the supervisor waits before restarting a child that died, and for one to stop.
RESTART_DELAY = 1.0
STOP_TIMEOUT = 10.0
# A child that exits this many times in a row within QUICK_EXIT seconds of starting will not
# start (a port taken by a leftover process, a broken setting): the supervisor gives up.
QUICK_EXITS = 3
QUICK_EXIT = 5.0


def main(
    argv: Sequence[str] | None,
    *,
    module: str,
    serve_api: Callable[[], None],
    worker_settings: Callable[[], WorkerSettings],
) -> None:
    """Run the process ``argv`` names for the example ``module``.

    Args:
        argv: The command-line arguments (default ``sys.argv[1:]``).
        module: The example's package, as ``python -m`` takes it.
        serve_api: Serves the API until interrupted.
        worker_settings: The worker's settings, read when the worker starts.
    """
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=__doc__)
    parser.add_argument(
        "process",
        nargs="?",
        default="all",
        choices=["all", "api", "worker"],
        help="what to run (default: all, the API and a worker, supervised)",
    )
    process = parser.parse_args(argv).process
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if process == "api":
        serve_api()
    elif process == "worker":
        try:
            settings = worker_settings()
        except ValueError as error:
            sys.exit(f"python -m {module} worker: {error}")
        with contextlib.suppress(KeyboardInterrupt):
            anyio.run(run_worker, settings)
    else:
        with contextlib.suppress(KeyboardInterrupt):
            if not anyio.run(supervise, module):
                sys.exit(1)


async def supervise(module: str) -> bool:
    """Run ``python -m <module> api`` and ``... worker``, restarting each when it dies.

    Returns ``False`` when one kept exiting right after it started, and both were stopped.
    """
    gave_up: list[str] = []
    environment = _children_environment()
    async with anyio.create_task_group() as children:
        for process in ("api", "worker"):
            command = [sys.executable, "-m", module, process]
            children.start_soon(
                _keep_running, command, environment, process, children.cancel_scope, gave_up
            )
        # Both, explicitly: a shell starts background jobs with SIGINT ignored, and Python
        # then never raises KeyboardInterrupt; the children may have stopped on it already.
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                children.cancel_scope.cancel()
    return not gave_up


def _children_environment() -> dict[str, str]:
    """This environment, with a ``NATS_PASSWORD`` for the API's private server if it has none.

    Only when the API starts one (no ``NATS_URL``). Made once per launcher, so that a restarted
    API's server takes the password the worker already holds.
    """
    environment = dict(os.environ)
    if not environment.get("NATS_URL") and not environment.get("NATS_PASSWORD"):
        environment["NATS_PASSWORD"] = secrets.token_urlsafe(24)
    return environment


async def _keep_running(
    command: list[str],
    environment: dict[str, str],
    name: str,
    everything: anyio.CancelScope,
    gave_up: list[str],
) -> None:
    quick_exits = 0
    while True:
        # The child shares this terminal's process group: Ctrl+C reaches it directly.
        started = anyio.current_time()
        process = await anyio.open_process(
            command, stdin=subprocess.DEVNULL, stdout=None, stderr=None, env=environment
        )
        print(f"started {name} pid={process.pid}  (kill -9 {process.pid} to crash it)", flush=True)
        try:
            code = await process.wait()
        finally:
            await _stop(process)
        quick_exits = quick_exits + 1 if anyio.current_time() - started < QUICK_EXIT else 0
        if quick_exits >= QUICK_EXITS:
            print(
                f"{name} exited {quick_exits} times right after starting (last code {code}); "
                "giving up. Is another instance still running (a port taken)? Stop it, or set "
                "PORT and NATS_PORT.",
                flush=True,
            )
            gave_up.append(name)
            everything.cancel()
            return
        print(f"{name} exited with {code}; restarting in {RESTART_DELAY}s", flush=True)
        await anyio.sleep(RESTART_DELAY)


async def _stop(process: anyio.abc.Process) -> None:
    # Shielded: the supervisor is being cancelled, and must not leave its child behind.
    with anyio.CancelScope(shield=True):
        if process.returncode is None:
            process.terminate()
            with anyio.move_on_after(STOP_TIMEOUT):
                await process.wait()
        if process.returncode is None:
            process.kill()
        await process.aclose()

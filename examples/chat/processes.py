"""``python -m examples.<app> [api|worker|all]``: the API, the worker, or both supervised.

``api`` serves the app with uvicorn (and its private nats-server, unless ``NATS_URL`` is set);
``worker`` streams the responses; ``all`` (the default) starts both as child processes, prints
their pids, restarts either one a second after it dies (so ``kill -9 <pid>`` shows a restart),
and stops both on Ctrl+C or SIGTERM.

Each checks its settings before it starts anything (see :mod:`.preflight`): a bad one is one
line on stderr, ``error: <VARIABLE> ...`` with the fix, and exit status 2, and the launcher
never restarts a child that stopped on one.

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
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import anyio
import anyio.abc
import uvicorn

from .preflight import check_database, check_ports
from .settings import ChatSettings
from .worker import WorkerSettings, run_worker

__all__ = ["CONFIGURATION_ERROR", "LOG_FORMAT", "configure_logging", "main", "serve"]

CONFIGURATION_ERROR = 2
"""Exit status of a process that refused its settings: the launcher does not restart it."""

# --help's text: plain, as a terminal shows it (the module's docstring is for the docs).
_DESCRIPTION = """\
Run the example's API and its response worker.

  all     both, as child processes (the default): prints their pids, restarts either one
          a second after it dies (so kill -9 <pid> shows a restart), and stops both on
          Ctrl+C or SIGTERM
  api     the API, served by uvicorn, with a private nats-server unless NATS_URL is set
  worker  the worker that streams the answers; it needs the API's NATS_PASSWORD, or NATS_URL

Settings come from the environment variables below. One that cannot work stops the process
before anything starts, with one line naming it, and exit status 2."""

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
"""The one format of every log line of the launcher, the API (uvicorn's lines too) and the
worker: the pid says which process wrote it, as the launcher names each child's pid."""

_Settings = TypeVar("_Settings", bound=ChatSettings)

logger = logging.getLogger("examples.chat")

# Seconds the supervisor waits before restarting a child that died, and for one to stop.
RESTART_DELAY = 1.0
STOP_TIMEOUT = 10.0
# A child that exits this many times in a row within QUICK_EXIT seconds of starting will not
# start (it crashes as it starts): the supervisor gives up. A bad setting never gets here: the
# checks refuse it before anything starts, and a child that refuses one is not restarted.
QUICK_EXITS = 3
QUICK_EXIT = 5.0


def main(
    argv: Sequence[str] | None,
    *,
    module: str,
    settings: type[_Settings],
    serve_api: Callable[[_Settings], None],
) -> None:
    """Run the process ``argv`` names for the example ``module``, once its settings check out.

    A setting that cannot work (see :mod:`.preflight`) ends the process before anything
    starts, with one line on stderr that names it, and exit status :data:`CONFIGURATION_ERROR`.

    Args:
        argv: The command-line arguments (default ``sys.argv[1:]``).
        module: The example's package, as ``python -m`` takes it.
        settings: The example's settings class: read with its ``from_env``, and its
            variables and defaults listed by ``--help``.
        serve_api: Serves the API with these settings until interrupted.
    """
    parser = argparse.ArgumentParser(
        prog=f"python -m {module}",
        description=_DESCRIPTION,
        epilog=settings.environment_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "process",
        nargs="?",
        default="all",
        choices=["all", "api", "worker"],
        help="what to run: all (the default) runs the API and a worker, supervised",
    )
    process = parser.parse_args(argv).process
    configure_logging()
    # The children's environment: the settings checked are the ones they will read.
    environment = _children_environment() if process == "all" else dict(os.environ)
    try:
        checked = _checked(settings.from_env(environment), process)
    except ValueError as error:  # a SettingError too
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(CONFIGURATION_ERROR)
    except KeyboardInterrupt:
        sys.exit(130)  # interrupted while checking (a database slow to answer): quietly
    if process == "api":
        serve_api(checked)
    elif process == "worker":
        with contextlib.suppress(KeyboardInterrupt):
            anyio.run(_run_worker_until_signalled, checked.worker())
    else:
        with contextlib.suppress(KeyboardInterrupt):
            code = anyio.run(supervise, module, environment)
            if code:
                sys.exit(code)


async def _run_worker_until_signalled(settings: WorkerSettings) -> None:
    """Run the worker until SIGINT or SIGTERM, then stop it as a cancellation.

    So the answers it streams end at once, ``interrupted`` with the text they have (the
    worker commits that as it is cancelled), rather than when their leases expire. The
    launcher stops its children with SIGTERM.
    """
    async with anyio.create_task_group() as worker:
        worker.start_soon(run_worker, settings)
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                worker.cancel_scope.cancel()


def configure_logging() -> None:
    """Log INFO and above to stderr in :data:`LOG_FORMAT`, in this process.

    :func:`serve` leaves uvicorn's loggers to this configuration, so the API's lines, the
    worker's and the launcher's read alike.
    """
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, datefmt="%H:%M:%S")


def _checked(settings: _Settings, process: str) -> _Settings:
    """``settings``, once they check out for ``process`` (``api``, ``worker`` or ``all``).

    Raises:
        ValueError: One cannot work; the message names it and the fix.
    """
    if process != "api":
        settings.worker()  # NATS_PASSWORD or NATS_URL
    if process != "worker":
        check_ports(settings)
    anyio.run(check_database, settings)
    return settings


def serve(app: Any, settings: ChatSettings, *, ready: str, **options: Any) -> None:
    """Serve ``app`` with uvicorn on ``HOST``:``PORT``; print ``ready`` once it listens.

    So the page's URL is printed only when the page is there: not when another process
    took the port meanwhile (uvicorn then logs why and exits).

    Args:
        app: The ASGI application.
        settings: Its settings: ``host`` and ``port``.
        ready: The line to print, such as the page's URL.
        options: More of uvicorn's settings. ``log_config`` is ``None`` unless given:
            uvicorn's loggers then write through this process's logging configuration
            (:func:`configure_logging`), in one format with the example's own lines.
    """
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        # Open WebSockets never end on their own: don't wait for them forever on shutdown.
        timeout_graceful_shutdown=5,
        **{"log_config": None, **options},
    )
    server = _AnnouncingServer(config, ready)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:
        sys.exit(3)  # uvicorn's STARTUP_FAILURE, as uvicorn.run exits


class _AnnouncingServer(uvicorn.Server):
    """A uvicorn server that prints a line once it listens."""

    def __init__(self, config: uvicorn.Config, ready: str) -> None:
        super().__init__(config)
        self._ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and not self.should_exit:
            print(self._ready, flush=True)


async def supervise(module: str, environment: Mapping[str, str]) -> int:
    """Run ``python -m <module> api`` and ``... worker``, restarting each when it dies.

    Each gets ``environment``. A child that exits with :data:`CONFIGURATION_ERROR` (it
    refused a setting, and said which) is not restarted: both stop.

    Returns:
        0 when stopped by a signal; 1 when a child kept exiting right after it started;
        :data:`CONFIGURATION_ERROR` when one refused its settings. Both are stopped then.
    """
    outcome: list[int] = []
    async with anyio.create_task_group() as children:
        for process in ("api", "worker"):
            command = [sys.executable, "-m", module, process]
            children.start_soon(
                _keep_running, command, environment, process, children.cancel_scope, outcome
            )
        # Both, explicitly: a shell starts background jobs with SIGINT ignored, and Python
        # then never raises KeyboardInterrupt; the children may have stopped on it already.
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                children.cancel_scope.cancel()
    return outcome[0] if outcome else 0


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
    environment: Mapping[str, str],
    name: str,
    everything: anyio.CancelScope,
    outcome: list[int],
) -> None:
    quick_exits = 0
    while True:
        # The child shares this terminal's process group: Ctrl+C reaches it directly.
        started = anyio.current_time()
        process = await anyio.open_process(
            command, stdin=subprocess.DEVNULL, stdout=None, stderr=None, env=environment
        )
        logger.info("started %s pid=%d  (kill -9 %d to crash it)", name, process.pid, process.pid)
        try:
            code = await process.wait()
        finally:
            await _stop(process)
        if code == CONFIGURATION_ERROR:
            # It said which setting, on stderr: a restart would refuse it again.
            logger.error("%s refused its settings (above); stopping", name)
            outcome.append(CONFIGURATION_ERROR)
            everything.cancel()
            return
        quick_exits = quick_exits + 1 if anyio.current_time() - started < QUICK_EXIT else 0
        if quick_exits >= QUICK_EXITS:
            logger.error(
                "%s exited %d times right after starting (last code %s); giving up: its "
                "output above says why",
                name,
                quick_exits,
                code,
            )
            outcome.append(1)
            everything.cancel()
            return
        logger.warning("%s exited with %s; restarting in %ss", name, code, RESTART_DELAY)
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

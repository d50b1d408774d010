"""The supervisor of several worker processes that share the REST and gRPC ports.

The supervisor binds the port first (so port 0 picks one port for all workers) without
listening on it, then starts each worker with the `spawn` method, which gives it a fresh
interpreter rather than a fork of a process that may hold threads. Each worker binds the same
port with SO_REUSEPORT, and the kernel spreads new connections across the listening workers.
A worker that exits on its own is started again; SIGTERM or SIGINT is passed on to every worker,
which finishes its running requests before it exits.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
from multiprocessing.process import BaseProcess
from typing import Any

from servekit.config.settings import ServerSettings

logger = logging.getLogger(__name__)

# A worker that dies sooner than this after it started is restarted only after this delay, so a
# worker that cannot start does not spin.
_RESTART_DELAY_SECONDS = 1.0
_POLL_SECONDS = 0.2
# How long stopping workers may take, at least; a worker drains for up to its request timeout.
_STOP_TIMEOUT_SECONDS = 60.0
# Workers that exit this soon after starting, this many times in a row, are not restarted.
_QUICK_EXIT_SECONDS = 5.0
_MAX_QUICK_EXITS = 5


def _exit_with_parent(parent: int) -> None:
    # A worker whose supervisor died (kill -9) stops too, instead of serving on unsupervised.
    while os.getppid() == parent:
        time.sleep(_POLL_SECONDS * 5)
    os.kill(os.getpid(), signal.SIGTERM)


def _worker_main(
    settings: dict[str, Any], port: int, index: int, log_settings: tuple[str, str, bool]
) -> None:
    # Runs in the spawned worker: set up logging, bind the shared port and serve.
    from servekit.observability.logging import configure_logging
    from servekit.server.runner import bind_management, run_worker
    from servekit.server.sockets import bind

    configure_logging(*log_settings)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    parsed = ServerSettings.model_validate(settings)
    logger.info("worker %d started (pid %d)", index, os.getpid())
    rest = bind(parsed.rest_api_host, port, reuse_port=True)
    run_worker(parsed, rest, bind_management(parsed, reuse_port=True))


class WorkersFailedError(Exception):
    """The workers kept exiting right after they started."""


class Supervisor:
    """Starts, restarts and stops the worker processes."""

    def __init__(self, settings: ServerSettings) -> None:
        self._settings = settings
        self._context = multiprocessing.get_context("spawn")
        self._workers: dict[int, BaseProcess] = {}
        self._started: dict[int, float] = {}
        self._stopping = False
        self._failed = False
        # Set by a second signal, which stops the workers without draining.
        self._forced = False
        self._quick_exits = 0

    def run(self) -> None:
        """Run the workers until SIGTERM or SIGINT, then stop them and return."""
        from servekit.server.runner import default_options
        from servekit.server.sockets import BindError, bind

        settings = self._settings
        # Invalid settings files stop here with one error, not in every worker over and over.
        default_options(settings)
        # SO_REUSEPORT would let this bind share a port that another server already uses,
        # so a plain bind first proves the port free (and picks one for port 0).
        with bind(settings.rest_api_host, settings.rest_api_port) as probe:
            port = probe.getsockname()[1]
        placeholder = bind(settings.rest_api_host, port, reuse_port=True)
        if settings.port != 0:
            # The workers' gRPC servers share the port with SO_REUSEPORT; prove it free first.
            try:
                bind(settings.rest_api_host, settings.port).close()
            except BindError as exc:
                raise BindError(f"{exc} (the gRPC port)") from None
        management = None
        if settings.model_management_port is not None:
            host = settings.model_management_host
            with bind(host, settings.model_management_port) as probe:
                management_port = probe.getsockname()[1]
            management = bind(host, management_port, reuse_port=True)
            # Every worker binds the same, now known, port.
            self._settings = settings.model_copy(update={"model_management_port": management_port})
        metrics_directory = tempfile.mkdtemp(prefix="servekit-metrics-")
        # Set before any worker starts, because prometheus_client reads it at import time.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_directory
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            logger.info("starting %d workers on port %d", settings.workers, port)
            for index in range(settings.workers):
                self._start(index, port)
            self._watch(port)
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            placeholder.close()
            if management is not None:
                management.close()
            shutil.rmtree(metrics_directory, ignore_errors=True)
            logger.info("all workers stopped")
        if self._failed:
            raise WorkersFailedError("the workers failed to start; see the log above for why")
        if self._forced:
            # Status 1, as from a single process, so a forced stop differs from a clean one.
            raise SystemExit(1)

    def _on_signal(self, sig: int, frame: object) -> None:
        if not self._stopping:
            logger.info("received %s, stopping the workers", signal.Signals(sig).name)
            self._stopping = True
            return
        # A second signal reaches the workers too, which then stop without draining.
        logger.info("received %s again, passing it to the workers", signal.Signals(sig).name)
        self._forced = True
        for process in self._workers.values():
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, sig)

    def _start(self, index: int, port: int) -> None:
        settings = self._settings
        log_settings = (settings.log_level, settings.log_format, settings.access_log)
        process = self._context.Process(
            target=_worker_main,
            args=(settings.model_dump(mode="json", exclude_unset=True), port, index, log_settings),
            name=f"servekit-worker-{index}",
        )
        process.start()
        self._workers[index] = process
        self._started[index] = time.monotonic()

    def _watch(self, port: int) -> None:
        while not self._stopping:
            time.sleep(_POLL_SECONDS)
            for index, process in list(self._workers.items()):
                if process.is_alive() or self._stopping:
                    continue
                self._restart(index, process, port)

    def _restart(self, index: int, process: BaseProcess, port: int) -> None:
        from prometheus_client import multiprocess

        quick = time.monotonic() - self._started[index] < _QUICK_EXIT_SECONDS
        self._quick_exits = self._quick_exits + 1 if quick else 0
        if self._quick_exits >= _MAX_QUICK_EXITS:
            logger.error(
                "workers keep exiting right after they start (%d times in a row); stopping",
                self._quick_exits,
            )
            self._failed = True
            self._stopping = True
            return
        logger.warning(
            "worker %d (pid %s) exited with code %s; starting it again",
            index,
            process.pid,
            process.exitcode,
        )
        if process.pid is not None:
            multiprocess.mark_process_dead(process.pid)  # type: ignore[no-untyped-call]
        if time.monotonic() - self._started[index] < _RESTART_DELAY_SECONDS:
            time.sleep(_RESTART_DELAY_SECONDS)
        if not self._stopping:
            self._start(index, port)

    def _stop_all(self) -> None:
        for process in self._workers.values():
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        drain = self._settings.rest_api_timeout_in_ms / 1000
        deadline = time.monotonic() + max(_STOP_TIMEOUT_SECONDS, drain + 10)
        for process in self._workers.values():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                logger.warning("worker pid %s did not stop in time; killing it", process.pid)
                process.kill()
                process.join()

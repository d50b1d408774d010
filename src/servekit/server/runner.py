"""Start the HTTP and gRPC servers for a set of settings and run them until SIGINT or SIGTERM."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from servekit.batching.config import BatchingConfig
from servekit.config.model_config import load_model_options, read_batching_parameters
from servekit.config.model_server_config import read_model_config_file
from servekit.config.settings import ServerSettings
from servekit.core.manager import ModelManager
from servekit.core.model import RetryPolicy
from servekit.core.options import ServableOptions
from servekit.examples import EXAMPLE_REPOSITORY
from servekit.observability.metrics import Metrics
from servekit.protocols.jsoncodec import dump_json
from servekit.repository.layout import ModelSource, sources_in_repository
from servekit.runtimes.base import RuntimeOptions
from servekit.server.app import ConfigReloader, ServekitApp
from servekit.server.grpc_server import CallRunner, GrpcServer
from servekit.server.grpc_tfserving import TFServingGrpcService
from servekit.server.grpc_v2 import V2GrpcService
from servekit.server.sockets import bind, format_host

logger = logging.getLogger(__name__)
_SWITCH_INTERVAL_SECONDS = 0.0002


def model_sources(settings: ServerSettings) -> list[ModelSource]:
    """List the models the settings name; the example repository when they name none."""
    if settings.model_config_file is not None:
        return read_model_config_file(settings.model_config_file)
    if settings.model_base_path is not None:
        return [ModelSource(settings.model_name, settings.model_base_path)]
    if "model_name" in settings.model_fields_set:
        logger.warning("--model_name is ignored without --model_base_path")
    repository = settings.model_repository or EXAMPLE_REPOSITORY
    sources = sources_in_repository(repository)
    if not sources:
        logger.warning("model repository %s contains no model folders", repository)
    return sources


def default_options(settings: ServerSettings) -> ServableOptions:
    """Build the options every model starts from, before its own servekit.yaml."""
    runtime = RuntimeOptions(
        intra_op_threads=settings.tensorflow_intra_op_parallelism,
        inter_op_threads=settings.tensorflow_inter_op_parallelism,
        spinning=settings.runtime_spinning,
        allow_pickle=settings.allow_pickle,
    )
    batching = BatchingConfig(enabled=settings.enable_batching)
    instances = settings.instances
    if settings.batching_parameters_file is not None:
        batching, threads = read_batching_parameters(settings.batching_parameters_file)
        batching = dataclasses.replace(batching, enabled=settings.enable_batching)
        if threads is not None and "instances" not in settings.model_fields_set:
            instances = threads
    return ServableOptions(instances=instances, runtime=runtime, batching=batching)


def build_app(settings: ServerSettings) -> ServekitApp:
    defaults = default_options(settings)
    metrics = Metrics()
    retry = RetryPolicy(
        max_retries=settings.max_num_load_retries,
        interval_seconds=settings.load_retry_interval_micros / 1_000_000,
    )
    manager = ModelManager(
        model_sources(settings),
        functools.partial(load_model_options, defaults=defaults),
        metrics,
        retry,
        _discoverer(settings),
    )
    return ServekitApp(
        manager,
        metrics,
        settings.max_request_body_bytes,
        settings.rest_api_timeout_in_ms / 1000,
        settings.file_system_poll_wait_seconds,
        _config_reloader(settings),
        settings.enable_model_management,
    )


def _discoverer(settings: ServerSettings) -> Callable[[str], ModelSource | None] | None:
    """Let the management API load folders added to the repository after the start."""
    if settings.model_config_file is not None or settings.model_base_path is not None:
        return None
    repository = settings.model_repository or EXAMPLE_REPOSITORY

    def discover(name: str) -> ModelSource | None:
        # Only a plain folder name directly under the repository, never a path.
        if not name or name.startswith(".") or "/" in name or "\x00" in name:
            return None
        folder = repository / name
        return ModelSource(name, folder) if folder.is_dir() else None

    return discover


def _config_reloader(settings: ServerSettings) -> ConfigReloader | None:
    path = settings.model_config_file
    if path is None or settings.model_config_file_poll_wait_seconds <= 0:
        return None
    return ConfigReloader(
        functools.partial(read_model_config_file, path),
        settings.model_config_file_poll_wait_seconds,
    )


def serve(settings: ServerSettings) -> None:
    """Bind the REST port, load the models and serve until stopped.

    With `--workers N` above 1, a supervisor process starts N worker processes that each bind
    the port with SO_REUSEPORT, so the kernel spreads connections across them.
    """
    if settings.workers > 1:
        from servekit.server.supervisor import Supervisor

        Supervisor(settings).run()
        return
    rest = bind(settings.rest_api_host, settings.rest_api_port)
    run_worker(settings, rest, bind_management(settings))


def run_worker(
    settings: ServerSettings, sock: socket.socket, management: socket.socket | None = None
) -> None:
    """Serve on already bound sockets (REST, and management if separate) until stopped."""
    # Instance threads return from onnxruntime (which released the GIL) wanting it back while
    # the event loop thread holds it. Python makes them wait up to the switch interval (5 ms by
    # default) for every batch; a shorter interval hands the GIL over sooner.
    sys.setswitchinterval(_SWITCH_INTERVAL_SECONDS)
    # Casts that overflow are detected explicitly and rejected with 400, so numpy's warning
    # would only add noise to the log.
    np.seterr(over="ignore")
    app = build_app(settings)
    app.address = _address(sock)
    sockets = [sock]
    if management is not None:
        app.management_port = management.getsockname()[1]
        app.management_address = _address(management)
        sockets.append(management)
    if settings.port != 0:
        app.grpc = build_grpc(settings, app)
    config = uvicorn.Config(
        app,
        loop="uvloop",
        http=_JsonErrorProtocol,
        lifespan="on",
        access_log=False,
        log_config=None,
        server_header=False,
    )
    _Server(config, app, app.request_timeout).run(sockets=sockets)


def build_grpc(settings: ServerSettings, app: ServekitApp) -> GrpcServer:
    """Set up the gRPC server with both APIs over the app's models and metrics."""
    runner = CallRunner(app.metrics, app.request_timeout, settings.grpc_max_message_bytes)
    # The repository methods follow the REST management API, which a separate port confines.
    management = settings.enable_model_management and settings.model_management_port is None
    services = {
        **V2GrpcService(app.manager, management).services(runner),
        **TFServingGrpcService(app.manager, settings.grpc_max_message_bytes).services(runner),
    }
    return GrpcServer(
        settings.rest_api_host,
        settings.port,
        settings.grpc_max_message_bytes,
        services,
        reuse_port=settings.workers > 1,
    )


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{format_host(host)}:{port}"


def bind_management(settings: ServerSettings, reuse_port: bool = False) -> socket.socket | None:
    """Bind the separate management port, if one is configured."""
    if settings.model_management_port is None:
        return None
    return bind(settings.model_management_host, settings.model_management_port, reuse_port)


class _Server(uvicorn.Server):
    """uvicorn's server with a drain on the first signal, the gRPC server, and exit status 0.

    The first SIGINT or SIGTERM starts the drain: readiness and new inference requests get 503
    (the listening socket stays open, so no client sees a refused or reset connection while
    others finish), gRPC stops taking calls, and the requests in flight and in the batchers
    finish. When none is left, or `drain_seconds` have passed, the server stops accepting
    connections and runs the lifespan shutdown that unloads the models. A second signal ends
    the process at once with status 1, dropping the requests still running.

    uvicorn raises the signal again once it has shut down, so the process would end with a
    signal status; servekit returns instead. The gRPC port is bound before the models load, so
    a busy port fails the start at once.
    """

    def __init__(self, config: uvicorn.Config, app: ServekitApp, drain_seconds: float) -> None:
        super().__init__(config)
        self._app = app
        self._drain_seconds = drain_seconds
        self._drain_deadline: float | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        if self._app.grpc is not None:
            self._app.grpc.bind()
        await super().serve(sockets)

    async def on_tick(self, counter: int) -> bool:
        if self._drain_deadline is not None and not self.should_exit:
            if self._app.grpc is not None:
                # gRPC refuses new calls from now on and lets the running ones finish.
                self._app.grpc.begin_stop(self._drain_seconds)
            idle = self._app.active_requests == 0
            if idle or time.monotonic() >= self._drain_deadline:
                if not idle:
                    logger.warning(
                        "drain timed out after %.0f s with %d requests in flight; stopping",
                        self._drain_seconds,
                        self._app.active_requests,
                    )
                self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._app.grpc is not None:
            self._app.grpc.begin_stop(self._drain_seconds)
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self._stop) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _stop(self, sig: int, frame: object) -> None:
        name = signal.Signals(sig).name
        if self._drain_deadline is None and not self.should_exit:
            logger.info(
                "received %s, draining: %d requests in flight, waiting up to %.0f s",
                name,
                self._app.active_requests,
                self._drain_seconds,
            )
            self._app.draining = True
            self._drain_deadline = time.monotonic() + self._drain_seconds
            return
        # Model calls cannot be interrupted, so waiting for them would not be stopping at once.
        logger.warning(
            "received %s again, stopping now with %d requests in flight",
            name,
            self._app.active_requests,
        )
        logging.shutdown()
        os._exit(1)


class _JsonErrorProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, which rejects unparsable HTTP with a JSON error body."""

    def send_400_response(self, msg: str) -> None:
        body = dump_json({"error": f"invalid HTTP request: {msg}"})
        head = (
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head + body)
        self.transport.close()

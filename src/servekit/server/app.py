"""The ASGI application: lifespan, dispatch to protocol routes, errors and request metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from servekit.config.model_config import ConfigError
from servekit.core.errors import NotFoundError, ServekitError, UnavailableError, shorten
from servekit.core.manager import ModelManager
from servekit.observability.metrics import CONTENT_TYPE, Metrics
from servekit.repository.layout import ModelSource
from servekit.server.grpc_server import GrpcServer
from servekit.server.http import (
    ClientDisconnectedError,
    Receive,
    Request,
    Response,
    Scope,
    Send,
    error_response,
    json_response,
    require_method,
)
from servekit.server.tfserving_routes import TFServingRoutes
from servekit.server.v2_routes import V2Routes

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ConfigReloader:
    """Re-reads the model config file every `interval_seconds`."""

    read: Callable[[], list[ModelSource]]
    interval_seconds: float


access_logger = logging.getLogger("servekit.access")
# How often each worker publishes its figures when several workers share the metrics.
_SAMPLE_SECONDS = 1.0


class ServekitApp:
    """Serves one ModelManager over TF Serving REST, KServe V2 REST and `/metrics`."""

    def __init__(
        self,
        manager: ModelManager,
        metrics: Metrics,
        max_request_body_bytes: int,
        request_timeout: float,
        poll_seconds: float = 0.0,
        reloader: ConfigReloader | None = None,
        management: bool = True,
    ) -> None:
        self.manager = manager
        self.metrics = metrics
        self.max_request_body_bytes = max_request_body_bytes
        # Seconds an inference request may take unless its request sets a shorter limit.
        self.request_timeout = request_timeout
        # Seconds between repository scans; 0 scans only at start.
        self.poll_seconds = poll_seconds
        self._poller: asyncio.Task[None] | None = None
        self._reloader = reloader
        self._reloading: asyncio.Task[None] | None = None
        self._config_error = ""
        # Set by the runner once the sockets are bound, for the startup log lines.
        self.address = ""
        self.management_address = ""
        # The separate management port, if any. The management API is served only there then.
        self.management_port: int | None = None
        self._sampler: asyncio.Task[None] | None = None
        # The gRPC server, if the runner set one up; it starts once the models are loaded.
        self.grpc: GrpcServer | None = None
        # Set on the first SIGINT or SIGTERM: readiness and new inference requests get 503
        # while the requests already in flight finish.
        self.draining = False
        # HTTP requests between arrival and response, for the drain to wait on.
        self.active_requests = 0
        self._tfserving = TFServingRoutes(manager)
        self._v2 = V2Routes(manager, management, lambda: self.management_port)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self._startup()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for task in (self._sampler, self._poller, self._reloading):
                    if task is not None:
                        task.cancel()
                if self.grpc is not None:
                    # Calls still running get as long as any request may take.
                    await self.grpc.stop(self.request_timeout)
                await asyncio.get_running_loop().run_in_executor(None, self.manager.unload_all)
                logger.info("servekit stopped")
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _startup(self) -> None:
        # Loading blocks on file reads and runtime set-up, so it runs off the event loop.
        await asyncio.get_running_loop().run_in_executor(None, self.manager.load_all)
        loop = asyncio.get_running_loop()
        if self.metrics.multiprocess:
            self._sampler = loop.create_task(self._sample_process())
        if self.poll_seconds > 0:
            self._poller = loop.create_task(self._poll_repository())
        if self._reloader is not None:
            self._reloading = loop.create_task(self._reload_config(self._reloader))
        if self.management_address:
            logger.info("serving management API on %s", self.management_address)
        if self.grpc is not None:
            await self.grpc.start()
            logger.info("serving gRPC API on %s", self.grpc.address)
        logger.info("serving REST API on %s", self.address or "an ASGI server")

    async def _reload_config(self, reloader: ConfigReloader) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(reloader.interval_seconds)
            await loop.run_in_executor(None, self._apply_config, reloader)

    def _apply_config(self, reloader: ConfigReloader) -> None:
        try:
            sources = reloader.read()
        except ConfigError as exc:
            # Logged once per distinct problem, since every re-read finds it again.
            if str(exc) != self._config_error:
                logger.error("%s; keeping the models already configured", exc)
            self._config_error = str(exc)
            return
        self._config_error = ""
        self.manager.set_sources(sources)

    async def _poll_repository(self) -> None:
        # Scans and loads block on the file system and runtimes, so they run off the loop.
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.poll_seconds)
            await loop.run_in_executor(None, self.manager.poll)

    async def _sample_process(self) -> None:
        # Each worker publishes its own memory and CPU time, because no collector reads the others.
        while True:
            self.metrics.sample_process()
            self.manager.record_load()
            await asyncio.sleep(_SAMPLE_SECONDS)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.active_requests += 1
        try:
            await self._handle_http(scope, receive, send)
        finally:
            self.active_requests -= 1

    async def _handle_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        request = Request.from_scope(
            scope, receive, self.max_request_body_bytes, self.request_timeout
        )
        try:
            response = await self._dispatch(request)
        except ClientDisconnectedError:
            logger.debug("client disconnected before sending %s", shorten(request.raw_path))
            return
        except asyncio.CancelledError:
            if not request.disconnected:
                raise
            # The client disconnected, so its queued work is gone and no response is sent.
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            logger.debug("client disconnected while waiting for %s", shorten(request.raw_path))
            self._observe(request, 499, time.perf_counter() - started)
            return
        except ServekitError as exc:
            self._log_error(request, exc)
            response = error_response(exc)
        except Exception as exc:
            logger.exception("unhandled error on %s %s", request.method, shorten(request.raw_path))
            response = error_response(exc)
        finally:
            request.stop_watching()
        await response.send(send, request.request_id)
        elapsed = time.perf_counter() - started
        self._observe(request, response.status, elapsed)
        if access_logger.isEnabledFor(logging.INFO):
            access_logger.info(
                "%s %s %d %.1fms id=%s",
                request.method,
                shorten(request.raw_path),
                response.status,
                elapsed * 1000,
                request.request_id,
            )

    async def _dispatch(self, request: Request) -> Response:
        path = request.raw_path
        if self.draining and _refused_while_draining(path):
            message = "the server is shutting down; send the request to another replica"
            if path == "/v2/health/ready":
                # The same body as any other not-ready response of this endpoint.
                return json_response({"ready": False, "error": message}, status=503)
            raise UnavailableError(message)
        on_management_port = request.server_port == self.management_port
        if on_management_port and not path.startswith("/v2/repository/"):
            raise NotFoundError(f"unknown path {shorten(path)}; this port serves /v2/repository/")
        if path[:4].lower() == "/v1/":
            return await self._tfserving.handle(request)
        if path == "/v2" or path.startswith("/v2/"):
            return await self._v2.handle(request)
        if path == "/metrics":
            require_method(request, "GET")
            self.manager.record_load()
            return Response(200, self.metrics.render(), CONTENT_TYPE)
        raise NotFoundError(f"unknown path {shorten(path)}")

    def _observe(self, request: Request, status: int, elapsed: float) -> None:
        if request.metric_model is not None:
            self.metrics.observe_request(
                request.metric_model, request.metric_version, request.protocol, status, elapsed
            )

    @staticmethod
    def _log_error(request: Request, exc: ServekitError) -> None:
        # Server faults were already logged with their traceback where they were caught.
        logger.warning(
            "%s %s -> %d: %s",
            request.method,
            shorten(request.raw_path),
            exc.http_status,
            exc.message,
        )


def _refused_while_draining(path: str) -> bool:
    """Tell whether a draining server rejects `path` with 503: readiness and new inference.

    Liveness, metadata, status and `/metrics` stay up, so the orchestrator does not restart a
    draining process and its last figures can still be scraped.
    """
    last = path.rsplit("/", 1)[-1]
    return last in ("ready", "infer") or ":" in last

"""The gRPC server: lifecycle, and what every method shares (errors, deadlines, metrics).

It runs on the worker's event loop beside the HTTP server (grpc.aio), so both transports use
the same ModelManager, batchers and metrics. A call's deadline is the client's gRPC deadline,
capped by the server's request timeout. A call the client cancels (or whose deadline passes)
has its handler cancelled, which takes its rows out of the batcher queue as for a disconnected
HTTP client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from servekit.core.errors import (
    InvalidInputError,
    OverloadedError,
    PayloadTooLargeError,
    ServekitError,
    shorten,
)
from servekit.observability.metrics import Metrics
from servekit.server.sockets import BindError

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("servekit.access")

PROTOCOL = "grpc"
# The HTTP statuses recorded for a call the client cancelled (as nginx logs it) and for one
# whose deadline passed.
_CLIENT_CLOSED = 499
_DEADLINE = 504
_INTERNAL_MESSAGE = "internal error; the server log has details"
_MAX_DETAILS = 2000


class Message(Protocol):
    def SerializeToString(self) -> bytes: ...


@dataclass(slots=True)
class GrpcCall:
    """One call's deadline and the labels it is counted under in the metrics."""

    deadline: float | None
    protocol: str = PROTOCOL
    metric_model: str | None = None
    metric_version: str = ""


Handler = Callable[[Any, GrpcCall], Awaitable[Any]]


class CallRunner:
    """Runs a method's handler and turns its outcome into a gRPC status and metrics."""

    def __init__(self, metrics: Metrics, request_timeout: float, max_message_bytes: int) -> None:
        self._metrics = metrics
        self._request_timeout = request_timeout
        self._max_message_bytes = max_message_bytes

    def unary(
        self, name: str, handler: Handler, request_type: Any
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """Wrap `handler(request, call)` as the unary-unary gRPC method `name`.

        The request is parsed inside the handler, so bytes that are not a valid message get
        INVALID_ARGUMENT instead of grpcio's UNKNOWN with a Python exception name.
        """

        async def method(data: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            return await self._run(name, handler, request_type, data, context)

        return grpc.unary_unary_rpc_method_handler(method, response_serializer=_serialize)

    async def _run(
        self,
        method: str,
        handler: Handler,
        request_type: Any,
        data: bytes,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> Any:
        started = time.perf_counter()
        call = GrpcCall(self._deadline(context))
        try:
            try:
                request = request_type.FromString(data)
            except DecodeError:
                name = request_type.DESCRIPTOR.full_name
                raise InvalidInputError(f"the request is not a valid {name} message") from None
            response = await handler(request, call)
            size = response.ByteSize()
            if size > self._max_message_bytes:
                raise PayloadTooLargeError(
                    f"the response is {size} bytes, more than the {self._max_message_bytes} "
                    "a message may carry; ask for fewer rows or outputs"
                )
        except asyncio.CancelledError:
            # gRPC cancels the handler when the client cancels or its deadline passes.
            expired = call.deadline is not None and time.monotonic() >= call.deadline
            self._observe(call, method, _DEADLINE if expired else _CLIENT_CLOSED, started)
            raise
        except ServekitError as exc:
            self._observe(call, method, exc.http_status, started)
            # Status details travel in a header, which clients reject above 16 KiB.
            message = shorten(exc.message, _MAX_DETAILS)
            # Server faults were already logged with their traceback where they were caught.
            logger.warning("gRPC %s -> %s: %s", method, exc.grpc_code, message)
            await context.abort(grpc.StatusCode[exc.grpc_code], message, _trailing_metadata(exc))
        except Exception:
            self._observe(call, method, 500, started)
            logger.exception("unhandled error in gRPC %s", method)
            await context.abort(grpc.StatusCode.INTERNAL, _INTERNAL_MESSAGE)
        self._observe(call, method, 200, started)
        return response

    def _deadline(self, context: grpc.aio.ServicerContext[Any, Any]) -> float:
        remaining = context.time_remaining()
        limit = self._request_timeout
        if remaining is not None:
            limit = min(limit, max(0.0, remaining))
        return time.monotonic() + limit

    def _observe(self, call: GrpcCall, method: str, code: int, started: float) -> None:
        elapsed = time.perf_counter() - started
        if call.metric_model is not None:
            self._metrics.observe_request(
                call.metric_model, call.metric_version, call.protocol, code, elapsed
            )
        if access_logger.isEnabledFor(logging.INFO):
            access_logger.info("gRPC %s %d %.1fms", method, code, elapsed * 1000)


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def _trailing_metadata(exc: ServekitError) -> tuple[tuple[str, str], ...]:
    if isinstance(exc, OverloadedError):
        return (("retry-after", str(exc.retry_after_seconds)),)
    return ()


class GrpcServer:
    """The grpc.aio server of one worker, serving the given services on one address."""

    def __init__(
        self,
        host: str,
        port: int,
        max_message_bytes: int,
        services: Mapping[str, Mapping[str, grpc.RpcMethodHandler[Any, Any]]],
        reuse_port: bool = False,
    ) -> None:
        self._address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # Off for a single process, so that a port in use by another server is an error
            # instead of a silent share. On for workers, which share the port on purpose.
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ]
        self._services = services
        self._server: grpc.aio.Server | None = None
        self._stopping: asyncio.Task[None] | None = None
        self.address = ""

    def bind(self) -> None:
        """Create the server on the running loop and bind its port; raise BindError."""
        server = grpc.aio.server(options=self._options)
        server.add_generic_rpc_handlers(
            tuple(
                grpc.method_handlers_generic_handler(name, dict(methods))
                for name, methods in self._services.items()
            )
        )
        host = self._address.rsplit(":", 1)[0]
        try:
            port = server.add_insecure_port(self._address)
        except RuntimeError:
            raise BindError(
                f"cannot listen on {self._address} for gRPC: the address is in use or invalid"
            ) from None
        self._server = server
        self.address = f"{host}:{port}"

    async def start(self) -> None:
        if self._server is not None:
            await self._server.start()

    def begin_stop(self, grace_seconds: float) -> None:
        """Stop accepting calls and let running ones finish for up to `grace_seconds`."""
        if self._server is not None and self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(
                self._server.stop(grace_seconds)
            )

    async def stop(self, grace_seconds: float) -> None:
        self.begin_stop(grace_seconds)
        if self._stopping is not None:
            await self._stopping

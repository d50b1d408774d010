"""Minimal ASGI request and response helpers used by the route modules."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
import zlib
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from servekit.core.errors import (
    InternalError,
    InvalidInputError,
    MethodNotAllowedError,
    PayloadTooLargeError,
    ServekitError,
    UnsupportedMediaTypeError,
    shorten,
)
from servekit.protocols.jsoncodec import dump_json

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON_TYPE = "application/json"
TIMEOUT_HEADER = "x-request-timeout-ms"
# zlib window settings for the Content-Encoding values that clients such as tritonclient send.
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
_MAX_REQUEST_ID = 128
# Generated request ids: a random per-process prefix and a counter, which is unique without the
# system call that uuid4 makes for every request.
_ID_PREFIX = os.urandom(6).hex() + "-"
_id_counter = itertools.count(1)
logger = logging.getLogger(__name__)


class ClientDisconnectedError(Exception):
    """The client closed the connection before its request body arrived."""


@dataclass(slots=True)
class Request:
    """An HTTP request: method, undecoded path, lower-case headers and a body reader."""

    method: str
    raw_path: str
    headers: dict[str, str]
    receive: Receive
    body_limit: int
    request_id: str
    # time.monotonic() when the request arrived, and when it must be answered by.
    arrival: float = 0.0
    deadline: float | None = None
    # Set by inference routes so the app can count the request under its model and version.
    metric_model: str | None = None
    metric_version: str = ""
    protocol: str = ""
    # Set when the client disconnected while its request was being handled.
    disconnected: bool = False
    # The local port the request arrived on (the REST or the management port).
    server_port: int = 0
    _watcher: asyncio.Task[None] | None = None

    @classmethod
    def from_scope(cls, scope: Scope, receive: Receive, body_limit: int, timeout: float) -> Request:
        """Build a request whose deadline is `timeout` seconds from now unless it sets one."""
        raw = scope.get("raw_path") or scope["path"].encode()
        headers = {
            key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]
        }
        request_id = headers.get("x-request-id", "")
        if not request_id or len(request_id) > _MAX_REQUEST_ID or not request_id.isprintable():
            request_id = f"{_ID_PREFIX}{next(_id_counter):x}"
        request = cls(
            scope["method"], raw.decode("latin-1"), headers, receive, body_limit, request_id
        )
        request.arrival = time.monotonic()
        request.deadline = request.arrival + timeout
        server = scope.get("server")
        request.server_port = server[1] if server else 0
        return request

    def set_timeout(self, seconds: float) -> None:
        """Shorten the deadline to `seconds` after arrival; the server's limit is a ceiling."""
        deadline = self.arrival + seconds
        if self.deadline is None or deadline < self.deadline:
            self.deadline = deadline

    def timeout_from_header(self) -> None:
        """Apply the X-Request-Timeout-Ms header, if present; raise 400 if it is invalid."""
        text = self.headers.get(TIMEOUT_HEADER)
        if text is None:
            return
        if not text.isascii() or not text.isdigit() or int(text) == 0:
            raise InvalidInputError(
                f"invalid {TIMEOUT_HEADER} header {shorten(text, 40)!r}: "
                "expected a positive number of milliseconds"
            )
        self.set_timeout(int(text) / 1000)

    def watch_disconnect(self) -> None:
        """Cancel the current task if the client disconnects before the response is sent.

        Called once the body has been read, because the watcher consumes `receive` messages.
        """
        handler = asyncio.current_task()
        if handler is not None:
            self._watcher = asyncio.get_running_loop().create_task(self._wait_disconnect(handler))

    async def _wait_disconnect(self, handler: asyncio.Task[Any]) -> None:
        message = await self.receive()
        if message["type"] == "http.disconnect":
            self.disconnected = True
            handler.cancel()

    def stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    async def body(self) -> bytes:
        """Read and decompress the body, raising PayloadTooLargeError once it passes the limit.

        The limit applies both to the bytes received and to the decompressed body.
        """
        encoding = self.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("identity", "", *_WBITS):
            raise UnsupportedMediaTypeError(
                f"unsupported Content-Encoding {shorten(encoding, 40)!r}; use gzip, deflate or none"
            )
        body = await self._read()
        if encoding in _WBITS:
            return self._decompress(body, _WBITS[encoding], encoding)
        return body

    def _decompress(self, body: bytes, wbits: int, encoding: str) -> bytes:
        decompressor = zlib.decompressobj(wbits)
        try:
            data = decompressor.decompress(body, self.body_limit + 1)
        except zlib.error as exc:
            raise InvalidInputError(f"invalid {encoding} body: {exc}") from None
        if len(data) > self.body_limit:
            raise self._too_large(len(data))
        if not decompressor.eof:
            raise InvalidInputError(f"invalid {encoding} body: the compressed data is truncated")
        return data

    async def _read(self) -> bytes:
        declared = self.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.body_limit:
            raise self._too_large(int(declared))
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnectedError
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.body_limit:
                raise self._too_large(size)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self, size: int) -> PayloadTooLargeError:
        return PayloadTooLargeError(
            f"request body of {size} bytes or more exceeds the limit of {self.body_limit} bytes "
            "(set by --max_request_body_bytes)"
        )


@dataclass(slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = JSON_TYPE
    headers: dict[str, str] = field(default_factory=dict)

    async def send(self, send: Send, request_id: str) -> None:
        headers = [
            (b"content-type", self.content_type.encode()),
            (b"content-length", str(len(self.body)).encode()),
            (b"x-request-id", request_id.encode()),
        ]
        headers.extend((key.encode(), value.encode()) for key, value in self.headers.items())
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


def require_method(request: Request, method: str) -> None:
    """Raise MethodNotAllowedError (405 with an Allow header) unless the request uses `method`."""
    if request.method != method:
        raise MethodNotAllowedError(
            f"{request.method} is not allowed on {shorten(request.raw_path)}; use {method}",
            (method,),
        )


def json_response(document: Any, status: int = 200) -> Response:
    return Response(status, dump_json(document))


def error_response(exc: BaseException) -> Response:
    """Map any exception to a JSON error response; unexpected ones become a generic 500."""
    if not isinstance(exc, ServekitError):
        exc = InternalError("internal server error; the server log has details")
    headers = exc.headers()
    if isinstance(exc, PayloadTooLargeError):
        # The rest of the body is never read, so the connection cannot be reused.
        headers["connection"] = "close"
    return Response(exc.http_status, dump_json({"error": exc.message}), headers=headers)

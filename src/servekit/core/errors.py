"""The error hierarchy shared by every protocol.

Each error carries its HTTP status and gRPC code, so one function per transport maps any
exception to a response. Messages are shown to clients: they name the model, version, input or
value at fault and never contain file-system paths or stack traces.
"""

from __future__ import annotations

from typing import ClassVar


class ServekitError(Exception):
    """Root of the errors that servekit reports to clients."""

    http_status: ClassVar[int] = 500
    grpc_code: ClassVar[str] = "INTERNAL"
    # Client mistakes log at warning without a traceback; server faults log with it.
    client_error: ClassVar[bool] = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str]:
        """Return extra response headers (such as Retry-After) for this error."""
        return {}


class InvalidInputError(ServekitError):
    """A malformed body, wrong dtype or shape, unknown input or output, or unknown label."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"
    client_error = True


class NotFoundError(ServekitError):
    """An unknown model, version or path."""

    http_status = 404
    grpc_code = "NOT_FOUND"
    client_error = True


class MethodNotAllowedError(ServekitError):
    """A known path requested with a method it does not support."""

    http_status = 405
    grpc_code = "UNIMPLEMENTED"
    client_error = True

    def __init__(self, message: str, allowed: tuple[str, ...]) -> None:
        super().__init__(message)
        self.allowed = allowed

    def headers(self) -> dict[str, str]:
        return {"allow": ", ".join(self.allowed)}


class PayloadTooLargeError(ServekitError):
    """A request body over the configured limit."""

    http_status = 413
    grpc_code = "RESOURCE_EXHAUSTED"
    client_error = True


class UnsupportedMediaTypeError(ServekitError):
    """A request body in an encoding the server does not read."""

    http_status = 415
    grpc_code = "INVALID_ARGUMENT"
    client_error = True


class OverloadedError(ServekitError):
    """A full queue: the request is rejected at once so the client can back off."""

    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"
    client_error = True
    retry_after_seconds = 1

    def headers(self) -> dict[str, str]:
        return {"retry-after": str(self.retry_after_seconds)}


class DeadlineExceededError(ServekitError):
    """A request that did not finish before its deadline."""

    http_status = 504
    grpc_code = "DEADLINE_EXCEEDED"
    client_error = True


class UnavailableError(ServekitError):
    """A model version that is not ready, or a server that is draining."""

    http_status = 503
    grpc_code = "UNAVAILABLE"


class InternalError(ServekitError):
    """A bug or runtime failure; clients see a generic message."""

    http_status = 500
    grpc_code = "INTERNAL"


def shorten(value: str, limit: int = 200) -> str:
    """Cut a client-supplied value to `limit` characters for use in an error message."""
    if len(value) <= limit:
        return value
    return value[:limit] + "..."

"""Binding of listening sockets, with errors that name the address that failed and why."""

from __future__ import annotations

import socket


class BindError(Exception):
    """An address could not be bound (port in use, unknown host, no permission)."""


def bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """Bind a TCP socket, raising BindError with the reason when the address is unusable."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        raise BindError(f"cannot listen on {format_host(host)}:{port}: {reason}") from None
    return sock


def format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host

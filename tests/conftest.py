"""Fixtures that start the real server in a subprocess on 127.0.0.1 with port 0."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import httpx
import pytest

from tests.toy_models import write_repository

_LISTENING = re.compile(r"serving REST API on (http://\S+)")
_GRPC_LISTENING = re.compile(r"serving gRPC API on (\S+)")
STARTUP_SECONDS = 60


class ServerProcess:
    """A `servekit serve` subprocess whose stderr is collected by a reader thread.

    Every instance is stopped at the end of the test session at the latest, so a failing test
    that skips its own `stop` still leaves no process behind.
    """

    running: ClassVar[list[ServerProcess]] = []

    def __init__(self, *flags: str, env: dict[str, str] | None = None) -> None:
        # gRPC stays off (its default port 8500 would be shared by every test server) unless a
        # test requests it with --port.
        grpc = [] if "--port" in flags else ["--port", "0"]
        command = [
            sys.executable, "-m", "servekit", "serve", "--rest_api_port", "0", *grpc, *flags
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.lines: list[str] = []
        self._url: str | None = None
        self._started = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        ServerProcess.running.append(self)

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            match = _LISTENING.search(line)
            if match and self._url is None:
                self._url = match.group(1)
                self._started.set()
        self._started.set()

    @property
    def url(self) -> str:
        if not self._started.wait(STARTUP_SECONDS) or self._url is None:
            self.stop()
            raise RuntimeError("server did not start:\n" + self.log)
        return self._url

    @property
    def grpc_address(self) -> str:
        """The `host:port` of the gRPC API, once the server has started."""
        self.url  # noqa: B018 (waits for the start)
        for line in self.lines:
            match = _GRPC_LISTENING.search(line)
            if match:
                return match.group(1)
        raise RuntimeError("the server does not serve gRPC:\n" + self.log)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Send `sig` and wait for the exit code; kill the process if it does not stop."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(5)
        if self.process.stderr is not None:
            self.process.stderr.close()
        if self in ServerProcess.running:
            ServerProcess.running.remove(self)
        return self.process.returncode


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for server in list(ServerProcess.running):
        server.stop(signal.SIGKILL, timeout=5)


@pytest.fixture(scope="session")
def toy_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_repository(tmp_path_factory.mktemp("toy_models"))


def free_port() -> int:
    """A port that is free now, for gRPC, whose port 0 means off rather than any port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def toy_server(toy_repository: Path) -> Iterator[ServerProcess]:
    server = ServerProcess("--model_repository", str(toy_repository), "--port", str(free_port()))
    _ = server.url
    yield server
    server.stop()


@pytest.fixture(scope="session")
def example_server() -> Iterator[ServerProcess]:
    """The server as `make serve` starts it: the built-in example models, REST and gRPC."""
    server = ServerProcess("--port", str(free_port()))
    _ = server.url
    yield server
    server.stop()


@pytest.fixture
def toy(toy_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=toy_server.url, timeout=30) as client:
        yield client


@pytest.fixture
def examples(example_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=example_server.url, timeout=30) as client:
        yield client


def assert_json_error(response: httpx.Response, status: int) -> str:
    """Check an error response's status, content type and body; return its message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["error"]
    assert isinstance(body["error"], str)
    assert body["error"]
    assert "Traceback" not in response.text
    return str(body["error"])

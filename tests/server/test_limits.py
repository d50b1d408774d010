"""Body size limits and hostile paths against the real server."""

from __future__ import annotations

import gzip
import json
import socket
import zlib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import ServerProcess, assert_json_error
from tests.toy_models import write_adder

LIMIT = 8 * 1024 * 1024


@pytest.fixture(scope="module")
def limited(toy_repository: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(
        "--model_repository", str(toy_repository), "--max_request_body_bytes", str(LIMIT)
    )
    _ = server.url
    yield server
    server.stop()


def adder_body(size: int) -> bytes:
    """A valid adder request whose JSON is about `size` bytes long."""
    rows = size // len("[1.5,1.5,1.5],")
    data = [[1.5, 1.5, 1.5]] * rows
    body = {"inputs": [{"name": "x", "shape": [rows, 3], "datatype": "FP32", "data": data}]}
    return json.dumps(body, separators=(",", ":")).encode()


def address(server: ServerProcess) -> tuple[str, int]:
    parts = urlsplit(server.url)
    assert parts.hostname is not None
    assert parts.port is not None
    return parts.hostname, parts.port


def test_body_over_limit(limited: ServerProcess) -> None:
    body = adder_body(9 * 1024 * 1024)
    assert len(body) > LIMIT
    response = httpx.post(f"{limited.url}/v2/models/adder/infer", content=body, timeout=30)
    message = assert_json_error(response, 413)
    assert str(LIMIT) in message


def test_body_under_limit(limited: ServerProcess) -> None:
    body = adder_body(7 * 1024 * 1024)
    assert len(body) < LIMIT
    response = httpx.post(f"{limited.url}/v2/models/adder/infer", content=body, timeout=30)
    assert response.status_code == 200


def test_absurd_content_length_rejected_at_once(limited: ServerProcess) -> None:
    with socket.create_connection(address(limited), timeout=10) as sock:
        sock.sendall(
            b"POST /v2/models/adder/infer HTTP/1.1\r\nHost: test\r\n"
            b"Content-Length: 3000000000\r\n\r\n" + b"x" * 100
        )
        sock.shutdown(socket.SHUT_WR)
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 413 ")
    assert b"content-type: application/json" in reply


def test_chunked_body_over_limit(limited: ServerProcess) -> None:
    chunk = b"[" + b"1," * 32767 + b"1]"

    def chunks() -> Iterator[bytes]:
        for _ in range(200):
            yield chunk

    response = httpx.post(f"{limited.url}/v2/models/adder/infer", content=chunks(), timeout=30)
    assert_json_error(response, 413)
    assert httpx.get(f"{limited.url}/v2/health/live").status_code == 200


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A repository with a loadable model placed next to it, outside it."""
    root = tmp_path_factory.mktemp("traversal")
    write_adder(root / "repository")
    write_adder(root, name="secret")
    server = ServerProcess("--model_repository", str(root / "repository"))
    _ = server.url
    yield server
    server.stop()


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/models/..%2F..%2Ftmp%2Fsecret"),
        ("POST", "/v1/models/..%2Fsecret:predict"),
        ("GET", "/v1/models/..%2Fsecret/metadata"),
        ("GET", "/v2/models/%2E%2E%2Fsecret/ready"),
        ("GET", "/v2/models/..%2F..%2Fetc%2Fpasswd"),
        ("POST", "/v2/models/..%2Fsecret/infer"),
        ("GET", "/v1/models/" + "m" * 10_000),
        ("GET", "/v2/models/" + "m" * 10_000),
        ("GET", "/v1/models/bad%00name"),
        ("GET", "/v2/models/bad%00name/ready"),
    ],
)
def test_hostile_model_names(
    guarded: ServerProcess, tmp_path_factory: pytest.TempPathFactory, method: str, path: str
) -> None:
    body = json.dumps({"instances": [[1, 2, 3]]})
    response = httpx.request(method, guarded.url + path, content=body, timeout=10)
    message = assert_json_error(response, 404)
    assert len(message) < 400
    assert str(tmp_path_factory.getbasetemp()) not in message


def test_model_outside_repository_never_loads(guarded: ServerProcess) -> None:
    assert "loaded model secret" not in guarded.log
    assert "loaded model adder" in guarded.log
    status = httpx.get(f"{guarded.url}/v1/models/adder", timeout=10)
    assert status.status_code == 200


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_body(toy: httpx.Client, encoding: str) -> None:
    body = json.dumps({"instances": [[1, 2, 3]]}).encode()
    packed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    response = toy.post(
        "/v1/models/adder:predict", content=packed, headers={"content-encoding": encoding}
    )
    assert response.status_code == 200
    assert response.json() == {"predictions": [[2.0, 3.0, 4.0]]}


def test_compressed_body_over_limit(limited: ServerProcess) -> None:
    packed = gzip.compress(b" " * (LIMIT + 1))
    assert len(packed) < LIMIT
    response = httpx.post(
        f"{limited.url}/v1/models/adder:predict",
        content=packed,
        headers={"content-encoding": "gzip"},
    )
    assert_json_error(response, 413)


def test_corrupt_and_unknown_encodings(toy: httpx.Client) -> None:
    corrupt = toy.post(
        "/v1/models/adder:predict", content=b"not gzip", headers={"content-encoding": "gzip"}
    )
    assert "invalid gzip body" in assert_json_error(corrupt, 400)
    truncated = toy.post(
        "/v1/models/adder:predict",
        content=gzip.compress(b'{"instances": [[1, 2, 3]]}')[:-12],
        headers={"content-encoding": "gzip"},
    )
    assert "truncated" in assert_json_error(truncated, 400)
    unknown = toy.post(
        "/v1/models/adder:predict", content=b"{}", headers={"content-encoding": "br"}
    )
    assert "Content-Encoding" in assert_json_error(unknown, 415)


@pytest.mark.parametrize(
    "request_head",
    [
        b"POST /v1/models/adder:predict HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n",
        b"BREW /v1/models/adder HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /v1/models/\xff HTTP/1.1\r\nHost: t\r\n\r\n",
    ],
)
def test_unparsable_http_gets_json_error(toy_server: ServerProcess, request_head: bytes) -> None:
    with socket.create_connection(address(toy_server), timeout=10) as sock:
        sock.sendall(request_head)
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"content-type: application/json" in head
    assert "invalid HTTP request" in json.loads(body)["error"]

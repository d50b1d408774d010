"""Graceful shutdown: on SIGTERM the server drains its accepted requests, then exits 0."""

from __future__ import annotations

import concurrent.futures
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess, assert_json_error
from tests.toy_models import SLOW_SOURCE, write_python_model

IN_FLIGHT = 10
SLEEP_SECONDS = 3.0


@pytest.fixture
def slow_repository(tmp_path: Path) -> Path:
    # One batch takes all ten requests, so they run together for SLEEP_SECONDS.
    write_python_model(
        tmp_path, "slow", SLOW_SOURCE, "batching: {max_batch_size: 16, max_queue_delay_ms: 300}\n"
    )
    return tmp_path


def post_slow(url: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/models/slow:predict", json={"instances": [[SLEEP_SECONDS]]}, timeout=30
    )


def test_sigterm_drains_accepted_requests(slow_repository: Path) -> None:
    server = ServerProcess(
        "--model_repository", str(slow_repository), "--rest_api_timeout_in_ms", "10000"
    )
    url = server.url
    with concurrent.futures.ThreadPoolExecutor(IN_FLIGHT) as pool:
        accepted = [pool.submit(post_slow, url) for _ in range(IN_FLIGHT)]
        time.sleep(0.5)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        # While the accepted requests run, the port stays open: not ready, no new work.
        readiness = [httpx.get(f"{url}/v2/health/ready", timeout=5) for _ in range(3)]
        ready_body = readiness[0].json()
        liveness = httpx.get(f"{url}/v2/health/live", timeout=5)
        late_tf = httpx.post(f"{url}/v1/models/slow:predict", json={"instances": [[0.0]]})
        late_v2 = httpx.post(
            f"{url}/v2/models/slow/infer",
            json={"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [0]}]},
        )
        results = [future.result() for future in accepted]
    code = server.process.wait(10)
    stopped = time.monotonic() - signalled
    server.stop()

    assert [response.status_code for response in results] == [200] * IN_FLIGHT
    assert all(response.json() == {"predictions": [[SLEEP_SECONDS]]} for response in results)
    assert [response.status_code for response in readiness] == [503] * 3
    assert ready_body["ready"] is False
    assert "shutting down" in ready_body["error"]
    assert liveness.status_code == 200
    assert "shutting down" in assert_json_error(late_tf, 503)
    assert "shutting down" in assert_json_error(late_v2, 503)
    assert code == 0
    # The drain ends with the last response, well before its 10 s limit.
    assert stopped < SLEEP_SECONDS + 1.5
    assert "draining: " in server.log


def test_requests_after_the_drain_are_refused(slow_repository: Path) -> None:
    server = ServerProcess("--model_repository", str(slow_repository))
    url = server.url
    assert server.stop() == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/v2/health/live", timeout=2)


def test_second_signal_stops_at_once(slow_repository: Path) -> None:
    server = ServerProcess(
        "--model_repository", str(slow_repository), "--rest_api_timeout_in_ms", "10000"
    )
    url = server.url
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        accepted = pool.submit(post_slow, url)
        time.sleep(0.5)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(10)
        stopped = time.monotonic() - signalled
        with pytest.raises(httpx.HTTPError):
            accepted.result().raise_for_status()
    server.stop()
    assert stopped < 1.5
    assert code == 1
    assert "again, stopping now with 1 requests in flight" in server.log


def test_workers_drain_on_sigterm(slow_repository: Path) -> None:
    server = ServerProcess("--model_repository", str(slow_repository), "--workers", "2")
    url = server.url
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        accepted = pool.submit(post_slow, url)
        time.sleep(0.5)
        code = server.stop()
        response = accepted.result()
    assert code == 0
    assert response.status_code == 200


def test_second_signal_with_workers_exits_1(slow_repository: Path) -> None:
    server = ServerProcess(
        "--model_repository", str(slow_repository), "--workers", "2",
        "--rest_api_timeout_in_ms", "10000",
    )  # fmt: skip
    url = server.url
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        accepted = pool.submit(post_slow, url)
        time.sleep(0.5)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(10)
        with pytest.raises(httpx.HTTPError):
            accepted.result().raise_for_status()
    server.stop()
    assert code == 1

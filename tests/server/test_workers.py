"""Several worker processes behind one port, supervised by a parent process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess
from tests.observability.test_metrics import samples, value

_WORKER = re.compile(r"worker (\d+) started \(pid (\d+)\)")


def wait_for(predicate: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def worker_pids(server: ServerProcess) -> dict[int, int]:
    """Map each worker index to the pid it most recently started with."""
    return {int(index): int(pid) for index, pid in _WORKER.findall(server.log)}


@pytest.fixture
def two_workers(toy_repository: Path) -> Iterator[ServerProcess]:
    server = ServerProcess("--model_repository", str(toy_repository), "--workers", "2")
    _ = server.url
    wait_for(lambda: server.log.count("serving REST API on") == 2)
    yield server
    server.stop()


def predict(url: str) -> httpx.Response:
    # A new connection each time, so the kernel picks a worker for every request.
    return httpx.post(f"{url}/v1/models/adder:predict", json={"instances": [[1, 2, 3]]})


def test_workers_share_port_and_merge_metrics(two_workers: ServerProcess) -> None:
    for _ in range(40):
        assert predict(two_workers.url).status_code == 200
    with httpx.Client(base_url=two_workers.url) as client:
        found = samples(client)
    labels = {"model": "adder", "version": "1", "protocol": "tfserving", "code": "200"}
    assert value(found, "servekit_requests_total", **labels) == 40.0
    memory_series = [
        dict(labels) for name, labels in found if name == "servekit_worker_resident_memory_bytes"
    ]
    reported = {series["pid"] for series in memory_series}
    assert reported == {str(pid) for pid in worker_pids(two_workers).values()}


def test_crashed_worker_is_restarted(two_workers: ServerProcess) -> None:
    before = worker_pids(two_workers)
    assert len(before) == 2
    os.kill(before[1], signal.SIGKILL)
    # Connections already queued on the killed worker's socket are reset by the kernel, so
    # the requests start only after the supervisor has noticed that the worker exited.
    wait_for(lambda: f"worker 1 (pid {before[1]}) exited" in two_workers.log)
    for _ in range(30):
        assert predict(two_workers.url).status_code == 200
    wait_for(lambda: worker_pids(two_workers).get(1, before[1]) != before[1])
    wait_for(lambda: two_workers.log.count("serving REST API on") == 3)
    assert "worker 1 (pid" in two_workers.log
    assert worker_pids(two_workers)[0] == before[0]
    for _ in range(30):
        assert predict(two_workers.url).status_code == 200


def test_sigterm_stops_every_worker(two_workers: ServerProcess) -> None:
    pids = worker_pids(two_workers).values()
    assert two_workers.stop(signal.SIGTERM) == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert "all workers stopped" in two_workers.log


def test_workers_refuse_a_port_in_use(toy_server: ServerProcess, toy_repository: Path) -> None:
    port = toy_server.url.rsplit(":", 1)[1]
    result = subprocess.run(
        [sys.executable, "-m", "servekit", "serve", "--model_repository", str(toy_repository),
         "--rest_api_port", port, "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert "cannot listen on" in result.stderr


def test_workers_refuse_invalid_settings(tmp_path: Path) -> None:
    parameters = tmp_path / "batching.pbtxt"
    parameters.write_text("max_batch_size { value: 0 }\n")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "servekit", "serve", "--rest_api_port", "0", "--workers", "2",
         "--batching_parameters_file", str(parameters)],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert "max_batch_size" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 20


def test_workers_exit_with_their_supervisor(toy_repository: Path) -> None:
    server = ServerProcess("--model_repository", str(toy_repository), "--workers", "2")
    _ = server.url
    wait_for(lambda: len(worker_pids(server)) == 2)
    pids = list(worker_pids(server).values())
    server.stop(signal.SIGKILL)

    def all_gone() -> bool:
        for pid in pids:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            return False
        return True

    wait_for(all_gone, timeout=20)

"""Instances of models that hold the GIL run in processes of their own."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import ServerProcess
from tests.toy_models import write_python_model

PID_MODEL = """
import os
import time

import numpy as np

from servekit.core.errors import InvalidInputError


class Model:
    inputs = [("x", "FP32", [-1])]
    outputs = [("pid", "INT64", [-1]), ("parent", "INT64", [-1])]

    def predict(self, inputs):
        x = inputs["x"]
        if (x < 0).any():
            raise InvalidInputError("x must not be negative")
        if (x == 13).any():
            raise ValueError("thirteen")
        if (x == 99).any():
            os._exit(3)
        time.sleep(0.2)
        return {
            "pid": np.full(len(x), os.getpid(), dtype=np.int64),
            "parent": np.full(len(x), os.getppid(), dtype=np.int64),
        }
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("models")
    write_python_model(root, "pair", PID_MODEL, "instances: 2\nbatching: {enabled: false}\n")
    write_python_model(
        root, "threads", PID_MODEL,
        "instances: 2\ninstance_kind: thread\nbatching: {enabled: false}\n",
    )  # fmt: skip
    write_python_model(root, "single", PID_MODEL, "batching: {enabled: false}\n")
    server = ServerProcess("--model_repository", str(root))
    server.url  # noqa: B018 (waits for the start)
    yield server
    server.stop()


def answers(server: ServerProcess, model: str, calls: int = 6) -> set[tuple[int, int]]:
    """Return the (process, parent process) pairs that served `calls` concurrent requests."""

    def call(_: int) -> tuple[int, int]:
        response = httpx.post(
            f"{server.url}/v1/models/{model}:predict", json={"instances": [1.0]}, timeout=10
        )
        assert response.status_code == 200, response.text
        prediction = response.json()["predictions"][0]
        return int(prediction["pid"]), int(prediction["parent"])

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        return set(pool.map(call, range(calls)))


def pids(server: ServerProcess, model: str) -> set[int]:
    return {pid for pid, _ in answers(server, model)}


def test_python_instances_run_in_child_processes(server: ServerProcess) -> None:
    seen = answers(server, "pair")
    assert len(seen) == 2
    assert {parent for _, parent in seen} == {server.process.pid}


def test_single_or_thread_instances_in_server(server: ServerProcess) -> None:
    assert pids(server, "threads") == {server.process.pid}
    assert pids(server, "single") == {server.process.pid}


def test_errors_cross_the_process_boundary(server: ServerProcess) -> None:
    url = f"{server.url}/v1/models/pair:predict"
    invalid = httpx.post(url, json={"instances": [-1.0]})
    assert invalid.status_code == 400
    assert invalid.json() == {"error": "x must not be negative"}
    failed = httpx.post(url, json={"instances": [13.0]})
    assert failed.status_code == 500
    assert "thirteen" not in failed.text
    assert any("ValueError: thirteen" in line for line in server.lines)


def test_crashed_process_replaced(server: ServerProcess) -> None:
    before = pids(server, "pair")
    crashed = httpx.post(f"{server.url}/v1/models/pair:predict", json={"instances": [99.0]})
    assert crashed.status_code == 500
    assert "restarted" in crashed.json()["error"]
    after = pids(server, "pair")
    assert len(after) == 2
    assert len(after - before) == 1

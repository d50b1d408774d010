"""The gRPC server's lifecycle: its flags, a busy port, workers sharing it, draining on SIGTERM."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton

from tests.conftest import ServerProcess, free_port
from tests.toy_models import SLOW_SOURCE, write_adder, write_python_model


def adder_input() -> triton.InferInput:
    tensor = triton.InferInput("x", [1, 3], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 3), dtype=np.float32))
    return tensor


def test_grpc_port_in_use(toy_repository: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "servekit", "serve", "--model_repository", str(toy_repository),
             "--rest_api_port", "0", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port} for gRPC" in result.stderr
    assert "Traceback" not in result.stderr


def test_same_port_for_rest_and_grpc_is_rejected() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "servekit", "serve", "--rest_api_port", "9000", "--port", "9000"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--port and --rest_api_port must differ" in result.stderr


def test_port_zero_turns_grpc_off(toy_repository: Path) -> None:
    server = ServerProcess("--model_repository", str(toy_repository), "--port", "0")
    try:
        _ = server.url
        assert "serving gRPC API" not in server.log
    finally:
        server.stop()


def test_workers_share_the_grpc_port(toy_repository: Path) -> None:
    server = ServerProcess(
        "--model_repository", str(toy_repository),
        "--port", str(free_port()),
        "--workers", "2",
    )  # fmt: skip
    try:
        address = server.grpc_address
        client = triton.InferenceServerClient(address)
        try:
            for _ in range(10):
                result = client.infer("adder", [adder_input()])
                assert result.as_numpy("y").tolist() == [[2.0, 2.0, 2.0]]
        finally:
            client.close()
        assert server.log.count("serving gRPC API on") >= 1
    finally:
        assert server.stop() == 0


def test_sigterm_lets_running_grpc_calls_finish(tmp_path: Path) -> None:
    write_python_model(tmp_path, "slow", SLOW_SOURCE, "batching: {enabled: false}\n")
    write_adder(tmp_path)
    server = ServerProcess("--model_repository", str(tmp_path), "--port", str(free_port()))
    client = triton.InferenceServerClient(server.grpc_address)
    outcome: dict[str, Any] = {}

    def slow_call() -> None:
        tensor = triton.InferInput("x", [1, 1], "FP32")
        tensor.set_data_from_numpy(np.array([[1.0]], dtype=np.float32))
        try:
            outcome["result"] = client.infer("slow", [tensor]).as_numpy("y")
        except Exception as exc:  # recorded for the assertion below
            outcome["error"] = exc

    try:
        running = threading.Thread(target=slow_call)
        running.start()
        # Wait until the call is inside the model before the signal.
        assert wait_for_metric(server, 'servekit_inflight_requests{model="slow"')
        code = server.stop()
        running.join(10)
    finally:
        client.close()
    assert outcome.get("error") is None
    assert outcome["result"].tolist() == [[1.0]]
    assert code == 0


def wait_for_metric(server: ServerProcess, series: str, seconds: float = 10) -> bool:
    """Wait until a series of the server's metrics is above zero; False if it never is."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for line in httpx.get(f"{server.url}/metrics").text.splitlines():
            if line.startswith(series) and float(line.split()[-1]) > 0:
                return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("flag", ["--port", "--grpc_max_message_bytes"])
def test_help_lists_grpc_flags(flag: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "servekit", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert flag in result.stdout

"""Versions arriving, leaving and breaking while the server runs and clients keep calling."""

from __future__ import annotations

import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess, assert_json_error
from tests.toy_models import write_adder

POLL = "0.2"
BODY = {"instances": [[1, 2, 3]]}
# adder version N adds N, so every answer tells which version computed it.
ANSWERS = {version: [[1.0 + version, 2.0 + version, 3.0 + version]] for version in (1, 2, 3, 7)}


def wait_for(predicate: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def states(url: str, model: str = "adder") -> dict[str, str]:
    response = httpx.get(f"{url}/v1/models/{model}")
    if response.status_code != 200:
        return {}
    return {entry["version"]: entry["state"] for entry in response.json()["model_version_status"]}


class Traffic:
    """A client that predicts in a loop and records which version answered each request."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.versions: list[int] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self._stop.is_set():
                response = client.post("/v1/models/adder:predict", json=BODY)
                if response.status_code != 200:
                    self.failures.append(f"{response.status_code} {response.text}")
                    continue
                predictions = response.json()["predictions"]
                version = next((v for v, answer in ANSWERS.items() if answer == predictions), None)
                if version is None:
                    self.failures.append(f"unexpected answer {predictions}")
                else:
                    self.versions.append(version)


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    write_adder(tmp_path, version=1, amount=1.0)
    return tmp_path


@pytest.fixture
def server(repository: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(
        "--model_repository", str(repository), "--file_system_poll_wait_seconds", POLL
    )
    _ = process.url
    yield process
    process.stop()


def copy_slowly(source: Path, target: Path) -> None:
    """Write a model file in pieces with pauses, as a slow copy would."""
    data = source.read_bytes()
    target.mkdir(parents=True)
    with open(target / "model.onnx", "wb") as file:
        step = max(1, len(data) // 4)
        for offset in range(0, len(data), step):
            file.write(data[offset : offset + step])
            file.flush()
            time.sleep(0.3)


def test_swap_remove_and_break_under_load(
    server: ServerProcess, repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    staging = tmp_path_factory.mktemp("staging")
    write_adder(staging, version=2, amount=2.0)
    seen_states: set[tuple[str, str]] = set()
    with Traffic(server.url) as traffic:
        wait_for(lambda: len(traffic.versions) > 20)
        copy_slowly(staging / "adder" / "2" / "model.onnx", repository / "adder" / "2")
        wait_for(lambda: bool(traffic.versions) and traffic.versions[-1] == 2)
        seen_states.update(states(server.url).items())
        wait_for(lambda: states(server.url).get("1") == "END")

        shutil.rmtree(repository / "adder" / "2")
        wait_for(lambda: traffic.versions[-1] == 1)
        wait_for(lambda: states(server.url).get("2") == "END")

        broken = repository / "adder" / "3"
        broken.mkdir()
        (broken / "model.onnx").write_bytes(b"not an onnx model")
        wait_for(lambda: states(server.url).get("3") == "END")
        count = len(traffic.versions)
        wait_for(lambda: len(traffic.versions) > count + 20)
    assert traffic.failures == []
    assert set(traffic.versions) == {1, 2}
    assert ("2", "AVAILABLE") in seen_states
    assert traffic.versions[-1] == 1
    status = httpx.get(f"{server.url}/v1/models/adder").json()["model_version_status"]
    by_version = {entry["version"]: entry for entry in status}
    assert by_version["1"]["state"] == "AVAILABLE"
    assert by_version["3"]["status"]["error_code"] != "OK"
    assert by_version["3"]["status"]["error_message"]


def test_half_copied_version_waits(server: ServerProcess, repository: Path) -> None:
    target = repository / "adder" / "5"
    target.mkdir()
    (target / "model.onnx").write_bytes(b"partial")
    time.sleep(0.1)
    # Keep the file changing for several polls: it must never take traffic meanwhile.
    for index in range(6):
        (target / "model.onnx").write_bytes(b"partial" * (index + 2))
        time.sleep(0.15)
        assert states(server.url).get("5") in (None, "END")
        answer = httpx.post(f"{server.url}/v1/models/adder:predict", json=BODY).json()
        assert answer["predictions"] == ANSWERS[1]
    assert "loaded model adder version 5" not in server.log


def test_no_reload_churn(server: ServerProcess) -> None:
    time.sleep(2.5)
    assert len(re.findall(r"loaded model adder version 1 ", server.log)) == 1


def test_storage_gone_keeps_serving(server: ServerProcess, repository: Path) -> None:
    base = repository / "adder"
    hidden = repository.parent / f"{repository.name}-moved"
    base.rename(hidden)
    try:
        time.sleep(1.0)
        response = httpx.post(f"{server.url}/v1/models/adder:predict", json=BODY)
        assert response.status_code == 200
        assert response.json()["predictions"] == ANSWERS[1]
    finally:
        hidden.rename(base)
    assert server.log.count("the loaded versions keep serving") == 1
    wait_for(lambda: "readable again" in server.log)


LABELS = "version_policy: {specific: [1, 2]}\nlabels: {stable: 1, canary: 2}\n"


@pytest.fixture
def labelled(tmp_path: Path) -> Iterator[ServerProcess]:
    write_adder(tmp_path, version=1, amount=1.0)
    write_adder(tmp_path, version=2, amount=2.0)
    write_adder(tmp_path, version=3, amount=3.0)
    (tmp_path / "adder" / "servekit.yaml").write_text(LABELS)
    process = ServerProcess(
        "--model_repository", str(tmp_path), "--file_system_poll_wait_seconds", POLL
    )
    _ = process.url
    yield process
    process.stop()


def test_labels_and_specific_versions(labelled: ServerProcess) -> None:
    url = labelled.url
    assert set(states(url)) == {"1", "2"}
    stable = httpx.post(f"{url}/v1/models/adder/labels/stable:predict", json=BODY)
    assert stable.json()["predictions"] == ANSWERS[1]
    canary = httpx.post(f"{url}/v1/models/adder/labels/canary:predict", json=BODY)
    assert canary.json()["predictions"] == ANSWERS[2]
    latest = httpx.post(f"{url}/v1/models/adder:predict", json=BODY)
    assert latest.json()["predictions"] == ANSWERS[2]
    unknown = httpx.post(f"{url}/v1/models/adder/labels/nope:predict", json=BODY)
    assert assert_json_error(unknown, 400) == "Unrecognized servable version label: nope"
    missing = httpx.post(f"{url}/v1/models/adder/versions/3:predict", json=BODY)
    assert "Specific(adder, 3)" in assert_json_error(missing, 404)
    status = httpx.get(f"{url}/v1/models/adder/labels/stable").json()
    assert [entry["version"] for entry in status["model_version_status"]] == ["1"]
    body = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
    v2 = httpx.post(f"{url}/v2/models/adder/versions/canary/infer", json=body)
    assert v2.json()["outputs"][0]["data"] == [3.0, 4.0, 5.0]
    assert v2.json()["model_version"] == "2"
    assert httpx.get(f"{url}/v2/models/adder/versions/stable/ready").status_code == 200
    assert_json_error(httpx.get(f"{url}/v2/models/adder/versions/9/ready"), 404)
    assert_json_error(httpx.get(f"{url}/v2/models/adder/versions/-1/ready"), 400)


def test_moving_a_label_rolls_back(labelled: ServerProcess, tmp_path: Path) -> None:
    (tmp_path / "adder" / "servekit.yaml").write_text(
        "version_policy: {specific: [1, 2]}\nlabels: {stable: 2, canary: 2}\n"
    )

    def stable_answer() -> object:
        response = httpx.post(f"{labelled.url}/v1/models/adder/labels/stable:predict", json=BODY)
        return response.json().get("predictions")

    wait_for(lambda: stable_answer() == ANSWERS[2])


def test_failed_load_is_retried(tmp_path: Path) -> None:
    write_adder(tmp_path, version=1, amount=1.0)
    broken = tmp_path / "adder" / "2"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"broken")
    server = ServerProcess(
        "--model_repository", str(tmp_path), "--file_system_poll_wait_seconds", POLL,
        "--max_num_load_retries", "2", "--load_retry_interval_micros", "100000",
    )  # fmt: skip
    _ = server.url
    time.sleep(2.0)
    answer = httpx.post(f"{server.url}/v1/models/adder:predict", json=BODY).json()
    server.stop()
    assert server.log.count("will not serve") == 3
    assert answer["predictions"] == ANSWERS[1]


SLOW_ADDER = """
import time

import numpy as np


class Model:
    inputs = [("x", "FP32", [-1, 3])]
    outputs = [("y", "FP32", [-1, 3])]

    def predict(self, inputs):
        time.sleep(0.05)
        return {"y": inputs["x"] + {version}}
"""


def rss(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    match = re.search(r"^process_resident_memory_bytes (\S+)$", text, re.MULTILINE)
    assert match is not None
    return float(match.group(1))


def test_retiring_busy_versions_repeatedly(tmp_path: Path) -> None:
    for version in (1, 2):
        folder = tmp_path / "adder" / str(version)
        folder.mkdir(parents=True)
        (folder / "model.py").write_text(SLOW_ADDER.replace("{version}", str(version)))
    staged = tmp_path / "staged-2"
    (tmp_path / "adder" / "2").rename(staged)
    server = ServerProcess(
        "--model_repository", str(tmp_path), "--file_system_poll_wait_seconds", "0.1"
    )
    url = server.url
    try:
        with Traffic(url) as first, Traffic(url) as second:
            for _ in range(4):
                shutil.copytree(staged, tmp_path / "adder" / "2")
                wait_for(lambda: states(url).get("2") == "AVAILABLE")
                shutil.rmtree(tmp_path / "adder" / "2")
                wait_for(lambda: states(url).get("2") == "END")
                wait_for(lambda: states(url).get("1") == "AVAILABLE")
    finally:
        server.stop()
    assert first.failures == []
    assert second.failures == []
    assert {1, 2} <= set(first.versions + second.versions)
    assert "Traceback" not in server.log


def test_memory_is_flat_over_swaps(tmp_path: Path) -> None:
    write_adder(tmp_path, version=1, amount=1.0)
    staging = tmp_path.parent / f"{tmp_path.name}-staging"
    write_adder(staging, version=2, amount=2.0)
    server = ServerProcess(
        "--model_repository", str(tmp_path), "--file_system_poll_wait_seconds", "0.05"
    )
    url = server.url
    try:
        samples = []
        for cycle in range(50):
            shutil.copytree(staging / "adder" / "2", tmp_path / "adder" / "2")
            wait_for(lambda: states(url).get("2") == "AVAILABLE")
            shutil.rmtree(tmp_path / "adder" / "2")
            wait_for(lambda: states(url).get("1") == "AVAILABLE" and states(url).get("2") == "END")
            if cycle in (4, 49):
                samples.append(rss(url))
    finally:
        server.stop()
    print(f"resident memory after 5 and 50 swaps: {samples[0]:.0f} and {samples[1]:.0f} bytes")
    # After the first cycles have warmed the allocator, 45 more swaps may add only a little.
    assert samples[1] - samples[0] < 20 * 1024 * 1024


SLOW_LOAD = """
import time


class Model:
    inputs = [("x", "FP32", [-1, 3])]
    outputs = [("y", "FP32", [-1, 3])]

    def load(self, directory):
        time.sleep(1.5)

    def predict(self, inputs):
        return {"y": inputs["x"] + 2}
"""


def test_live_and_serving_during_a_slow_load(server: ServerProcess, repository: Path) -> None:
    folder = repository / "adder" / "2"
    folder.mkdir()
    (folder / "model.py").write_text(SLOW_LOAD)
    wait_for(lambda: states(server.url).get("2") == "LOADING")
    started = time.monotonic()
    live = httpx.get(f"{server.url}/v2/health/live")
    ready = httpx.get(f"{server.url}/v2/health/ready")
    answer = httpx.post(f"{server.url}/v1/models/adder:predict", json=BODY)
    assert time.monotonic() - started < 1.0
    assert live.status_code == 200
    assert ready.status_code == 200
    assert answer.json()["predictions"] == ANSWERS[1]
    wait_for(lambda: states(server.url).get("2") == "AVAILABLE")

"""Batching settings from servekit.yaml and TF Serving's batching parameters file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.batching.test_batching import gather, rowcount_body
from tests.conftest import ServerProcess
from tests.toy_models import ROWCOUNT_SOURCE, write_python_model


def rows_seen(response: httpx.Response) -> list[int]:
    outputs = {output["name"]: output for output in response.json()["outputs"]}
    return list(outputs["rows"]["data"])


def test_batching_parameters_file(tmp_path: Path) -> None:
    write_python_model(tmp_path / "models", "rowcount", ROWCOUNT_SOURCE)
    parameters = tmp_path / "batching.pbtxt"
    parameters.write_text(
        "max_batch_size { value: 2 }\n"
        "batch_timeout_micros { value: 50000 }\n"
        "max_enqueued_batches { value: 100 }\n"
        "num_batch_threads { value: 1 }\n"
    )
    server = ServerProcess(
        "--model_repository",
        str(tmp_path / "models"),
        "--batching_parameters_file",
        str(parameters),
    )
    requests = [("/v2/models/rowcount/infer", rowcount_body(10 * i, 1)) for i in range(8)]
    responses = gather(server.url, requests)
    server.stop()
    seen = [rows_seen(response) for response in responses]
    assert all(response.status_code == 200 for response in responses)
    assert max(max(rows) for rows in seen) == 2


def test_allowed_batch_sizes_pad_rows(tmp_path: Path) -> None:
    config = "batching: {max_batch_size: 4, allowed_batch_sizes: [4]}\n"
    write_python_model(tmp_path, "rowcount", ROWCOUNT_SOURCE, config)
    server = ServerProcess("--model_repository", str(tmp_path))
    (response,) = gather(server.url, [("/v2/models/rowcount/infer", rowcount_body(5, 1))])
    server.stop()
    assert response.status_code == 200
    assert rows_seen(response) == [4]
    outputs = {output["name"]: output for output in response.json()["outputs"]}
    assert outputs["y"]["data"] == [6.0, 6.0, 6.0]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("max_batch_size { value: 8 }\nallowed_batch_sizes: 4\n", "allowed_batch_sizes"),
        ("num_batch_threads { value: 0 }\n", "num_batch_threads"),
    ],
)
def test_invalid_batching_parameters_file(tmp_path: Path, content: str, expected: str) -> None:
    parameters = tmp_path / "batching.pbtxt"
    parameters.write_text(content)
    result = subprocess.run(
        [sys.executable, "-m", "servekit", "serve", "--batching_parameters_file", str(parameters)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_model_settings_fail_that_model(tmp_path: Path) -> None:
    write_python_model(tmp_path, "rowcount", ROWCOUNT_SOURCE, "batching: {max_batch_size: 0}\n")
    write_python_model(tmp_path, "other", ROWCOUNT_SOURCE, "instanses: 2\n")
    write_python_model(tmp_path, "fine", ROWCOUNT_SOURCE)
    server = ServerProcess("--model_repository", str(tmp_path))
    statuses = {
        name: httpx.get(f"{server.url}/v1/models/{name}").json()["model_version_status"][0]
        for name in ("rowcount", "other", "fine")
    }
    server.stop()
    assert statuses["rowcount"]["state"] == "END"
    assert "max_batch_size" in statuses["rowcount"]["status"]["error_message"]
    assert statuses["other"]["state"] == "END"
    assert "instanses" in statuses["other"]["status"]["error_message"]
    assert statuses["fine"]["state"] == "AVAILABLE"


FIXED_SOURCE = """
class Model:
    inputs = [("x", "FP32", [2, 3])]
    outputs = [("y", "FP32", [2, 3])]

    def predict(self, inputs):
        return {"y": inputs["x"] + 1}
"""


def test_fixed_shape_model_is_never_padded(tmp_path: Path) -> None:
    config = "batching: {max_batch_size: 4, allowed_batch_sizes: [4]}\n"
    write_python_model(tmp_path, "fixed", FIXED_SOURCE, config)
    server = ServerProcess("--model_repository", str(tmp_path))
    response = httpx.post(
        f"{server.url}/v1/models/fixed:predict", json={"inputs": {"x": [[1, 2, 3], [4, 5, 6]]}}
    )
    server.stop()
    assert response.status_code == 200
    assert response.json() == {"outputs": [[2.0, 3.0, 4.0], [5.0, 6.0, 7.0]]}


def test_invalid_settings_are_explained(tmp_path: Path) -> None:
    cases = {
        "axis0": "batching: {padding: {x: {axes: [0]}}}\n",
        "nosuch": "batching: {padding: {nosuch: {}}}\n",
        "boolean": "instances: true\n",
        "badyaml": "batching: {max_batch_size: [\n",
    }
    for name, config in cases.items():
        write_python_model(tmp_path, name, ROWCOUNT_SOURCE, config)
    server = ServerProcess("--model_repository", str(tmp_path))
    messages = {
        name: httpx.get(f"{server.url}/v1/models/{name}").json()["model_version_status"][0]
        for name in cases
    }
    server.stop()
    for name, status in messages.items():
        assert status["state"] == "END", name
        assert "_ModelFile" not in status["status"]["error_message"], name
        assert "\n" not in status["status"]["error_message"], name
    assert "batching.padding.x.axes.0" in messages["axis0"]["status"]["error_message"]
    assert "'nosuch'" in messages["nosuch"]["status"]["error_message"]
    assert "instances" in messages["boolean"]["status"]["error_message"]
    assert "line" in messages["badyaml"]["status"]["error_message"]

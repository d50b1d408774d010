"""Warmup requests that a version runs before it takes traffic."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from tests.conftest import ServerProcess
from tests.toy_models import write_adder, write_python_model

FAILING_SOURCE = """
class Model:
    inputs = [("x", "FP32", [-1])]
    outputs = [("y", "FP32", [-1])]

    def predict(self, inputs):
        raise RuntimeError("cannot compute")
"""


def warmup_file(root: Path, version: int, name: str, document: dict[str, object]) -> None:
    folder = root / "adder" / str(version) / "warmup"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(document))


def status_of(url: str, model: str) -> dict[str, object]:
    return httpx.get(f"{url}/v1/models/{model}").json()["model_version_status"][0]


def test_warmup_checks_expected_outputs(tmp_path: Path) -> None:
    good = tmp_path / "good"
    write_adder(good)
    v2_request = {
        "inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}],
        "expected_outputs": {"y": [[2, 3, 4]]},
    }
    warmup_file(good, 1, "v2.json", v2_request)
    warmup_file(
        good, 1, "tf.json", {"instances": [[0, 0, 0]], "expected_outputs": {"y": [[1, 1, 1]]}}
    )
    bad = tmp_path / "bad"
    write_adder(bad)
    warmup_file(
        bad, 1, "wrong.json", {"instances": [[0, 0, 0]], "expected_outputs": {"y": [[5, 5, 5]]}}
    )
    write_python_model(bad, "failing", FAILING_SOURCE)
    good_server = ServerProcess("--model_repository", str(good))
    good_status = status_of(good_server.url, "adder")
    good_server.stop()
    bad_server = ServerProcess("--model_repository", str(bad))
    bad_status = status_of(bad_server.url, "adder")
    failing_status = status_of(bad_server.url, "failing")
    bad_server.stop()
    assert good_status["state"] == "AVAILABLE"
    assert bad_status["state"] == "END"
    assert "differs from expected" in bad_status["status"]["error_message"]
    assert failing_status["state"] == "END"
    assert "synthetic request failed" in failing_status["status"]["error_message"]

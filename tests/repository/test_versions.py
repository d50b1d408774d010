"""Version directories on disk and how the server reports them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess, assert_json_error
from tests.toy_models import write_adder


@pytest.fixture(scope="module")
def versioned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`adder` with one real version (7, spelled 00000007) among stray entries."""
    root = tmp_path_factory.mktemp("versions")
    write_adder(root, version=1)
    base = root / "adder"
    (base / "1").rename(base / "00000007")
    write_adder(root, version=1, amount=100.0)
    for name in ("v8", "0.9", ".10", "model", "-3", "99999999999999999999"):
        (base / name).mkdir()
    (base / "12").write_text("not a directory")
    server = ServerProcess("--model_repository", str(root))
    _ = server.url
    yield server
    server.stop()


def test_highest_version_served(versioned: ServerProcess) -> None:
    response = httpx.post(
        f"{versioned.url}/v1/models/adder:predict", json={"instances": [[1, 2, 3]]}
    )
    assert response.status_code == 200
    assert response.json() == {"predictions": [[2.0, 3.0, 4.0]]}


def test_status_lists_only_real_versions(versioned: ServerProcess) -> None:
    response = httpx.get(f"{versioned.url}/v1/models/adder")
    assert response.status_code == 200
    assert response.json() == {
        "model_version_status": [
            {
                "version": "7",
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }


def test_zero_padded_version_addressable(versioned: ServerProcess) -> None:
    response = httpx.get(f"{versioned.url}/v1/models/adder/versions/007")
    assert response.status_code == 200
    assert response.json()["model_version_status"][0]["version"] == "7"


def test_lower_version_not_loaded(versioned: ServerProcess) -> None:
    response = httpx.post(
        f"{versioned.url}/v1/models/adder/versions/1:predict", json={"instances": [[1, 2, 3]]}
    )
    assert_json_error(response, 404)


def test_stray_entries_logged_once(versioned: ServerProcess) -> None:
    log = versioned.log
    for name in ("v8", "0.9", "-3", "99999999999999999999", "12"):
        assert log.count(f"adder/{name}:") == 1, name
    assert "adder/model" not in log
    assert "adder/.10" not in log


def test_status_errors(versioned: ServerProcess) -> None:
    message = assert_json_error(httpx.get(f"{versioned.url}/v1/models/nosuch"), 404)
    assert message == "Could not find any versions of model nosuch"
    message = assert_json_error(httpx.get(f"{versioned.url}/v1/models/adder/versions/3"), 404)
    assert message == "Could not find version 3 of model adder"


def test_metadata_of_latest(versioned: ServerProcess) -> None:
    response = httpx.get(f"{versioned.url}/v1/models/adder/metadata")
    assert response.status_code == 200
    body = response.json()
    assert body["model_spec"] == {"name": "adder", "signature_name": "", "version": "7"}
    signature = body["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["inputs"]["x"]["dtype"] == "DT_FLOAT"
    assert signature["inputs"]["x"]["tensor_shape"]["dim"] == [
        {"size": "-1", "name": ""},
        {"size": "3", "name": ""},
    ]
    assert signature["method_name"] == "tensorflow/serving/predict"


def test_corrupt_model_not_ready(tmp_path: Path) -> None:
    write_adder(tmp_path)
    (tmp_path / "adder" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    server = ServerProcess("--model_repository", str(tmp_path))
    try:
        assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
        ready = httpx.get(f"{server.url}/v2/health/ready")
        assert ready.status_code == 503
        assert ready.json()["ready"] is False
        model_ready = httpx.get(f"{server.url}/v2/models/adder/ready")
        assert model_ready.status_code == 503
        assert model_ready.json()["ready"] is False
        status = httpx.get(f"{server.url}/v1/models/adder").json()["model_version_status"][0]
        assert status["state"] == "END"
        assert status["status"]["error_code"] != "OK"
        assert status["status"]["error_message"]
        assert str(tmp_path) not in status["status"]["error_message"]
        predict = httpx.post(
            f"{server.url}/v1/models/adder:predict", json={"instances": [[1, 2, 3]]}
        )
        assert_json_error(predict, 503)
    finally:
        server.stop()


def test_version_without_model_file(tmp_path: Path) -> None:
    (tmp_path / "empty" / "1").mkdir(parents=True)
    server = ServerProcess("--model_repository", str(tmp_path))
    try:
        status = httpx.get(f"{server.url}/v1/models/empty").json()["model_version_status"][0]
        assert status["state"] == "END"
        assert status["status"]["error_code"] == "NOT_FOUND"
        assert "model.onnx" in status["status"]["error_message"]
    finally:
        server.stop()


def test_empty_repository_not_ready(tmp_path: Path) -> None:
    server = ServerProcess("--model_repository", str(tmp_path))
    try:
        assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
        ready = httpx.get(f"{server.url}/v2/health/ready")
        assert ready.status_code == 503
        assert ready.json()["ready"] is False
        assert_json_error(httpx.get(f"{server.url}/v1/models/adder"), 404)
        assert_json_error(httpx.get(f"{server.url}/v2/models/adder/ready"), 404)
    finally:
        server.stop()

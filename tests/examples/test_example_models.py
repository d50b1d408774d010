"""The built-in example models, served as `make serve` does, against in-process ONNX Runtime."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton

from servekit.examples import EXAMPLE_REPOSITORY
from servekit.examples.build import digits_split, upscale_to_mnist
from tests.conftest import ServerProcess

DIGITS_FILE = EXAMPLE_REPOSITORY / "digits" / "1" / "model.onnx"
MLP_FILE = EXAMPLE_REPOSITORY / "mnist_mlp" / "1" / "model.onnx"


def run_in_process(path: Path, feed: dict[str, np.ndarray[Any, Any]]) -> list[Any]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return list(session.run(None, feed))


@pytest.fixture(scope="module")
def held_out() -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    _, test_x, _, test_y = digits_split()
    return test_x, test_y


@pytest.fixture
def triton_client(example_server: ServerProcess) -> Any:
    client = triton.InferenceServerClient(urlsplit(example_server.url).netloc)
    yield client
    client.close()


def test_model_files_are_small() -> None:
    for path in (DIGITS_FILE, MLP_FILE):
        assert path.stat().st_size < 2 * 1024 * 1024


def test_digits_over_tfserving_matches_in_process(
    examples: httpx.Client, held_out: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]
) -> None:
    pixels, labels = held_out
    expected_labels, expected_probabilities = run_in_process(DIGITS_FILE, {"pixels": pixels})
    response = examples.post("/v1/models/digits:predict", json={"instances": pixels.tolist()})
    assert response.status_code == 200
    predictions = response.json()["predictions"]
    served_labels = np.array([row["label"] for row in predictions])
    served_probabilities = np.array([row["probabilities"] for row in predictions], np.float32)
    assert np.array_equal(served_labels, expected_labels)
    assert np.array_equal(served_probabilities, expected_probabilities)
    assert (served_labels == labels).mean() == (expected_labels == labels).mean()
    assert (served_labels == labels).mean() > 0.95


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_digits_over_v2_matches_in_process(
    triton_client: Any,
    held_out: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]],
    binary: bool,
) -> None:
    pixels, _ = held_out
    expected_labels, expected_probabilities = run_in_process(DIGITS_FILE, {"pixels": pixels})
    tensor = triton.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    outputs = [
        triton.InferRequestedOutput("label", binary_data=binary),
        triton.InferRequestedOutput("probabilities", binary_data=binary),
    ]
    result = triton_client.infer(
        "digits", [tensor], outputs=outputs, model_version="1", request_id="digits-1"
    )
    assert result.get_response()["id"] == "digits-1"
    assert np.array_equal(result.as_numpy("label"), expected_labels)
    assert np.array_equal(result.as_numpy("probabilities"), expected_probabilities)


def test_mnist_mlp_over_v2_matches_in_process(
    triton_client: Any, held_out: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]
) -> None:
    images = upscale_to_mnist(held_out[0][:64])
    (expected,) = run_in_process(MLP_FILE, {"images": images})
    tensor = triton.InferInput("images", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images, binary_data=True)
    result = triton_client.infer("mnist_mlp", [tensor])
    assert np.array_equal(result.as_numpy("probabilities"), expected)


def test_triton_client_health_and_metadata(triton_client: Any) -> None:
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    assert triton_client.is_model_ready("digits")
    metadata = triton_client.get_model_metadata("mnist_mlp")
    assert metadata["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 784]}]
    assert "binary_tensor_data" in triton_client.get_server_metadata()["extensions"]


def test_triton_client_error(triton_client: Any) -> None:
    tensor = triton.InferInput("pixels", [1, 3], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 3), np.float32))
    with pytest.raises(triton.InferenceServerException, match="shape"):
        triton_client.infer("digits", [tensor])


def test_rebuild_script_reproduces_committed_models(tmp_path: Path) -> None:
    """The script rebuilds both models: equal in graph, and in predictions up to BLAS rounding.

    Training sums in an order that depends on the CPU kernel OpenBLAS picks, so the weights
    match byte for byte only on a machine of the same kind as the one that built them.
    """
    subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "servekit.examples.build", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    _, test_x, _, _ = digits_split()
    inputs = {DIGITS_FILE: test_x.astype(np.float32), MLP_FILE: upscale_to_mnist(test_x)}
    for path, rows in inputs.items():
        rebuilt = tmp_path / path.relative_to(EXAMPLE_REPOSITORY)
        sessions = [ort.InferenceSession(str(file)) for file in (path, rebuilt)]
        signatures = [
            [(node.name, node.type, node.shape) for node in [*s.get_inputs(), *s.get_outputs()]]
            for s in sessions
        ]
        assert signatures[0] == signatures[1], path.name
        name = sessions[0].get_inputs()[0].name
        committed, fresh = (session.run(None, {name: rows})[-1] for session in sessions)
        agreement = np.mean(committed.argmax(axis=1) == fresh.argmax(axis=1))
        assert agreement >= 0.99, path.name
        assert np.abs(committed - fresh).max() < 0.1, path.name

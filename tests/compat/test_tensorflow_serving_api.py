"""Wire compatibility: TF Serving's official client (tensorflow-serving-api) against servekit.

Not part of `make test`: tensorflow-serving-api pulls in tensorflow. `make test-compat` installs
it in a virtual environment of its own and runs this file there, while the server runs from the
project's environment (`SERVEKIT_PYTHON`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
apis = pytest.importorskip("tensorflow_serving.apis")

from tensorflow.core.framework import tensor_pb2, types_pb2  # noqa: E402
from tensorflow_serving.apis import (  # noqa: E402
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "src" / "servekit" / "examples" / "models"
SERVER_PYTHON = os.environ.get("SERVEKIT_PYTHON", str(ROOT / ".venv" / "bin" / "python"))
_GRPC = re.compile(r"serving gRPC API on (\S+)")
_REST = re.compile(r"serving REST API on (\S+)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """servekit on 127.0.0.1 with the toy models and the digits example, REST and gRPC."""
    root = tmp_path_factory.mktemp("compat")
    repository = root / "models"
    subprocess.run(
        [SERVER_PYTHON, "-c", "import sys, pathlib; from tests.toy_models import write_repository;"
         " write_repository(pathlib.Path(sys.argv[1]))", str(repository)],
        cwd=ROOT, check=True, timeout=120,
    )  # fmt: skip
    (repository / "adder" / "servekit.yaml").write_text("labels: {stable: 1}\n")
    digits = repository / "digits" / "1"
    digits.mkdir(parents=True)
    (digits / "model.onnx").write_bytes((EXAMPLES / "digits" / "1" / "model.onnx").read_bytes())
    log_path = root / "server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [SERVER_PYTHON, "-m", "servekit", "serve", "--model_repository", str(repository),
             "--rest_api_port", "0", "--port", str(free_port())],
            stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
    try:
        addresses = _wait_for_addresses(log_path, process)
        yield addresses
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


def _wait_for_addresses(log_path: Path, process: subprocess.Popen[bytes]) -> dict[str, str]:
    end = time.monotonic() + 60
    while time.monotonic() < end and process.poll() is None:
        text = log_path.read_text()
        grpc_match, rest_match = _GRPC.search(text), _REST.search(text)
        if grpc_match and rest_match:
            return {"grpc": grpc_match.group(1), "rest": rest_match.group(1)}
        time.sleep(0.1)
    raise RuntimeError("servekit did not start:\n" + log_path.read_text())


@pytest.fixture
def prediction(server: dict[str, str]) -> Iterator[Any]:
    with grpc.insecure_channel(server["grpc"]) as channel:
        yield prediction_service_pb2_grpc.PredictionServiceStub(channel)


def predict_request(model: str, **inputs: Any) -> Any:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(value)
    return request


def test_predict_matches_rest(server: dict[str, str], prediction: Any) -> None:
    rng = np.random.default_rng(3)
    pixels = rng.uniform(0, 16, size=(20, 64)).astype(np.float32)
    # make_tensor_proto writes the values as tensor_content.
    response = prediction.Predict(
        predict_request("digits", pixels=tf.make_tensor_proto(pixels)), timeout=30
    )
    assert response.model_spec.version.value == 1
    body = json.dumps({"inputs": pixels.tolist()}).encode()
    request = urllib.request.Request(f"{server['rest']}/v1/models/digits:predict", data=body)
    with urllib.request.urlopen(request, timeout=30) as reply:
        rest = json.load(reply)["outputs"]
    assert tf.make_ndarray(response.outputs["label"]).tolist() == rest["label"]
    probabilities = tf.make_ndarray(response.outputs["probabilities"])
    assert np.array_equal(probabilities, np.array(rest["probabilities"], dtype=np.float32))


def test_predict_typed_values_and_addressing(prediction: Any) -> None:
    tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[1.0, 2.0, 3.0])
    tensor.tensor_shape.dim.add(size=1)
    tensor.tensor_shape.dim.add(size=3)
    request = predict_request("adder", x=tensor)
    request.model_spec.version.value = 1
    response = prediction.Predict(request, timeout=30)
    assert tf.make_ndarray(response.outputs["y"]).tolist() == [[2.0, 3.0, 4.0]]
    request.model_spec.version_label = "stable"
    assert prediction.Predict(request, timeout=30).model_spec.version.value == 1


def test_predict_strings(prediction: Any) -> None:
    request = predict_request("echo", text=tf.make_tensor_proto([b"hello", b"\xff"]))
    response = prediction.Predict(request, timeout=30)
    assert tf.make_ndarray(response.outputs["text_bytes"]).tolist() == [b"hello", b"\xff"]
    assert tf.make_ndarray(response.outputs["length"]).tolist() == [5, 1]


@pytest.mark.parametrize(
    ("model", "value", "code"),
    [
        ("no_such_model", np.ones((1, 3), np.float32), grpc.StatusCode.NOT_FOUND),
        ("adder", np.ones((1, 3), np.float64), grpc.StatusCode.INVALID_ARGUMENT),
        ("adder", np.ones((1, 2), np.float32), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_predict_errors(prediction: Any, model: str, value: Any, code: grpc.StatusCode) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        prediction.Predict(predict_request(model, x=tf.make_tensor_proto(value)), timeout=30)
    assert caught.value.code() is code


def test_get_model_metadata(prediction: Any) -> None:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "digits"
    response = prediction.GetModelMetadata(request, timeout=30)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    signature = signatures.signature_def["serving_default"]
    assert signature.inputs["pixels"].dtype == types_pb2.DT_FLOAT
    assert [dim.size for dim in signature.inputs["pixels"].tensor_shape.dim] == [-1, 64]
    assert sorted(signature.outputs) == ["label", "probabilities"]


def test_get_model_status(server: dict[str, str]) -> None:
    with grpc.insecure_channel(server["grpc"]) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "adder"
        response = stub.GetModelStatus(request, timeout=30)
    (status,) = response.model_version_status
    assert status.version == 1
    assert status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE


def example(**features: list[float]) -> Any:
    message = tf.train.Example()
    for name, values in features.items():
        message.features.feature[name].float_list.value.extend(values)
    return message


def test_classify_and_regress(prediction: Any) -> None:
    regress = regression_pb2.RegressionRequest()
    regress.model_spec.name = "hp"
    regress.input.example_list.examples.extend([example(x=[1.0]), example(x=[2.0])])
    response = prediction.Regress(regress, timeout=30)
    assert [item.value for item in response.result.regressions] == [2.5, 3.0]
    classify = classification_pb2.ClassificationRequest()
    classify.model_spec.name = "digits"
    classify.input.example_list.examples.append(example(pixels=[0.0] * 64))
    result = prediction.Classify(classify, timeout=30).result
    (classification,) = result.classifications
    assert [item.label for item in classification.classes] == [str(i) for i in range(10)]
    assert abs(sum(item.score for item in classification.classes) - 1.0) < 1e-4

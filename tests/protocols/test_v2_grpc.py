"""KServe V2 over gRPC against the real server, with tritonclient.grpc and its own messages."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from servekit.examples import EXAMPLE_REPOSITORY
from tests.conftest import ServerProcess, free_port
from tests.toy_models import (
    ALL_TYPES,
    SLOW_SOURCE,
    write_adder,
    write_python_model,
)

DIGITS_FILE = EXAMPLE_REPOSITORY / "digits" / "1" / "model.onnx"


@pytest.fixture
def client(toy_server: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(toy_server.grpc_address)
    yield client
    client.close()


@pytest.fixture
def stub(toy_server: ServerProcess) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(toy_server.grpc_address) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def fp32_input(array: np.ndarray[Any, Any], name: str = "x") -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    return tensor


def grpc_code(exc: InferenceServerException) -> str:
    return str(exc.status())


def test_health_and_server_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata.name == "servekit"
    assert metadata.version


def test_model_ready(client: triton.InferenceServerClient) -> None:
    assert client.is_model_ready("adder")
    assert client.is_model_ready("adder", "1")
    assert not client.is_model_ready("adder", "9")
    assert not client.is_model_ready("adder", "no_such_label")
    assert not client.is_model_ready("no_such_model")


def test_model_metadata(client: triton.InferenceServerClient) -> None:
    metadata = client.get_model_metadata("twoin", as_json=True)
    assert metadata == {
        "name": "twoin",
        "versions": ["1"],
        "platform": "onnx_onnxv1",
        "inputs": [
            {"name": "a", "datatype": "FP32", "shape": ["-1", "2"]},
            {"name": "b", "datatype": "INT64", "shape": ["-1"]},
        ],
        "outputs": [
            {"name": "sum", "datatype": "FP32", "shape": ["-1"]},
            {"name": "prob", "datatype": "FP32", "shape": ["-1", "2"]},
        ],
    }


def test_infer_raw(client: triton.InferenceServerClient) -> None:
    x = np.array([[1.5, -2.0, 0.25], [3.0, 4.0, 5.0]], dtype=np.float32)
    result = client.infer("adder", [fp32_input(x)], request_id="r-1")
    assert np.array_equal(result.as_numpy("y"), x + 1)
    response = result.get_response()
    assert response.id == "r-1"
    assert response.model_version == "1"
    assert len(response.raw_output_contents) == 1


def test_infer_by_version_and_requested_outputs(client: triton.InferenceServerClient) -> None:
    a = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    b = triton.InferInput("b", [2], "INT64")
    b.set_data_from_numpy(np.array([10, 20], dtype=np.int64))
    outputs = [triton.InferRequestedOutput("sum")]
    result = client.infer("twoin", [fp32_input(a, "a"), b], model_version="1", outputs=outputs)
    assert np.array_equal(result.as_numpy("sum"), np.array([13.0, 27.0], dtype=np.float32))


def test_digits_match_in_process_onnxruntime(example_server: ServerProcess) -> None:
    rng = np.random.default_rng(7)
    pixels = rng.uniform(0, 16, size=(25, 64)).astype(np.float32)
    session = ort.InferenceSession(str(DIGITS_FILE), providers=["CPUExecutionProvider"])
    expected_labels, expected_probabilities = session.run(None, {"pixels": pixels})
    client = triton.InferenceServerClient(example_server.grpc_address)
    try:
        result = client.infer("digits", [fp32_input(pixels, "pixels")])
    finally:
        client.close()
    assert np.array_equal(result.as_numpy("label"), expected_labels)
    assert np.array_equal(result.as_numpy("probabilities"), expected_probabilities)


def test_bytes_tensors(client: triton.InferenceServerClient) -> None:
    text = np.array([b"hello", b"", b"\xff\x00 binary"], dtype=object)
    tensor = triton.InferInput("text", [3], "BYTES")
    tensor.set_data_from_numpy(text)
    result = client.infer("echo", [tensor])
    assert result.as_numpy("text_bytes").tolist() == text.tolist()
    assert result.as_numpy("length").tolist() == [5, 0, 9]


def typed_request(model: str, tensors: list[tuple[str, str, list[int], str, list[Any]]]) -> Any:
    request = service_pb2.ModelInferRequest(model_name=model)
    for name, datatype, shape, field, values in tensors:
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        getattr(tensor.contents, field).extend(values)
    return request


TYPED_VALUES = {
    "BOOL": ("bool_contents", [True, False]),
    "UINT8": ("uint_contents", [0, 255]),
    "UINT16": ("uint_contents", [0, 65535]),
    "UINT32": ("uint_contents", [0, 2**32 - 1]),
    "UINT64": ("uint64_contents", [0, 2**64 - 1]),
    "INT8": ("int_contents", [-128, 127]),
    "INT16": ("int_contents", [-32768, 32767]),
    "INT32": ("int_contents", [-(2**31), 2**31 - 1]),
    "INT64": ("int64_contents", [-(2**63), 2**63 - 1]),
    "FP32": ("fp32_contents", [1.5, -0.25]),
    "FP64": ("fp64_contents", [1e300, -2.5]),
    "BYTES": ("bytes_contents", [b"a", b"\xff"]),
}


def test_typed_contents_round_trip(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    tensors = [
        (datatype.lower(), datatype, [2], field, values)
        for datatype, (field, values) in TYPED_VALUES.items()
    ]
    response = stub.ModelInfer(typed_request("identity_typed", tensors), timeout=30)
    # A typed request gets a typed response.
    assert not response.raw_output_contents
    outputs = {output.name: output for output in response.outputs}
    for datatype, (field, values) in TYPED_VALUES.items():
        output = outputs[datatype.lower() + "_out"]
        assert (output.datatype, list(output.shape)) == (datatype, [2])
        assert list(getattr(output.contents, field)) == values, datatype


def test_fp16_needs_raw_contents(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = typed_request("identity", [("fp16", "FP16", [1], "fp32_contents", [1.0])])
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=30)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "raw_input_contents" in caught.value.details()


def test_all_types_raw(client: triton.InferenceServerClient) -> None:
    inputs = []
    expected = {}
    for datatype in ALL_TYPES:
        if datatype == "BYTES":
            array = np.array([b"x", b"yz"], dtype=object)
        elif datatype == "FP16":
            array = np.array([1.5, -65504.0], dtype=np.float16)
        else:
            array = np.array([1, 0], dtype=triton_dtype(datatype))
        tensor = triton.InferInput(datatype.lower(), [2], datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
        expected[datatype.lower() + "_out"] = array
    result = client.infer("identity", inputs)
    for name, array in expected.items():
        assert result.as_numpy(name).tolist() == array.tolist(), name


def triton_dtype(datatype: str) -> Any:
    from tritonclient.utils import triton_to_np_dtype

    return triton_to_np_dtype(datatype)


@pytest.mark.parametrize(
    ("request_fields", "expected"),
    [
        ([("x", "FP32", [2, 3], "fp32_contents", [1.0] * 3)], "needs 6"),
        ([("x", "FP32", [1, 3], "int_contents", [1] * 3)], "FP32 values go in fp32_contents"),
        ([("x", "FP64", [1, 3], "fp64_contents", [1.0] * 3)], "datatype FP64"),
        ([("x", "FP33", [1, 3], "fp32_contents", [1.0] * 3)], "invalid datatype"),
        ([("y", "FP32", [1, 3], "fp32_contents", [1.0] * 3)], "unknown input 'y'"),
        ([("x", "FP32", [1, 1], "fp32_contents", [1.0])], "shape [1, 1]"),
        ([("x", "FP32", [-1, 3], "fp32_contents", [1.0] * 3)], "shape"),
        ([("x", "FP32", [1, 3], "fp32_contents", [1.0] * 3)] * 2, "more than once"),
        ([("x", "FP32", [0, 2**62], "fp32_contents", [])], "too large"),
        ([("x", "FP32", [1] * 70, "fp32_contents", [1.0])], "70 dimensions"),
        ([("x" * 20000, "FP32", [1, 3], "fp32_contents", [1.0] * 3)], "unknown input"),
        ([("x", "F" * 20000, [1, 3], "fp32_contents", [1.0] * 3)], "invalid datatype"),
        ([], "no inputs"),
    ],
)
def test_invalid_requests(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
    request_fields: list[tuple[str, str, list[int], str, list[Any]]],
    expected: str,
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(typed_request("adder", request_fields), timeout=30)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert expected in caught.value.details()
    assert "Traceback" not in caught.value.details()


def test_out_of_range_typed_integers(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = typed_request("identity", [("int8", "INT8", [1], "int_contents", [128])])
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=30)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "out of range for INT8" in caught.value.details()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ([b"\x00" * 8], "has 8 bytes of data, but shape [1, 3] of FP32 needs 12"),
        ([b"\x00" * 12, b"\x00" * 12], "raw_input_contents"),
    ],
)
def test_invalid_raw_contents(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, raw: list[bytes], expected: str
) -> None:
    request = service_pb2.ModelInferRequest(model_name="adder", raw_input_contents=raw)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 3])
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=30)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert expected in caught.value.details()


def test_garbage_bytes_are_invalid_argument(toy_server: ServerProcess) -> None:
    with grpc.insecure_channel(toy_server.grpc_address) as channel:
        for method in ("/inference.GRPCInferenceService/ModelInfer",
                       "/tensorflow.serving.PredictionService/Predict"):  # fmt: skip
            call = channel.unary_unary(method)
            with pytest.raises(grpc.RpcError) as caught:
                call(b"\xff\xff\xff\xff\xff", timeout=30)
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "is not a valid" in caught.value.details()


def test_not_found_and_bad_versions(client: triton.InferenceServerClient) -> None:
    x = fp32_input(np.ones((1, 3), np.float32))
    for model, version, code in [
        ("no_such_model", "", "StatusCode.NOT_FOUND"),
        ("adder", "9", "StatusCode.NOT_FOUND"),
        ("adder", "no-such-label!", "StatusCode.INVALID_ARGUMENT"),
        ("adder", "stable", "StatusCode.INVALID_ARGUMENT"),
    ]:
        with pytest.raises(InferenceServerException) as caught:
            client.infer(model, [x], model_version=version)
        assert grpc_code(caught.value) == code, (model, version)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("adder", [x], outputs=[triton.InferRequestedOutput("nope")])
    assert grpc_code(caught.value) == "StatusCode.INVALID_ARGUMENT"
    # The server is still up and serving.
    assert client.is_server_live()


def test_metrics_count_grpc(
    toy_server: ServerProcess, client: triton.InferenceServerClient
) -> None:
    client.infer("adder", [fp32_input(np.ones((1, 3), np.float32))])
    with pytest.raises(InferenceServerException):
        client.infer("adder", [fp32_input(np.ones((1, 2), np.float32))])
    metrics = httpx.get(f"{toy_server.url}/metrics").text
    assert 'servekit_requests_total{code="200",model="adder",protocol="grpc",version="1"}' in (
        metrics
    )
    assert 'code="400",model="adder",protocol="grpc",version="1"' in metrics


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server with a model that sleeps for its input's seconds, one call at a time."""
    root = tmp_path_factory.mktemp("grpc_slow")
    write_python_model(root, "slow", SLOW_SOURCE, "batching: {enabled: false}\n")
    write_python_model(
        root, "slow_short_queue", SLOW_SOURCE, "batching: {enabled: false, max_queue_size: 1}\n"
    )
    write_adder(root)
    server = ServerProcess(
        "--model_repository", str(root),
        "--port", str(free_port()),
        "--grpc_max_message_bytes", "4096",
    )  # fmt: skip
    _ = server.url
    yield server
    server.stop()


def slow_input(seconds: float) -> triton.InferInput:
    return fp32_input(np.array([[seconds]], dtype=np.float32))


def metric(server: ServerProcess, prefix: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def metric_reaches(server: ServerProcess, prefix: str, minimum: float) -> bool:
    """Wait up to 5 s for a counter that the server updates after the client has its response."""
    deadline = time.monotonic() + 5
    while metric(server, prefix) < minimum:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_deadline_exceeded(slow_server: ServerProcess) -> None:
    client = triton.InferenceServerClient(slow_server.grpc_address)
    try:
        started = time.monotonic()
        with pytest.raises(InferenceServerException) as caught:
            client.infer("slow", [slow_input(1.0)], client_timeout=0.3)
        assert grpc_code(caught.value) == "StatusCode.DEADLINE_EXCEEDED"
        assert time.monotonic() - started < 0.9
        timed_out = 'servekit_requests_total{code="504",model="slow",protocol="grpc"'
        # The server counts the 504 when its own deadline passes, just after the client's.
        assert metric_reaches(slow_server, timed_out, 1)
        # The next call succeeds.
        result = client.infer("slow", [slow_input(0.0)], client_timeout=10)
        assert result.as_numpy("y").tolist() == [[0.0]]
    finally:
        client.close()


def test_timeout_parameter(slow_server: ServerProcess) -> None:
    client = triton.InferenceServerClient(slow_server.grpc_address)
    try:
        client.infer("slow", [slow_input(0.6)])  # occupies the one instance
        busy = threading.Thread(target=client.infer, args=("slow", [slow_input(0.6)]))
        busy.start()
        time.sleep(0.1)
        # Queued behind the busy call, it expires there after 100 ms instead of running.
        with pytest.raises(InferenceServerException) as caught:
            client.infer("slow", [slow_input(0.0)], timeout=100_000)
        busy.join()
        assert grpc_code(caught.value) == "StatusCode.DEADLINE_EXCEEDED"
    finally:
        client.close()


def test_full_queue_is_resource_exhausted(slow_server: ServerProcess) -> None:
    with grpc.insecure_channel(slow_server.grpc_address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        def call(seconds: float) -> Any:
            request = service_pb2.ModelInferRequest(model_name="slow_short_queue")
            tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 1])
            tensor.contents.fp32_contents.append(seconds)
            return stub.ModelInfer.future(request, timeout=30)

        busy = call(0.5)
        time.sleep(0.1)
        queued = call(0.0)
        time.sleep(0.1)
        with pytest.raises(grpc.RpcError) as caught:
            call(0.0).result()
        busy.result()
        queued.result()
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ("retry-after", "1") in caught.value.trailing_metadata()


def test_cancelled_call_leaves_the_queue(slow_server: ServerProcess) -> None:
    runs = 'servekit_inference_duration_seconds_count{model="slow"'
    before = metric(slow_server, runs)
    with grpc.insecure_channel(slow_server.grpc_address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        def call(seconds: float) -> Any:
            request = service_pb2.ModelInferRequest(model_name="slow")
            tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 1])
            tensor.contents.fp32_contents.append(seconds)
            return stub.ModelInfer.future(request, timeout=30)

        busy = call(0.8)
        time.sleep(0.2)
        queued = call(0.0)
        time.sleep(0.2)
        assert queued.cancel()
        busy.result()
    time.sleep(0.3)
    # Only the busy call reached the model; the cancelled one was dropped from the queue.
    assert metric(slow_server, runs) - before == 1
    assert metric_reaches(slow_server, 'servekit_requests_total{code="499",model="slow"', 1)


def test_response_over_the_size_limit(slow_server: ServerProcess) -> None:
    from servekit.protocols.protos import tensorflow_pb2, tensorflow_serving_pb2

    # A tiny request whose one value fills 340 x 3 floats: 4,080 bytes fit the 4,096-byte limit,
    # the response with its framing does not.
    request = tensorflow_serving_pb2.PredictRequest()
    request.model_spec.name = "adder"
    tensor = request.inputs["x"]
    tensor.dtype = tensorflow_pb2.DT_FLOAT
    tensor.float_val.append(1.0)
    for size in (340, 3):
        tensor.tensor_shape.dim.add(size=size)
    with grpc.insecure_channel(slow_server.grpc_address) as channel:
        predict = channel.unary_unary("/tensorflow.serving.PredictionService/Predict")
        with pytest.raises(grpc.RpcError) as caught:
            predict(request.SerializeToString(), timeout=30)
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "the response is" in caught.value.details()
    assert metric(slow_server, 'servekit_requests_total{code="413",model="adder"') >= 1


def test_message_size_limit(slow_server: ServerProcess) -> None:
    client = triton.InferenceServerClient(slow_server.grpc_address)
    try:
        big = fp32_input(np.ones((1000, 3), dtype=np.float32))
        with pytest.raises(InferenceServerException) as caught:
            client.infer("adder", [big])
        assert grpc_code(caught.value) == "StatusCode.RESOURCE_EXHAUSTED"
        small = client.infer("adder", [fp32_input(np.ones((4, 3), dtype=np.float32))])
        assert small.as_numpy("y").tolist() == [[2.0] * 3] * 4
    finally:
        client.close()


def test_repository_index_load_unload(slow_server: ServerProcess) -> None:
    client = triton.InferenceServerClient(slow_server.grpc_address)
    try:
        index = client.get_model_repository_index(as_json=True)["models"]
        assert {"name": "adder", "version": "1", "state": "READY"} in index
        client.unload_model("adder")
        assert not client.is_model_ready("adder")
        client.load_model("adder")
        assert client.is_model_ready("adder")
        # Settings that leave no version to serve are rejected and undone.
        with pytest.raises(InferenceServerException) as caught:
            client.load_model("adder", config='{"version_policy": {"specific": [99]}}')
        assert grpc_code(caught.value) == "StatusCode.INVALID_ARGUMENT"
        assert "no version matches its version policy" in caught.value.message()
        assert client.is_model_ready("adder")
        with pytest.raises(InferenceServerException) as caught:
            client.load_model("adder", files={"file:1/model.onnx": b"x"})
        assert grpc_code(caught.value) == "StatusCode.INVALID_ARGUMENT"
        with pytest.raises(InferenceServerException) as caught:
            client.load_model("no_such_model")
        assert grpc_code(caught.value) == "StatusCode.NOT_FOUND"
    finally:
        client.close()


def test_repository_methods_off_without_management(tmp_path: Path) -> None:
    write_adder(tmp_path)
    server = ServerProcess(
        "--model_repository", str(tmp_path),
        "--port", str(free_port()),
        "--no_enable_model_management",
    )  # fmt: skip
    client = triton.InferenceServerClient(server.grpc_address)
    try:
        with pytest.raises(InferenceServerException) as caught:
            client.unload_model("adder")
        assert grpc_code(caught.value) == "StatusCode.UNIMPLEMENTED"
        assert client.is_model_ready("adder")
    finally:
        client.close()
        server.stop()

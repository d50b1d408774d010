"""TF Serving's gRPC API against the real server, with a client built from servekit's protos."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from servekit.protocols.protos import tensorflow_pb2 as tf
from servekit.protocols.protos import tensorflow_serving_pb2 as pb
from servekit.protocols.tfserving_grpc import tensor_to_array
from tests.conftest import ServerProcess, free_port
from tests.toy_models import write_adder

PREDICTION = "/tensorflow.serving.PredictionService/"


class Client:
    """PredictionService and ModelService methods over one channel."""

    def __init__(self, channel: grpc.Channel) -> None:
        def method(path: str, request: Any, response: Any) -> Any:
            return channel.unary_unary(
                path,
                request_serializer=request.SerializeToString,
                response_deserializer=response.FromString,
            )

        self.predict = method(PREDICTION + "Predict", pb.PredictRequest, pb.PredictResponse)
        self.classify = method(
            PREDICTION + "Classify", pb.ClassificationRequest, pb.ClassificationResponse
        )
        self.regress = method(PREDICTION + "Regress", pb.RegressionRequest, pb.RegressionResponse)
        self.metadata = method(
            PREDICTION + "GetModelMetadata",
            pb.GetModelMetadataRequest,
            pb.GetModelMetadataResponse,
        )
        self.status = method(
            "/tensorflow.serving.ModelService/GetModelStatus",
            pb.GetModelStatusRequest,
            pb.GetModelStatusResponse,
        )


@pytest.fixture
def client(toy_server: ServerProcess) -> Iterator[Client]:
    with grpc.insecure_channel(toy_server.grpc_address) as channel:
        yield Client(channel)


def typed_tensor(array: np.ndarray[Any, Any], dtype: int, field: str) -> tf.TensorProto:
    tensor = tf.TensorProto(dtype=dtype)
    for size in array.shape:
        tensor.tensor_shape.dim.add(size=size)
    getattr(tensor, field).extend(array.ravel().tolist())
    return tensor


def content_tensor(array: np.ndarray[Any, Any], dtype: int) -> tf.TensorProto:
    tensor = tf.TensorProto(dtype=dtype, tensor_content=array.astype(array.dtype).tobytes())
    for size in array.shape:
        tensor.tensor_shape.dim.add(size=size)
    return tensor


def predict_request(model: str, **inputs: tf.TensorProto) -> pb.PredictRequest:
    request = pb.PredictRequest(model_spec=pb.ModelSpec(name=model))
    for name, tensor in inputs.items():
        request.inputs[name].CopyFrom(tensor)
    return request


def expect_error(call: Any, request: Any, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=30)
    assert caught.value.code() is code, caught.value.details()
    details: str = caught.value.details()
    assert "Traceback" not in details
    return details


X = np.array([[1.0, 2.0, 3.0], [-4.0, 0.5, 0.0]], dtype=np.float32)


def test_predict_typed_float_val(client: Client) -> None:
    response = client.predict(predict_request("adder", x=typed_tensor(X, tf.DT_FLOAT, "float_val")))
    assert response.model_spec.name == "adder"
    assert response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "serving_default"
    output = response.outputs["y"]
    assert output.dtype == tf.DT_FLOAT
    assert [dim.size for dim in output.tensor_shape.dim] == [2, 3]
    assert np.array_equal(tensor_to_array(output, "y"), X + 1)


def test_predict_tensor_content(client: Client) -> None:
    response = client.predict(predict_request("adder", x=content_tensor(X, tf.DT_FLOAT)))
    assert np.frombuffer(response.outputs["y"].tensor_content, "<f4").tolist() == (
        (X + 1).ravel().tolist()
    )


def test_predict_single_value_fills_the_shape(client: Client) -> None:
    tensor = typed_tensor(np.zeros((2, 3), np.float32), tf.DT_FLOAT, "float_val")
    del tensor.float_val[:]
    tensor.float_val.append(2.0)
    response = client.predict(predict_request("adder", x=tensor))
    assert tensor_to_array(response.outputs["y"], "y").tolist() == [[3.0] * 3] * 2


def test_predict_strings(client: Client) -> None:
    text = np.array([b"hello", b"\xff\x00"], dtype=object)
    response = client.predict(
        predict_request("echo", text=typed_tensor(text, tf.DT_STRING, "string_val"))
    )
    assert list(response.outputs["text_bytes"].string_val) == [b"hello", b"\xff\x00"]
    assert response.outputs["length"].dtype == tf.DT_INT64
    assert tensor_to_array(response.outputs["length"], "length").tolist() == [5, 2]


def test_predict_half_val(client: Client) -> None:
    values = np.array([1.5, -2.0], dtype=np.float16)
    request = pb.PredictRequest(model_spec=pb.ModelSpec(name="identity"))
    for name, array, dtype, field in [
        ("fp16", values.view(np.uint16), tf.DT_HALF, "half_val"),
        ("bool", np.array([True, False]), tf.DT_BOOL, "bool_val"),
        ("uint8", np.array([0, 255]), tf.DT_UINT8, "int_val"),
        ("uint16", np.array([0, 65535]), tf.DT_UINT16, "int_val"),
        ("uint32", np.array([0, 2**32 - 1]), tf.DT_UINT32, "uint32_val"),
        ("uint64", np.array([0, 2**64 - 1], dtype=np.uint64), tf.DT_UINT64, "uint64_val"),
        ("int8", np.array([-128, 127]), tf.DT_INT8, "int_val"),
        ("int16", np.array([-32768, 1]), tf.DT_INT16, "int_val"),
        ("int32", np.array([-(2**31), 1]), tf.DT_INT32, "int_val"),
        ("int64", np.array([-(2**63), 1]), tf.DT_INT64, "int64_val"),
        ("fp32", np.array([0.5, 1.0]), tf.DT_FLOAT, "float_val"),
        ("fp64", np.array([1e300, 1.0]), tf.DT_DOUBLE, "double_val"),
        ("bytes", np.array([b"a", b"b"], dtype=object), tf.DT_STRING, "string_val"),
    ]:
        request.inputs[name].CopyFrom(typed_tensor(array, dtype, field))
    request.output_filter.extend(["fp16_out", "uint64_out", "int8_out"])
    response = client.predict(request, timeout=30)
    assert sorted(response.outputs) == ["fp16_out", "int8_out", "uint64_out"]
    assert np.array_equal(tensor_to_array(response.outputs["fp16_out"], "o"), values)
    assert tensor_to_array(response.outputs["uint64_out"], "o").tolist() == [0, 2**64 - 1]
    assert tensor_to_array(response.outputs["int8_out"], "o").tolist() == [-128, 127]


def test_version_addressing(client: Client) -> None:
    request = predict_request("adder", x=content_tensor(X, tf.DT_FLOAT))
    request.model_spec.version.value = 1
    assert client.predict(request, timeout=30).model_spec.version.value == 1
    request.model_spec.version.value = 7
    assert "adder" in expect_error(client.predict, request, grpc.StatusCode.NOT_FOUND)


@pytest.mark.parametrize(
    ("model", "tensor", "code", "expected"),
    [
        ("no_such_model", None, grpc.StatusCode.NOT_FOUND, "no_such_model"),
        ("adder", ("x", np.float64, tf.DT_DOUBLE, "double_val"), "INVALID_ARGUMENT", "FP64"),
        ("adder", ("z", np.float32, tf.DT_FLOAT, "float_val"), "INVALID_ARGUMENT", "'z'"),
        ("adder", ("x", np.float32, tf.DT_COMPLEX64, "scomplex_val"), "INVALID_ARGUMENT", "DT_"),
    ],
)
def test_predict_errors(client: Client, model: str, tensor: Any, code: Any, expected: str) -> None:
    if tensor is None:
        request = predict_request(model, x=content_tensor(X, tf.DT_FLOAT))
    else:
        name, numpy_type, dtype, field = tensor
        request = predict_request(model, **{name: typed_tensor(X.astype(numpy_type), dtype, field)})
    status = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode[code]
    assert expected in expect_error(client.predict, request, status)


def test_malformed_tensors(client: Client) -> None:
    wrong_count = typed_tensor(X, tf.DT_FLOAT, "float_val")
    wrong_count.float_val.append(1.0)
    details = expect_error(
        client.predict, predict_request("adder", x=wrong_count), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "7 values in float_val" in details
    short = content_tensor(X, tf.DT_FLOAT)
    short.tensor_content = short.tensor_content[:-1]
    details = expect_error(
        client.predict, predict_request("adder", x=short), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "needs 24 bytes" in details
    out_of_range = typed_tensor(np.array([300]), tf.DT_UINT8, "int_val")
    request = pb.PredictRequest(model_spec=pb.ModelSpec(name="identity"))
    request.inputs["uint8"].CopyFrom(out_of_range)
    assert "out of range" in expect_error(client.predict, request, grpc.StatusCode.INVALID_ARGUMENT)


def test_fill_from_one_value_is_bounded(client: Client) -> None:
    tensor = tf.TensorProto(dtype=tf.DT_FLOAT, float_val=[1.0])
    for size in (2**25, 3):
        tensor.tensor_shape.dim.add(size=size)
    details = expect_error(
        client.predict, predict_request("adder", x=tensor), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "from one value" in details


@pytest.mark.parametrize(("shape", "expected"), [([0, 2**62], "too large"), ([1] * 70, "70")])
def test_unrepresentable_shapes(client: Client, shape: list[int], expected: str) -> None:
    tensor = tf.TensorProto(dtype=tf.DT_FLOAT)
    for size in shape:
        tensor.tensor_shape.dim.add(size=size)
    if 0 not in shape:
        tensor.float_val.append(1.0)
    details = expect_error(
        client.predict, predict_request("adder", x=tensor), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert expected in details


def test_typed_field_hint(client: Client) -> None:
    tensor = typed_tensor(np.array([1, 2]), tf.DT_UINT64, "int64_val")
    request = pb.PredictRequest(model_spec=pb.ModelSpec(name="identity"))
    request.inputs["uint64"].CopyFrom(tensor)
    details = expect_error(client.predict, request, grpc.StatusCode.INVALID_ARGUMENT)
    assert "DT_UINT64 values go in uint64_val, not int64_val" in details


def test_signature_and_output_filter_errors(client: Client) -> None:
    request = predict_request("adder", x=content_tensor(X, tf.DT_FLOAT))
    request.model_spec.signature_name = "other"
    assert "other" in expect_error(client.predict, request, grpc.StatusCode.INVALID_ARGUMENT)
    request.model_spec.signature_name = "serving_default"
    request.output_filter.append("nope")
    assert "nope" in expect_error(client.predict, request, grpc.StatusCode.INVALID_ARGUMENT)


def test_get_model_metadata(client: Client) -> None:
    request = pb.GetModelMetadataRequest(
        model_spec=pb.ModelSpec(name="twoin"), metadata_field=["signature_def"]
    )
    response = client.metadata(request, timeout=30)
    assert response.model_spec.name == "twoin"
    assert response.model_spec.version.value == 1
    signatures = pb.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    signature = signatures.signature_def["serving_default"]
    assert signature.method_name == "tensorflow/serving/predict"
    assert signature.inputs["a"].dtype == tf.DT_FLOAT
    assert [dim.size for dim in signature.inputs["a"].tensor_shape.dim] == [-1, 2]
    assert signature.inputs["b"].dtype == tf.DT_INT64
    assert sorted(signature.outputs) == ["prob", "sum"]
    request.ClearField("metadata_field")
    assert "metadata_field" in expect_error(
        client.metadata, request, grpc.StatusCode.INVALID_ARGUMENT
    )


def test_get_model_status(client: Client) -> None:
    response = client.status(pb.GetModelStatusRequest(model_spec=pb.ModelSpec(name="adder")))
    (status,) = response.model_version_status
    assert status.version == 1
    assert status.state == pb.ModelVersionStatus.AVAILABLE
    assert status.status.error_code == 0
    missing = pb.GetModelStatusRequest(model_spec=pb.ModelSpec(name="no_such_model"))
    expect_error(client.status, missing, grpc.StatusCode.NOT_FOUND)


def example(**features: Any) -> tf.Example:
    message = tf.Example()
    for name, values in features.items():
        feature = message.features.feature[name]
        if isinstance(values[0], bytes):
            feature.bytes_list.value.extend(values)
        elif isinstance(values[0], int):
            feature.int64_list.value.extend(values)
        else:
            feature.float_list.value.extend(values)
    return message


def test_regress(client: Client) -> None:
    request = pb.RegressionRequest(model_spec=pb.ModelSpec(name="hp"))
    request.input.example_list.examples.extend([example(x=[1.0]), example(x=[2.0])])
    response = client.regress(request, timeout=30)
    assert [item.value for item in response.result.regressions] == [2.5, 3.0]
    assert response.model_spec.version.value == 1


def test_regress_with_context(client: Client) -> None:
    request = pb.RegressionRequest(model_spec=pb.ModelSpec(name="twoin"))
    data = request.input.example_list_with_context
    data.context.CopyFrom(example(b=[1]))
    data.examples.extend([example(a=[1.0, 2.0]), example(a=[0.0, 0.5])])
    response = client.regress(request, timeout=30)
    assert [item.value for item in response.result.regressions] == [4.0, 1.5]


def test_classify(client: Client) -> None:
    request = pb.ClassificationRequest(model_spec=pb.ModelSpec(name="hp"))
    request.input.example_list.examples.append(example(x=[10.0]))
    response = client.classify(request, timeout=30)
    (classification,) = response.result.classifications
    assert [(item.label, item.score) for item in classification.classes] == [("", 7.0)]


@pytest.mark.parametrize(
    ("examples", "expected"),
    [
        ([], "Input is empty"),
        ([example(y=[1.0])], "missing feature 'x'"),
        ([example(x=[b"text"])], "FP32"),
        ([example(x=[1.0], z=[2.0])], "feature 'z'"),
    ],
)
def test_regress_errors(client: Client, examples: list[tf.Example], expected: str) -> None:
    request = pb.RegressionRequest(model_spec=pb.ModelSpec(name="hp"))
    request.input.example_list.examples.extend(examples)
    assert expected in expect_error(client.regress, request, grpc.StatusCode.INVALID_ARGUMENT)


@pytest.fixture(scope="module")
def labelled_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root: Path = tmp_path_factory.mktemp("grpc_labels")
    write_adder(root, version=1, amount=1.0)
    write_adder(root, version=2, amount=2.0)
    (root / "adder" / "servekit.yaml").write_text(
        "version_policy: {all: {}}\nlabels: {stable: 1, canary: 2}\n"
    )
    server = ServerProcess("--model_repository", str(root), "--port", str(free_port()))
    _ = server.url
    yield server
    server.stop()


def test_version_labels(labelled_server: ServerProcess) -> None:
    with grpc.insecure_channel(labelled_server.grpc_address) as channel:
        client = Client(channel)
        request = predict_request("adder", x=content_tensor(X, tf.DT_FLOAT))
        for label, version, amount in [("stable", 1, 1.0), ("canary", 2, 2.0)]:
            request.model_spec.version_label = label
            response = client.predict(request, timeout=30)
            assert response.model_spec.version.value == version
            assert np.array_equal(tensor_to_array(response.outputs["y"], "y"), X + amount)
        request.model_spec.version_label = "nope"
        expect_error(client.predict, request, grpc.StatusCode.INVALID_ARGUMENT)
        status = client.status(
            pb.GetModelStatusRequest(model_spec=pb.ModelSpec(name="adder", version_label="canary"))
        )
        assert [item.version for item in status.model_version_status] == [2]
        all_versions = client.status(
            pb.GetModelStatusRequest(model_spec=pb.ModelSpec(name="adder"))
        )
        assert sorted(item.version for item in all_versions.model_version_status) == [1, 2]

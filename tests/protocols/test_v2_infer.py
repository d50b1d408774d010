"""KServe V2 REST against the real server: JSON and binary tensors, errors and edge cases."""

from __future__ import annotations

import json
import math
import struct

import httpx
import numpy as np
import pytest

from tests.conftest import assert_json_error
from tests.toy_models import ALL_TYPES

ADDER = "/v2/models/adder/infer"
HEADER = "Inference-Header-Content-Length"


def infer(client: httpx.Client, path: str, document: object) -> httpx.Response:
    return client.post(path, content=json.dumps(document))


def fp32_input(data: object, shape: list[int], name: str = "x") -> dict[str, object]:
    return {"name": name, "shape": shape, "datatype": "FP32", "data": data}


def test_server_metadata(toy: httpx.Client) -> None:
    response = toy.get("/v2")
    assert response.status_code == 200
    body = response.json()
    assert body["name"] == "servekit"
    assert "binary_tensor_data" in body["extensions"]


def test_health(toy: httpx.Client) -> None:
    assert toy.get("/v2/health/live").json() == {"live": True}
    assert toy.get("/v2/health/ready").json() == {"ready": True}


def test_model_ready(toy: httpx.Client) -> None:
    response = toy.get("/v2/models/adder/ready")
    assert response.status_code == 200
    assert response.json() == {"name": "adder", "ready": True}
    assert toy.get("/v2/models/adder/versions/1/ready").status_code == 200


def test_model_metadata(toy: httpx.Client) -> None:
    response = toy.get("/v2/models/twoin")
    assert response.status_code == 200
    assert response.json() == {
        "name": "twoin",
        "versions": ["1"],
        "platform": "onnx_onnxv1",
        "inputs": [
            {"name": "a", "datatype": "FP32", "shape": [-1, 2]},
            {"name": "b", "datatype": "INT64", "shape": [-1]},
        ],
        "outputs": [
            {"name": "sum", "datatype": "FP32", "shape": [-1]},
            {"name": "prob", "datatype": "FP32", "shape": [-1, 2]},
        ],
    }


def test_infer_without_id(toy: httpx.Client) -> None:
    response = infer(toy, ADDER, {"inputs": [fp32_input([1, 2, 3], [1, 3])]})
    assert response.status_code == 200
    body = response.json()
    assert "id" not in body
    assert body["model_name"] == "adder"
    assert body["model_version"] == "1"
    assert body["outputs"] == [
        {"name": "y", "datatype": "FP32", "shape": [1, 3], "data": [2, 3, 4]}
    ]


def test_infer_echoes_id(toy: httpx.Client) -> None:
    document = {"id": "req-42", "inputs": [fp32_input([1, 2, 3], [1, 3])]}
    response = infer(toy, ADDER, document)
    assert response.status_code == 200
    assert response.json()["id"] == "req-42"


def test_numeric_id_rejected(toy: httpx.Client) -> None:
    document = {"id": 42, "inputs": [fp32_input([1, 2, 3], [1, 3])]}
    message = assert_json_error(infer(toy, ADDER, document), 400)
    assert "'id'" in message


@pytest.mark.parametrize(
    ("shape", "data", "expected"),
    [
        ([2, 3], [1, 2, 3, 4, 5], "5 data elements"),
        ([1, 3], [1, 2, 3, 4, 5, 6], "6 data elements"),
        ([4294967296, 4294967296], [], "too large"),
        ([65536, 65536, 0], [], "shape"),
        ([0, 2**62], [], "too large"),
        ([1] * 40, [1], "40 dimensions"),
    ],
)
def test_shape_and_data_disagree(
    toy: httpx.Client, shape: list[int], data: list[int], expected: str
) -> None:
    message = assert_json_error(infer(toy, ADDER, {"inputs": [fp32_input(data, shape)]}), 400)
    assert expected in message
    assert toy.get("/v2/health/live").status_code == 200


@pytest.mark.parametrize("shape", [[-1, 3], [1.5, 2], ["1", 3], [], None, [True, 3]])
def test_invalid_shapes(toy: httpx.Client, shape: object) -> None:
    tensor = fp32_input([1, 2, 3], [0])
    tensor["shape"] = shape
    if shape is None:
        del tensor["shape"]
    message = assert_json_error(infer(toy, ADDER, {"inputs": [tensor]}), 400)
    assert "shape" in message
    assert toy.get("/v2/health/live").status_code == 200


def test_nested_and_flat_data_match(toy: httpx.Client) -> None:
    def twoin(a: object) -> httpx.Response:
        inputs = [
            {"name": "a", "shape": [2, 2], "datatype": "FP32", "data": a},
            {"name": "b", "shape": [2], "datatype": "INT64", "data": [1, 2]},
        ]
        return infer(toy, "/v2/models/twoin/infer", {"inputs": inputs})

    nested, flat = twoin([[1, 2], [3, 4]]), twoin([1, 2, 3, 4])
    assert nested.status_code == 200
    assert nested.json() == flat.json()
    message = assert_json_error(twoin([[1, 2, 3], [4]]), 400)
    assert "ragged" in message


def test_bytes_nested_and_flat_match(toy: httpx.Client) -> None:
    def echo(data: object) -> httpx.Response:
        inputs = [{"name": "text", "shape": [2, 1], "datatype": "BYTES", "data": data}]
        return infer(toy, "/v2/models/echo2d/infer", {"inputs": inputs})

    nested, flat = echo([["a"], ["bc"]]), echo(["a", "bc"])
    assert nested.status_code == 200
    assert nested.json() == flat.json()
    outputs = {output["name"]: output for output in nested.json()["outputs"]}
    assert outputs["text_bytes"]["data"] == ["a", "bc"]
    assert outputs["length"]["data"] == [1, 2]
    assert outputs["length"]["shape"] == [2, 1]


def test_bytes_flat(toy: httpx.Client) -> None:
    inputs = [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}]
    response = infer(toy, "/v2/models/echo/infer", {"inputs": inputs})
    assert response.status_code == 200


def test_zero_size_tensors(toy: httpx.Client) -> None:
    def seqlen(shape: list[int]) -> httpx.Response:
        inputs = [{"name": "tokens", "shape": shape, "datatype": "INT64", "data": []}]
        return infer(toy, "/v2/models/seqlen/infer", {"inputs": inputs})

    empty_rows = seqlen([2, 0])
    assert empty_rows.status_code == 200
    assert empty_rows.json()["outputs"][0]["data"] == [0, 0]
    no_rows = seqlen([0, 4])
    assert no_rows.status_code == 200
    assert no_rows.json()["outputs"][0]["shape"] == [0]
    assert no_rows.json()["outputs"][0]["data"] == []
    normal = infer(toy, ADDER, {"inputs": [fp32_input([1, 2, 3], [1, 3])]})
    assert normal.status_code == 200


def test_zero_size_tensors_tfserving(toy: httpx.Client) -> None:
    response = toy.post("/v1/models/seqlen:predict", content='{"inputs": {"tokens": [[], []]}}')
    assert response.status_code == 200
    assert response.json() == {"outputs": [0, 0]}


@pytest.mark.parametrize(
    ("tensor", "expected"),
    [
        ({"datatype": "INT64", "data": [1, 2, 3]}, "expects FP32"),
        ({"datatype": "FP32", "data": ["a", "b", "c"]}, "'a'"),
        ({"datatype": "FLOAT32", "data": [1, 2, 3]}, "invalid datatype 'FLOAT32'"),
        ({"name": "nope", "datatype": "FP32", "data": [1, 2, 3]}, "unknown input 'nope'"),
        ({"datatype": "FP32", "data": [1, None, 3]}, "null"),
        ({"datatype": "FP32"}, "missing 'data'"),
    ],
)
def test_wrong_inputs(toy: httpx.Client, tensor: dict[str, object], expected: str) -> None:
    document = {"inputs": [{"name": "x", "shape": [1, 3], **tensor}]}
    message = assert_json_error(infer(toy, ADDER, document), 400)
    assert expected in message


def test_missing_input(toy: httpx.Client) -> None:
    inputs = [{"name": "a", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]
    message = assert_json_error(infer(toy, "/v2/models/twoin/infer", {"inputs": inputs}), 400)
    assert "missing input 'b'" in message


TWOIN_INPUTS = [
    {"name": "a", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]},
    {"name": "b", "shape": [1], "datatype": "INT64", "data": [3]},
]


def test_unknown_requested_output(toy: httpx.Client) -> None:
    document = {"inputs": TWOIN_INPUTS, "outputs": [{"name": "potato"}]}
    message = assert_json_error(infer(toy, "/v2/models/twoin/infer", document), 400)
    assert "potato" in message


def test_requested_output_only(toy: httpx.Client) -> None:
    document = {"inputs": TWOIN_INPUTS, "outputs": [{"name": "prob"}]}
    response = infer(toy, "/v2/models/twoin/infer", document)
    assert response.status_code == 200
    outputs = response.json()["outputs"]
    assert [output["name"] for output in outputs] == ["prob"]


def test_non_finite_tokens(toy: httpx.Client) -> None:
    document = '{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[NaN, 1.0]}]}'
    response = toy.post("/v2/models/logm/infer", content=document)
    assert response.status_code == 200
    data = json.loads(response.text)["outputs"][0]["data"]
    assert math.isnan(data[0])
    assert data[1] == 0.0


def test_non_finite_outputs(toy: httpx.Client) -> None:
    document = {"inputs": [fp32_input([-1.0, 0.0, 1.0], [3])]}
    response = infer(toy, "/v2/models/logm/infer", document)
    assert response.status_code == 200
    output = json.loads(response.text)["outputs"][0]
    assert len(output["data"]) == 3
    assert output["shape"] == [3]
    assert math.isnan(output["data"][0])
    assert output["data"][1] == -math.inf


def test_non_finite_outputs_binary(toy: httpx.Client) -> None:
    document = {
        "inputs": [fp32_input([-1.0, 0.0, 1.0], [3])],
        "parameters": {"binary_data_output": True},
    }
    response = infer(toy, "/v2/models/logm/infer", document)
    assert response.status_code == 200
    length = int(response.headers[HEADER])
    assert len(response.content) == length + 12
    values = np.frombuffer(response.content[length:], dtype="<f4")
    assert math.isnan(values[0])
    assert values[1] == -np.inf
    assert values[2] == 0.0


def binary_request(
    header: bytes, payload: bytes, length: str | None
) -> tuple[bytes, dict[str, str]]:
    headers = {"content-type": "application/octet-stream"}
    if length is not None:
        headers[HEADER] = length
    return header + payload, headers


BINARY_HEADER = json.dumps(
    {
        "inputs": [
            {
                "name": "x",
                "shape": [1, 3],
                "datatype": "FP32",
                "parameters": {"binary_data_size": 12},
            }
        ]
    }
).encode()
BINARY_PAYLOAD = struct.pack("<3f", 1.0, 2.0, 3.0)


def test_binary_input(toy: httpx.Client) -> None:
    body, headers = binary_request(BINARY_HEADER, BINARY_PAYLOAD, str(len(BINARY_HEADER)))
    response = toy.post(ADDER, content=body, headers=headers)
    assert response.status_code == 200
    assert response.json()["outputs"][0]["data"] == [2.0, 3.0, 4.0]


@pytest.mark.parametrize(
    ("length", "expected"),
    [
        (str(len(BINARY_HEADER) + 100), "larger than the body"),
        ("-5", "invalid Inference-Header-Content-Length"),
        ("abc", "invalid Inference-Header-Content-Length"),
        (None, "Inference-Header-Content-Length"),
        ("99999999999", "larger than the body"),
        ("0", "not supported"),
    ],
)
def test_binary_header_checks(toy: httpx.Client, length: str | None, expected: str) -> None:
    body, headers = binary_request(BINARY_HEADER, BINARY_PAYLOAD, length)
    message = assert_json_error(toy.post(ADDER, content=body, headers=headers), 400)
    assert expected in message


@pytest.mark.parametrize(("size", "expected"), [(16, "only 12 bytes"), (8, "needs 12 bytes")])
def test_binary_size_mismatch(toy: httpx.Client, size: int, expected: str) -> None:
    header = BINARY_HEADER.replace(
        b'"binary_data_size": 12', f'"binary_data_size": {size}'.encode()
    )
    body, headers = binary_request(header, BINARY_PAYLOAD, str(len(header)))
    message = assert_json_error(toy.post(ADDER, content=body, headers=headers), 400)
    assert expected in message


def test_binary_bytes_element_overruns(toy: httpx.Client) -> None:
    payload = struct.pack("<I", 1000) + b"hello"
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "text",
                    "shape": [1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(payload)},
                }
            ]
        }
    ).encode()
    body, headers = binary_request(header, payload, str(len(header)))
    response = toy.post("/v2/models/echo/infer", content=body, headers=headers)
    message = assert_json_error(response, 400)
    assert "declares 1000 bytes" in message


def test_binary_output_requested(toy: httpx.Client) -> None:
    header = json.loads(BINARY_HEADER)
    header["parameters"] = {"binary_data_output": True}
    encoded = json.dumps(header).encode()
    body, headers = binary_request(encoded, BINARY_PAYLOAD, str(len(encoded)))
    response = toy.post(ADDER, content=body, headers=headers)
    assert response.status_code == 200
    length = int(response.headers[HEADER])
    document = json.loads(response.content[:length])
    assert document["outputs"][0]["parameters"] == {"binary_data_size": 12}
    assert "data" not in document["outputs"][0]
    assert np.frombuffer(response.content[length:], dtype="<f4").tolist() == [2.0, 3.0, 4.0]


def test_binary_bytes_output_for_invalid_utf8(toy: httpx.Client) -> None:
    payload = struct.pack("<I", 2) + b"\xff\xfe"
    header = {
        "inputs": [
            {
                "name": "text",
                "shape": [1],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": 6},
            }
        ]
    }
    encoded = json.dumps(header).encode()
    body, headers = binary_request(encoded, payload, str(len(encoded)))
    message = assert_json_error(
        toy.post("/v2/models/echo/infer", content=body, headers=headers), 400
    )
    assert "binary_data: true" in message
    header["outputs"] = [{"name": "text_bytes", "parameters": {"binary_data": True}}]
    encoded = json.dumps(header).encode()
    body, headers = binary_request(encoded, payload, str(len(encoded)))
    response = toy.post("/v2/models/echo/infer", content=body, headers=headers)
    assert response.status_code == 200
    assert response.content.endswith(payload)


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/v2/models/nosuch/infer", 404),
        ("/v2/models/adder/versions/9/infer", 404),
        ("/v2/models/adder/versions/abc/infer", 400),
        ("/v2/models/adder/versions/-1/infer", 400),
    ],
)
def test_unknown_or_malformed_model_paths(toy: httpx.Client, path: str, status: int) -> None:
    assert_json_error(infer(toy, path, {"inputs": [fp32_input([1, 2, 3], [1, 3])]}), status)


def test_version_path(toy: httpx.Client) -> None:
    response = infer(
        toy, "/v2/models/adder/versions/1/infer", {"inputs": [fp32_input([1, 2, 3], [1, 3])]}
    )
    assert response.status_code == 200
    assert_json_error(toy.get("/v2/models/adder/versions/-1/ready"), 400)


def test_wrong_method(toy: httpx.Client) -> None:
    response = toy.get(ADDER)
    assert_json_error(response, 405)
    assert response.headers["allow"] == "POST"


def test_unknown_path(toy: httpx.Client) -> None:
    assert_json_error(toy.get("/v2/nothing/here"), 404)
    assert_json_error(toy.get("/something"), 404)


EXAMPLE_VALUES: dict[str, list[object]] = {
    "BOOL": [True, False],
    "UINT8": [0, 255],
    "UINT16": [0, 65535],
    "UINT32": [0, 4294967295],
    "UINT64": [0, 18446744073709551615],
    "INT8": [-128, 127],
    "INT16": [-32768, 32767],
    "INT32": [-2147483648, 2147483647],
    "INT64": [-9223372036854775808, 9223372036854775807],
    "FP16": [0.5, -2.0],
    "FP32": [0.25, 1e-30],
    "FP64": [0.1, 1e300],
    "BYTES": ["hello", "wörld"],
}


def test_every_datatype_json(toy: httpx.Client) -> None:
    inputs = [
        {"name": name.lower(), "shape": [2], "datatype": name, "data": EXAMPLE_VALUES[name]}
        for name in ALL_TYPES
    ]
    response = infer(toy, "/v2/models/identity/infer", {"inputs": inputs})
    assert response.status_code == 200, response.text
    outputs = {output["name"]: output for output in response.json()["outputs"]}
    for name in ALL_TYPES:
        output = outputs[name.lower() + "_out"]
        assert output["datatype"] == name
        assert output["data"] == EXAMPLE_VALUES[name], name


@pytest.mark.parametrize(
    ("datatype", "data"),
    [
        ("UINT8", [0, 256]),
        ("INT8", [-129, 0]),
        ("UINT64", [0, 18446744073709551616]),
        ("INT64", [-9223372036854775809, 0]),
        ("FP16", [70000.0, 0]),
        ("FP32", [1e39, 0]),
    ],
)
def test_values_out_of_range(toy: httpx.Client, datatype: str, data: list[object]) -> None:
    inputs = [
        {"name": name.lower(), "shape": [2], "datatype": name, "data": EXAMPLE_VALUES[name]}
        for name in ALL_TYPES
    ]
    inputs[ALL_TYPES.index(datatype)]["data"] = data
    message = assert_json_error(infer(toy, "/v2/models/identity/infer", {"inputs": inputs}), 400)
    assert f"out of range for {datatype}" in message


def test_percent_encoded_version(toy: httpx.Client) -> None:
    assert toy.get("/v2/models/adder/versions/%31/ready").status_code == 200


def test_parse_error_without_binary_hint(toy: httpx.Client) -> None:
    message = assert_json_error(toy.post(ADDER, content=b"{bad"), 400)
    assert "Inference-Header-Content-Length" not in message

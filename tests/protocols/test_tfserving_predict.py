"""TF Serving REST predict against the real server: formats, errors and edge cases."""

from __future__ import annotations

import json
import math

import httpx
import numpy as np
import pytest

from tests.conftest import assert_json_error

ADDER = "/v1/models/adder:predict"


def post(client: httpx.Client, path: str, body: str | bytes) -> httpx.Response:
    return client.post(path, content=body, headers={"content-type": "application/json"})


def test_row_format_single_input(toy: httpx.Client) -> None:
    response = post(toy, ADDER, '{"instances": [[1, 2, 3], [4, 5, 6]]}')
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"predictions": [[2.0, 3.0, 4.0], [5.0, 6.0, 7.0]]}


def test_columnar_format_single_input(toy: httpx.Client) -> None:
    response = post(toy, ADDER, '{"inputs": [[1, 2, 3]]}')
    assert response.status_code == 200
    assert response.json() == {"outputs": [[2.0, 3.0, 4.0]]}


def test_row_format_named_single_input(toy: httpx.Client) -> None:
    response = post(toy, ADDER, '{"instances": [{"x": [1, 2, 3]}]}')
    assert response.status_code == 200
    assert response.json() == {"predictions": [[2.0, 3.0, 4.0]]}


def test_row_format_several_inputs_and_outputs(toy: httpx.Client) -> None:
    body = '{"instances": [{"a": [1.0, 2.0], "b": 3}, {"a": [0.0, 0.0], "b": -1}]}'
    response = post(toy, "/v1/models/twoin:predict", body)
    assert response.status_code == 200
    predictions = response.json()["predictions"]
    assert [row["sum"] for row in predictions] == [6.0, -1.0]
    assert predictions[1]["prob"] == [0.5, 0.5]
    assert predictions[0]["prob"][1] == pytest.approx(1 / (1 + math.exp(-1)), rel=1e-6)


def test_columnar_several_inputs(toy: httpx.Client) -> None:
    body = '{"inputs": {"a": [[1.0, 2.0]], "b": [3]}}'
    response = post(toy, "/v1/models/twoin:predict", body)
    assert response.status_code == 200
    outputs = response.json()["outputs"]
    assert outputs["sum"] == [6.0]
    assert len(outputs["prob"]) == 1


def test_columnar_missing_named_input(toy: httpx.Client) -> None:
    response = post(toy, "/v1/models/twoin:predict", '{"inputs": {"a": [[1.0, 2.0]]}}')
    message = assert_json_error(response, 400)
    assert "Missing named input: b" in message


def test_row_format_several_inputs_plain_list(toy: httpx.Client) -> None:
    response = post(toy, "/v1/models/twoin:predict", '{"instances": [[1.0, 2.0]]}')
    message = assert_json_error(response, 400)
    assert "instances[0] is not an object" in message


def test_row_format_extra_key(toy: httpx.Client) -> None:
    body = '{"instances": [{"a": [1.0, 2.0], "b": 1, "c": 2}]}'
    message = assert_json_error(post(toy, "/v1/models/twoin:predict", body), 400)
    assert "'c'" in message


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("", "empty"),
        ("[1,2,3]", "must be a JSON object"),
        ('{"instances": []}', "No values in 'instances' array"),
        ('{"instances": {"x": [1,2,3]}}', "'instances' must be a JSON array"),
        ('{"instances": [[1,2,3]], "inputs": {"x": [[1,2,3]]}}', "not both"),
        ('{"signature_name": 7, "instances": [[1,2,3]]}', "'signature_name' key must be a string"),
        ('{"signature_name": "nope", "instances": [[1,2,3]]}', 'signature name: "nope" not found'),
        ('{"foo": 1}', "Missing 'inputs' or 'instances' key"),
        ('{"instances": [[1,2,3]]} trailing', "JSON parse error"),
    ],
)
def test_ill_formed_bodies(toy: httpx.Client, body: str, expected: str) -> None:
    message = assert_json_error(post(toy, ADDER, body), 400)
    assert expected in message


def test_unknown_model_checked_before_body_keys(toy: httpx.Client) -> None:
    response = post(toy, "/v1/models/nosuch:predict", '{"foo": 1}')
    message = assert_json_error(response, 404)
    assert message == "Servable not found for request: Latest(nosuch)"


def test_unknown_version(toy: httpx.Client) -> None:
    response = post(toy, "/v1/models/adder/versions/9:predict", '{"instances": [[1,2,3]]}')
    message = assert_json_error(response, 404)
    assert message == "Servable not found for request: Specific(adder, 9)"


def test_explicit_version(toy: httpx.Client) -> None:
    response = post(toy, "/v1/models/adder/versions/1:predict", '{"instances": [[1,2,3]]}')
    assert response.status_code == 200
    assert response.json() == {"predictions": [[2.0, 3.0, 4.0]]}


def test_ragged_rows_single_input(toy: httpx.Client) -> None:
    response = post(toy, "/v1/models/seqlen:predict", '{"instances": [[5, 6, 7], [8, 9]]}')
    message = assert_json_error(response, 400)
    assert "[1] has 2 elements" in message
    assert "has 3" in message


def test_ragged_rows_several_inputs(toy: httpx.Client) -> None:
    body = '{"instances": [{"a": [1.0, 2.0], "b": 1}, {"a": [1.0], "b": 2}]}'
    message = assert_json_error(post(toy, "/v1/models/twoin:predict", body), 400)
    assert "[1] has 1 elements" in message


def test_client_padded_columns(toy: httpx.Client) -> None:
    body = '{"inputs": {"tokens": [[5, 6, 7], [8, 9, 0]]}}'
    response = post(toy, "/v1/models/seqlen:predict", body)
    assert response.status_code == 200
    assert response.json() == {"outputs": [3, 2]}


def test_row_output_without_batch_dimension(toy: httpx.Client) -> None:
    body = '{"instances": [{"a": [1, 2], "b": 3}]}'
    message = assert_json_error(post(toy, "/v1/models/twoin_const:predict", body), 400)
    assert "columnar" in message


def test_columnar_output_without_batch_dimension(toy: httpx.Client) -> None:
    body = '{"inputs": {"a": [[1, 2]], "b": [3]}}'
    response = post(toy, "/v1/models/twoin_const:predict", body)
    assert response.status_code == 200
    outputs = response.json()["outputs"]
    assert outputs["sum"] == [6.0]
    assert outputs["const"] == [0.5, 1.5]


def test_zero_row_output(toy: httpx.Client) -> None:
    response = post(toy, "/v1/models/filter:predict", '{"instances": [-1.0]}')
    assert response.status_code == 200
    assert response.json() == {"predictions": []}


@pytest.mark.parametrize("encoded", ["%3Apredict", "%3apredict"])
def test_percent_encoded_verb(toy: httpx.Client, encoded: str) -> None:
    response = post(toy, f"/v1/models/adder{encoded}", '{"instances": [[1,2,3]]}')
    assert response.status_code == 200
    assert response.json() == {"predictions": [[2.0, 3.0, 4.0]]}


def test_percent_encoded_slash_is_part_of_name(toy: httpx.Client) -> None:
    message = assert_json_error(toy.get("/v1/models/adder%2Fmetadata"), 404)
    assert "adder/metadata" in message


def test_fixed_words_are_case_insensitive(toy: httpx.Client) -> None:
    response = post(toy, "/V1/MODELS/adder:PREDICT", '{"instances": [[1,2,3]]}')
    assert response.status_code == 200


def test_b64_input_and_bytes_output(toy: httpx.Client) -> None:
    body = '{"instances": [{"b64": "aW1hZ2UgYnl0ZXM="}]}'
    response = post(toy, "/v1/models/echo:predict", body)
    assert response.status_code == 200
    prediction = response.json()["predictions"][0]
    assert prediction["text_bytes"] == {"b64": "aW1hZ2UgYnl0ZXM="}
    assert prediction["length"] == 11


def test_plain_string_input(toy: httpx.Client) -> None:
    response = post(toy, "/v1/models/echo:predict", '{"instances": ["héllo"]}')
    assert response.status_code == 200
    prediction = response.json()["predictions"][0]
    assert prediction["length"] == len("héllo".encode())


@pytest.mark.parametrize("text", ["-_-_", "aW1hZ2UgYnl0ZXM"])
def test_b64_rejects_url_safe_and_unpadded(toy: httpx.Client, text: str) -> None:
    body = json.dumps({"instances": [{"b64": text}]})
    message = assert_json_error(post(toy, "/v1/models/echo:predict", body), 400)
    assert "unable to base64 decode" in message


def test_b64_object_with_extra_key(toy: httpx.Client) -> None:
    body = '{"instances": [{"b64": "aW1hZ2UgYnl0ZXM=", "extra": 1}]}'
    message = assert_json_error(post(toy, "/v1/models/echo:predict", body), 400)
    assert "'extra'" in message
    assert "the model's inputs are 'text'" in message


def test_b64_object_for_float_input(toy: httpx.Client) -> None:
    message = assert_json_error(post(toy, ADDER, '{"instances": [{"b64": "AAAA"}]}'), 400)
    assert "FP32" in message


def test_onnx_string_tensor(toy: httpx.Client) -> None:
    body = '{"instances": ["a", "bé", {"b64": "eHl6"}]}'
    response = post(toy, "/v1/models/strings:predict", body)
    assert response.status_code == 200
    assert response.json() == {"predictions": ["a", "bé", "xyz"]}


def test_onnx_string_tensor_rejects_invalid_utf8(toy: httpx.Client) -> None:
    body = '{"instances": [{"b64": "/w=="}]}'
    message = assert_json_error(post(toy, "/v1/models/strings:predict", body), 400)
    assert "UTF-8" in message


def test_non_finite_tokens_in_request(toy: httpx.Client) -> None:
    body = '{"instances": [NaN, Infinity, -Infinity, 1.0]}'
    response = post(toy, "/v1/models/logm:predict", body)
    assert response.status_code == 200
    assert "NaN" in response.text
    predictions = json.loads(response.text)["predictions"]
    assert math.isnan(predictions[0])
    assert predictions[1] == math.inf
    assert math.isnan(predictions[2])
    assert predictions[3] == 0.0


def test_misspelled_nan_token(toy: httpx.Client) -> None:
    message = assert_json_error(post(toy, "/v1/models/logm:predict", '{"instances": [Nan]}'), 400)
    assert "JSON parse error" in message


def test_non_finite_outputs(toy: httpx.Client) -> None:
    response = post(toy, "/v1/models/logm:predict", '{"instances": [-1.0, 0.0, 1.0]}')
    assert response.status_code == 200
    assert response.text == '{"predictions":[NaN,-Infinity,0.0]}'


def test_float_formatting_is_valid_json(toy: httpx.Client) -> None:
    values = [0.6, 1e-39, 3.4e38, -0.0, 1435774380]
    response = post(toy, "/v1/models/tiny:predict", json.dumps({"instances": values}))
    assert response.status_code == 200
    assert "e-07.0" not in response.text
    predictions = json.loads(response.text, parse_constant=_reject_constant)["predictions"]
    expected = np.array(values, dtype=np.float32) * np.float32(1e-6)
    assert np.array_equal(np.array(predictions, dtype=np.float32), expected)


def _reject_constant(token: str) -> None:
    raise AssertionError(f"non-standard JSON token {token}")


@pytest.mark.parametrize(
    ("instances", "expected"),
    [
        ("[[1, 2, null]]", "null"),
        ('[[1, 2, "3"]]', "'3'"),
        ("[[1, 2], [3, 4]]", "shape"),
        ("[1, 2, 3]", "shape"),
        ("[[[1, 2, 3]]]", "shape"),
        ("[[1, [2], 3]]", "scalar"),
    ],
)
def test_wrong_values_for_float_input(toy: httpx.Client, instances: str, expected: str) -> None:
    message = assert_json_error(post(toy, ADDER, f'{{"instances": {instances}}}'), 400)
    assert expected in message


@pytest.mark.parametrize(
    ("instances", "expected"),
    [
        ("[[1.5, 2]]", "needs integers"),
        ("[[1, 9223372036854775808]]", "out of range"),
        ("[[1, 99999999999999999999999]]", "out of range"),
    ],
)
def test_wrong_values_for_integer_input(toy: httpx.Client, instances: str, expected: str) -> None:
    body = f'{{"inputs": {{"tokens": {instances}}}}}'
    message = assert_json_error(post(toy, "/v1/models/seqlen:predict", body), 400)
    assert expected in message


@pytest.mark.parametrize(
    "body",
    [
        '{"inputs": {"nope": [[1, 2, 3]]}}',
        '{"instances": [{"nope": [1, 2, 3]}]}',
        '{"instances": [{"x": [1, 2, 3], "extra": 1}]}',
    ],
)
def test_single_input_unknown_name(toy: httpx.Client, body: str) -> None:
    message = assert_json_error(post(toy, ADDER, body), 400)
    assert "'nope'" in message or "'extra'" in message
    assert "'x'" in message


@pytest.mark.parametrize("value", ["1e39", "10000000000000000000000000000000000000000"])
def test_float_overflow_rejected(toy: httpx.Client, value: str) -> None:
    message = assert_json_error(post(toy, ADDER, f'{{"instances": [[1, 2, {value}]]}}'), 400)
    assert "out of range for FP32" in message


def test_booleans_read_as_numbers(toy: httpx.Client) -> None:
    response = post(toy, ADDER, '{"instances": [[1, 2, true], [false, true, false]]}')
    assert response.status_code == 200
    assert response.json() == {"predictions": [[2.0, 3.0, 2.0], [1.0, 2.0, 1.0]]}


def test_large_integers_round_to_float32(toy: httpx.Client) -> None:
    response = post(
        toy, "/v1/models/logm:predict", '{"instances": [1e400, 100000000000000000000000]}'
    )
    assert response.status_code == 200
    predictions = json.loads(response.text)["predictions"]
    assert predictions[0] == math.inf
    assert predictions[1] == pytest.approx(math.log(1e23), rel=1e-6)


def test_deeply_nested_body(toy: httpx.Client) -> None:
    body = '{"instances": ' + "[" * 5000 + "]" * 5000 + "}"
    message = assert_json_error(post(toy, ADDER, body), 400)
    assert message


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/models/adder:predict"),
        ("PUT", "/v1/models/adder"),
        ("DELETE", "/v1/models/adder/metadata"),
        ("POST", "/v1/models/adder:explode"),
        ("POST", "/v1/models/adder/versions/-1:predict"),
        ("POST", "/v1/models/adder/versions/abc:predict"),
        ("POST", "/v1/models/adder/versions/:predict"),
        ("GET", "/v1/models/"),
    ],
)
def test_malformed_paths(toy: httpx.Client, method: str, path: str) -> None:
    message = assert_json_error(toy.request(method, path, content=b"{}"), 400)
    assert message.startswith("Malformed request")


def test_missing_model_name(toy: httpx.Client) -> None:
    message = assert_json_error(toy.get("/v1/models"), 400)
    assert message == "Missing model name in request."


def test_zero_padded_version_in_path(toy: httpx.Client) -> None:
    response = post(toy, "/v1/models/adder/versions/01:predict", '{"instances": [[1,2,3]]}')
    assert response.status_code == 200


def test_unknown_label(toy: httpx.Client) -> None:
    response = post(toy, "/v1/models/adder/labels/nope:predict", '{"instances": [[1,2,3]]}')
    message = assert_json_error(response, 400)
    assert message == "Unrecognized servable version label: nope"

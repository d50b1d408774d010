"""TF Serving's :classify and :regress over REST."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_digits

from tests.conftest import assert_json_error


def call(client: httpx.Client, path: str, body: object) -> httpx.Response:
    return client.post(path, json=body)


def test_regress(toy: httpx.Client) -> None:
    response = call(toy, "/v1/models/hp:regress", {"examples": [{"x": 1.0}, {"x": [2.0]}]})
    assert response.status_code == 200
    assert response.json() == {"results": [2.5, 3.0]}


def test_regress_with_context(toy: httpx.Client) -> None:
    body = {"context": {"b": 1}, "examples": [{"a": [1.0, 2.0]}, {"a": [0.0, 0.5]}]}
    response = call(toy, "/v1/models/twoin:regress", body)
    assert response.status_code == 200
    assert response.json() == {"results": [4.0, 1.5]}


def test_classify_single_score(toy: httpx.Client) -> None:
    response = call(toy, "/v1/models/hp:classify", {"examples": [{"x": 10.0}]})
    assert response.status_code == 200
    assert response.json() == {"results": [[["", 7.0]]]}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"context": {"x": 1.0}, "examples": [{"x": 2.0}]}, "context"),
        ({"examples": []}, "must not be empty"),
        ({}, "When method is regress, key 'examples' is expected and was not found"),
        ({"examples": {"x": 1.0}}, "must be a JSON array"),
        ({"examples": [1.0]}, "examples[0] must be an object"),
        ({"examples": [{"y": 1.0}]}, "missing feature 'x'"),
        ({"examples": [{"x": 1.0, "z": 2}]}, "feature 'z'"),
        ({"examples": [{"x": "a"}]}, "FP32"),
        ({"context": [], "examples": [{"x": 1.0}]}, "'context' must be an object"),
    ],
)
def test_regress_errors(toy: httpx.Client, body: object, expected: str) -> None:
    message = assert_json_error(call(toy, "/v1/models/hp:regress", body), 400)
    assert expected in message


def test_classify_digits(examples: httpx.Client) -> None:
    digits = load_digits()
    body = {"examples": [{"pixels": row.tolist()} for row in digits.data[:3]]}
    response = call(examples, "/v1/models/digits:classify", body)
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == 3
    for result, target in zip(results, digits.target[:3], strict=True):
        assert [label for label, _ in result] == [str(index) for index in range(10)]
        scores = np.array([score for _, score in result])
        assert int(scores.argmax()) == target
        assert scores.sum() == pytest.approx(1.0, abs=1e-5)

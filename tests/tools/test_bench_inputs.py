"""Inputs of `servekit bench`: files of real rows, random tensors and their encodings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as parquet
import pytest

from servekit.core.types import DataType, TensorSpec
from servekit.tools.bench.requests import (
    FILE_POOL_SIZE,
    Target,
    encode,
    encode_pool,
    file_inputs,
    random_inputs,
)

SPECS = [TensorSpec("a", DataType.FP32, (-1, 2)), TensorSpec("b", DataType.INT64, (-1,))]
ROWS_A = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
ROWS_B = [7, 8, 9]


def check(arrays: dict[str, np.ndarray]) -> None:
    assert arrays["a"].dtype == np.float32
    assert arrays["a"].tolist() == ROWS_A
    assert arrays["b"].dtype == np.int64
    assert arrays["b"].tolist() == ROWS_B


def test_npz(tmp_path: Path) -> None:
    path = tmp_path / "rows.npz"
    np.savez(path, a=np.array(ROWS_A), b=np.array(ROWS_B))
    check(file_inputs(path, SPECS))


def test_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    lines = [json.dumps({"a": a, "b": b}) for a, b in zip(ROWS_A, ROWS_B, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    check(file_inputs(path, SPECS))


def test_parquet(tmp_path: Path) -> None:
    path = tmp_path / "rows.parquet"
    parquet.write_table(pa.table({"a": ROWS_A, "b": ROWS_B}), path)
    check(file_inputs(path, SPECS))


def test_missing_input_and_wrong_kind(tmp_path: Path) -> None:
    path = tmp_path / "rows.npz"
    np.savez(path, a=np.array(ROWS_A))
    with pytest.raises(ValueError, match="no data for input"):
        file_inputs(path, SPECS)
    single = tmp_path / "rows.npy"
    np.save(single, np.array(ROWS_A))
    with pytest.raises(ValueError, match=r"use \.npz"):
        file_inputs(single, SPECS)
    with pytest.raises(ValueError, match="unsupported input file"):
        file_inputs(tmp_path / "rows.csv", SPECS)


def test_random_inputs_follow_the_metadata() -> None:
    specs = [TensorSpec("x", DataType.FP16, (-1, 3)), TensorSpec("t", DataType.BYTES, (-1,))]
    arrays = random_inputs(specs, rows=2)
    assert arrays["x"].dtype == np.float16
    assert arrays["x"].shape[1] == 3
    assert arrays["t"].dtype == object
    payloads = encode_pool(Target("http://h", "v2", "m"), specs, arrays, rows=2)
    document = json.loads(payloads[0].body)
    assert [item["shape"] for item in document["inputs"]] == [[2, 3], [2]]
    assert all(isinstance(text, str) for text in document["inputs"][1]["data"])


def test_file_rows_fill_a_larger_pool(tmp_path: Path) -> None:
    """Every text of a file is sent, not only the first 64, and JSON text arrives as bytes."""
    texts = [f"text number {index}" for index in range(300)]
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps({"t": t}) + "\n" for t in texts))
    specs = [TensorSpec("t", DataType.BYTES, (-1,))]
    arrays = file_inputs(tmp_path / "texts.jsonl", specs)
    assert arrays["t"][0] == b"text number 0"
    payloads = encode_pool(Target("http://h", "v2", "m"), specs, arrays, 1, FILE_POOL_SIZE)
    assert len(payloads) == 300
    assert json.loads(payloads[-1].body)["inputs"][0]["data"] == ["text number 299"]


def test_float32_json_is_shortest() -> None:
    batch = {"a": np.array([[0.1, 0.2]], np.float32), "b": np.array([1])}
    body = encode(Target("http://h", "tfserving", "m"), SPECS, batch).body
    assert body == b'{"inputs":{"a":[[0.1,0.2]],"b":[1]}}'

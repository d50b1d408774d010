"""`servekit batch` with the local engine: the same predictions as in process, and resumable."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.datasets import load_digits

from servekit.examples import EXAMPLE_REPOSITORY
from tests.toy_models import write_python_model

DIGITS = EXAMPLE_REPOSITORY / "digits"
COLUMNS = [f"p{index}" for index in range(64)]


def run(*arguments: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "servekit", "batch", *arguments, "--no-progress"],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def report_of(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


@pytest.fixture(scope="module")
def pixels() -> np.ndarray[Any, Any]:
    """Three thousand rows of scikit-learn's digits, as FP32."""
    data = load_digits().data.astype(np.float32)
    return np.concatenate([data, data[:1203]])


def expected(rows: np.ndarray[Any, Any]) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    session = ort.InferenceSession(str(DIGITS / "1" / "model.onnx"))
    labels, probabilities = session.run(None, {"pixels": rows})
    return labels, probabilities


def pixel_column(rows: np.ndarray[Any, Any]) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), 64)


def test_parquet_predictions_equal_in_process(pixels: np.ndarray[Any, Any], tmp_path: Path) -> None:
    pq.write_table(pa.table({"pixels": pixel_column(pixels)}), tmp_path / "digits.parquet")
    report = report_of(
        run(str(DIGITS), "--input", str(tmp_path / "digits.parquet"),
            "--output", str(tmp_path / "out"), "--batch-size", "500", "--workers", "2")
    )  # fmt: skip
    assert report["rows"] == len(pixels)
    assert report["rejected"] == 0
    table = pq.read_table(tmp_path / "out" / "digits.parquet")
    assert table.column_names == ["id", "label", "probabilities"]
    assert table.column("id").to_pylist() == list(range(len(pixels)))
    labels, probabilities = expected(pixels)
    assert table.column("label").to_pylist() == labels.tolist()
    assert np.allclose(np.array(table.column("probabilities").to_pylist()), probabilities)
    assert (tmp_path / "out" / "_errors" / "digits.jsonl").read_text() == ""


@pytest.mark.parametrize("form", ["csv", "jsonl", "npy"])
def test_other_formats_and_input_columns(
    pixels: np.ndarray[Any, Any], tmp_path: Path, form: str
) -> None:
    rows = pixels[:400]
    path = tmp_path / f"digits.{form}"
    arguments = []
    if form == "csv":
        with path.open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["id", *COLUMNS])
            writer.writerows([5000 + index, *row] for index, row in enumerate(rows.tolist()))
        arguments = ["--input-columns", ",".join(COLUMNS)]
    elif form == "jsonl":
        path.write_text(
            "".join(json.dumps({"id": f"r{i}", "pixels": row}) + "\n"
                    for i, row in enumerate(rows.tolist()))
        )  # fmt: skip
    else:
        np.save(path, rows)
    report = report_of(
        run(str(DIGITS), "--input", str(path), "--output", str(tmp_path / "out"),
            "--batch-size", "128", "--workers", "1", *arguments)
    )  # fmt: skip
    assert report["rows"] == 400
    table = pq.read_table(tmp_path / "out" / "digits.parquet")
    ids = {"csv": [5000 + i for i in range(400)], "jsonl": [f"r{i}" for i in range(400)],
           "npy": list(range(400))}[form]  # fmt: skip
    assert table.column("id").to_pylist() == ids
    assert table.column("label").to_pylist() == expected(rows)[0].tolist()


def test_bad_rows_go_to_the_errors_file(pixels: np.ndarray[Any, Any], tmp_path: Path) -> None:
    values: list[Any] = pixels[:6].tolist()
    values[1] = None
    values[4] = values[4][:10]
    ids = [10, 11, 12, 13, 14, 15]
    table = pa.table({"id": ids, "pixels": pa.array(values, pa.list_(pa.float32()))})
    pq.write_table(table, tmp_path / "bad.parquet")
    report = report_of(
        run(str(DIGITS), "--input", str(tmp_path / "bad.parquet"),
            "--output", str(tmp_path / "out"), "--workers", "1")
    )  # fmt: skip
    assert (report["rows"], report["rejected"]) == (4, 2)
    errors = [
        json.loads(line) for line in (tmp_path / "out/_errors/bad.jsonl").read_text().splitlines()
    ]
    assert [error["id"] for error in errors] == [11, 14]
    assert "empty" in errors[0]["reason"]
    assert "has 10 values, but input 'pixels' takes 64" in errors[1]["reason"]
    scored = pq.read_table(tmp_path / "out" / "bad.parquet")
    assert scored.column("id").to_pylist() == [10, 12, 13, 15]

    failed = run(str(DIGITS), "--input", str(tmp_path / "bad.parquet"),
                 "--output", str(tmp_path / "strict"), "--fail-fast")  # fmt: skip
    assert failed.returncode == 1
    assert "row 11 was rejected" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert not list((tmp_path / "strict").glob("*.parquet"))


FLAKY_MODEL = """
import time

import numpy as np


class Model:
    inputs = [("x", "FP32", [-1])]
    outputs = [("y", "FP32", [-1])]

    def predict(self, inputs):
        x = inputs["x"]
        if (x == 13).any():
            raise ValueError("thirteen is unlucky")
        time.sleep(0.02)
        return {"y": x * 2}
"""


def test_failing_rows_are_found_by_halving(tmp_path: Path) -> None:
    write_python_model(tmp_path / "models", "flaky", FLAKY_MODEL)
    values = np.arange(40, dtype=np.float32)
    pq.write_table(pa.table({"x": values}), tmp_path / "x.parquet")
    report = report_of(
        run(str(tmp_path / "models" / "flaky"), "--input", str(tmp_path / "x.parquet"),
            "--output", str(tmp_path / "out"), "--workers", "1")
    )  # fmt: skip
    assert (report["rows"], report["rejected"]) == (39, 1)
    (error,) = [
        json.loads(line) for line in (tmp_path / "out/_errors/x.jsonl").read_text().splitlines()
    ]
    assert error["id"] == 13
    assert "thirteen is unlucky" in error["reason"]
    table = pq.read_table(tmp_path / "out" / "x.parquet")
    assert table.column("y").to_pylist() == [v * 2 for v in values.tolist() if v != 13]


SLOW_MODEL = """
import time


class Model:
    inputs = [("x", "FP32", [-1])]
    outputs = [("y", "FP32", [-1])]

    def predict(self, inputs):
        time.sleep(0.05)
        return {"y": inputs["x"] + 1}
"""


def test_rerun_after_a_kill_resumes_without_duplicates(tmp_path: Path) -> None:
    write_python_model(tmp_path / "models", "slow", SLOW_MODEL)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for part in range(5):
        values = np.arange(part * 1000, (part + 1) * 1000, dtype=np.float32)
        pq.write_table(pa.table({"x": values}), inputs / f"part-{part}.parquet")
    output = tmp_path / "out"
    command = [sys.executable, "-m", "servekit", "batch", str(tmp_path / "models" / "slow"),
               "--input", str(inputs), "--output", str(output), "--batch-size", "100",
               "--workers", "1", "--no-progress"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not list(output.glob("part-*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(10)
    done = sorted(path.name for path in output.glob("part-*.parquet"))
    assert 1 <= len(done) < 5
    # Whatever the kill left, every visible output is whole.
    assert all(pq.read_table(output / name).num_rows == 1000 for name in done)

    report = report_of(
        run(
            str(tmp_path / "models" / "slow"),
            "--input",
            str(inputs),
            "--output",
            str(output),
            "--batch-size",
            "100",
            "--workers",
            "1",
        )
    )
    assert report["files_skipped"] == done
    assert sorted(report["files_written"] + done) == [f"part-{p}.parquet" for p in range(5)]
    for part in range(5):
        table = pq.read_table(output / f"part-{part}.parquet")
        assert table.column("id").to_pylist() == list(range(1000))
        expected_y = np.arange(part * 1000, (part + 1) * 1000, dtype=np.float32) + 1
        assert table.column("y").to_pylist() == expected_y.tolist()
    assert not list(output.glob(".*partial"))
    assert not list(output.glob("_errors/.*partial"))


@pytest.mark.parametrize(
    ("arguments", "expected_error"),
    [
        (["--input-columns", "a,b"], "--input-columns names 2 columns"),
        (["--version", "9"], "has no version 9"),
    ],
)
def test_usage_errors(
    pixels: np.ndarray[Any, Any], tmp_path: Path, arguments: list[str], expected_error: str
) -> None:
    pq.write_table(pa.table({"pixels": pixel_column(pixels[:10])}), tmp_path / "d.parquet")
    result = run(str(DIGITS), "--input", str(tmp_path / "d.parquet"),
                 "--output", str(tmp_path / "out"), *arguments)  # fmt: skip
    assert result.returncode == 1
    assert expected_error in result.stderr
    assert "Traceback" not in result.stderr


def test_folder_problems_are_named(pixels: np.ndarray[Any, Any], tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    pq.write_table(pa.table({"pixels": pixel_column(pixels[:50])}), inputs / "a.parquet")
    (inputs / "b.parquet").write_bytes(b"not parquet at all")
    broken = run(str(DIGITS), "--input", str(inputs), "--output", str(tmp_path / "out"))
    assert broken.returncode == 1
    assert "b.parquet" in broken.stderr
    assert "Traceback" not in broken.stderr
    # The file before the broken one is complete, so a rerun after the fix skips it.
    assert pq.read_table(tmp_path / "out" / "a.parquet").num_rows == 50

    (inputs / "b.parquet").unlink()
    np.save(inputs / "a.npy", pixels[:5])
    clash = run(str(DIGITS), "--input", str(inputs), "--output", str(tmp_path / "out2"))
    assert clash.returncode == 1
    assert "would both be written as a.parquet" in clash.stderr
    (inputs / "a.npy").unlink()
    same = run(str(DIGITS), "--input", str(inputs), "--output", str(inputs))
    assert same.returncode == 1
    assert "--output must be another folder than --input" in same.stderr


def test_missing_values_inside_lists_are_rejected(
    pixels: np.ndarray[Any, Any], tmp_path: Path
) -> None:
    values: list[Any] = pixels[:4].tolist()
    values[2][5] = None
    values[3][7] = float("nan")
    table = pa.table({"pixels": pa.array(values, pa.list_(pa.float32()))})
    pq.write_table(table, tmp_path / "holes.parquet")
    report = report_of(
        run(str(DIGITS), "--input", str(tmp_path / "holes.parquet"),
            "--output", str(tmp_path / "out"), "--workers", "1")
    )  # fmt: skip
    # A missing value rejects its row; NaN is a number and reaches the model.
    assert (report["rows"], report["rejected"]) == (3, 1)
    errors = (tmp_path / "out" / "_errors" / "holes.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in errors] == [2]
    assert "empty value in its list" in errors[0]

"""`servekit convert keras|saved-model` and TFLite quantization of a Keras MLP on digits."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_digits

from tests.conftest import ServerProcess
from tests.runtimes.test_tensorflow_runtime import save_module, train_digits_mlp

pytestmark = [
    pytest.mark.extras,
    # Keras 3.15 reads TensorFlow 2.21 variables with np.array(copy=False), which numpy 2 warns
    # about when it saves a model.
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]


def servekit(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "servekit", *arguments],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def report_of(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    start = result.stdout.index("{\n")
    report: dict[str, Any] = json.loads(result.stdout[start:])
    return report


def held_out_rows() -> np.ndarray[Any, Any]:
    return (load_digits().data[1500:] / 16.0).astype(np.float32)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The trained Keras model, saved as a .keras file and as a SavedModel, and sample rows."""
    root = tmp_path_factory.mktemp("tensorflow_sources")
    model = train_digits_mlp()
    model.save(root / "digits.keras")
    model.export(str(root / "saved_model"), verbose=False)
    np.save(root / "sample.npy", held_out_rows())
    return {"root": root, "model": model}


@pytest.fixture(scope="module")
def converted(sources: dict[str, Any]) -> dict[str, Any]:
    """Three conversions into a repository: Keras to ONNX and TFLite, SavedModel to ONNX."""
    root = sources["root"]
    repository = root / "repository"
    sample = str(root / "sample.npy")
    runs = {
        "keras_onnx": ["keras", str(root / "digits.keras"), "--output",
                       str(repository / "digits"), "--sample", sample],
        "keras_tflite": ["keras", str(root / "digits.keras"), "--output",
                         str(repository / "digits"), "--sample", sample, "--format", "tflite"],
        "saved_onnx": ["saved-model", str(root / "saved_model"), "--output",
                       str(repository / "digits_saved"), "--sample", sample],
    }  # fmt: skip
    reports = {name: report_of(servekit("convert", *arguments)) for name, arguments in runs.items()}
    return {"repository": repository, "reports": reports}


def test_conversion_reports(converted: dict[str, Any]) -> None:
    reports = converted["reports"]
    repository = converted["repository"]
    for name, version, model_file in [
        ("keras_onnx", 1, "model.onnx"),
        ("keras_tflite", 2, "model.tflite"),
        ("saved_onnx", 1, "model.onnx"),
    ]:
        report = reports[name]
        assert report["version"] == version, name
        assert report["rows_compared"] == 297, name
        assert report["max_difference"] < 1e-5, name
        folder = Path(report["written"])
        assert folder.parent.parent == repository
        assert sorted(path.name for path in folder.iterdir()) == ["convert.json", model_file]
    assert list(reports["keras_onnx"]["max_difference_per_output"]) == ["probabilities"]
    assert list(reports["saved_onnx"]["max_difference_per_output"]) == ["output_0"]


def test_converted_files_match_keras(sources: dict[str, Any], converted: dict[str, Any]) -> None:
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    rows = held_out_rows()
    expected = sources["model"](rows, training=False).numpy()
    repository = converted["repository"]
    for path, output in [
        (repository / "digits" / "1" / "model.onnx", "probabilities"),
        (repository / "digits_saved" / "1" / "model.onnx", "output_0"),
    ]:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [node.name for node in session.get_inputs()] == ["pixels"]
        (actual,) = session.run([output], {"pixels": rows})
        assert np.allclose(actual, expected, atol=1e-5), path
    runner = Interpreter(
        model_path=str(repository / "digits" / "2" / "model.tflite")
    ).get_signature_runner("serving_default")
    assert np.allclose(runner(pixels=rows)["probabilities"], expected, atol=1e-5)


def test_converted_versions_are_served(sources: dict[str, Any], converted: dict[str, Any]) -> None:
    rows = held_out_rows()[:40]
    expected = sources["model"](rows, training=False).numpy()
    repository = converted["repository"]
    (repository / "digits" / "servekit.yaml").write_text("version_policy: {all: {}}\n")
    server = ServerProcess("--model_repository", str(repository))
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            predictions = {
                path: client.post(path, json={"instances": rows.tolist()}).json()
                for path in [
                    "/v1/models/digits/versions/1:predict",
                    "/v1/models/digits/versions/2:predict",
                    "/v1/models/digits_saved:predict",
                ]
            }
            platform = client.get("/v2/models/digits/versions/2").json()["platform"]
    finally:
        server.stop()
    assert platform == "tflite"
    for path, body in predictions.items():
        served = np.array(body["predictions"], np.float32)
        assert np.allclose(served, expected, atol=1e-5), path


def test_mismatch_writes_nothing(tmp_path: Path) -> None:
    import tensorflow as tf

    # The two runtimes draw different random numbers, so the outputs cannot agree.
    noisy = tf.function(
        lambda x: {"y": x + tf.random.uniform(tf.shape(x))},
        input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")],
    )
    save_module(tmp_path / "noisy", {"serving_default": noisy})
    np.save(tmp_path / "sample.npy", np.zeros((8, 4), np.float32))
    result = servekit(
        "convert", "saved-model", str(tmp_path / "noisy"), "--output", str(tmp_path / "out"),
        "--sample", str(tmp_path / "sample.npy"),
    )  # fmt: skip
    assert result.returncode == 1
    assert "nothing written" in result.stderr
    assert "Traceback" not in result.stderr
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(
    ("mode", "source", "method"),
    [
        ("int8-dynamic", "saved_model", "dynamic-range"),
        ("int8-static", "digits.keras", "full-integer"),
    ],
)
def test_tflite_quantization(
    sources: dict[str, Any], tmp_path: Path, mode: str, source: str, method: str
) -> None:
    root = sources["root"]
    folder = tmp_path / "digits"
    if source == "saved_model":
        shutil.copytree(root / source, folder / "1")
    else:
        (folder / "1").mkdir(parents=True)
        shutil.copy(root / source, folder / "1" / "model.keras")

    digits = load_digits()
    np.savez(tmp_path / "validation.npz", pixels=held_out_rows(), labels=digits.target[1500:])
    np.savez(tmp_path / "calibration.npz", pixels=(digits.data[:256] / 16.0).astype(np.float32))

    report = report_of(
        servekit(
            "quantize", str(folder), "--version", "1", "--mode", mode,
            "--calibration", str(tmp_path / "calibration.npz"),
            "--validation", str(tmp_path / "validation.npz"),
            "--max-accuracy-drop", "0.02", "--seconds", "0.2",
        )
    )  # fmt: skip
    assert report["format"] == "tflite"
    assert report["method"] == method
    assert report["size_bytes"]["quantized"] < report["size_bytes"]["original"] / 3

    quality = report["quality"]
    assert quality["rows"] == 297
    assert quality["accuracy_original"] >= 0.85
    assert quality["accuracy_drop"] <= 0.02
    assert quality["agreement"] >= 0.97
    for side in ("original", "quantized"):
        assert report["speed"][side]["latency_ms_batch_1"] > 0
        assert report["speed"][side]["rows_per_second_batch_32"] > 0

    assert sorted(path.name for path in (folder / "2").iterdir()) == [
        "model.tflite", "quantize.json",
    ]  # fmt: skip
    assert not any(path.name.startswith(".") for path in folder.iterdir())


def test_tflite_quantization_rejects_per_channel(sources: dict[str, Any], tmp_path: Path) -> None:
    folder = tmp_path / "digits"
    shutil.copytree(sources["root"] / "saved_model", folder / "1")
    result = servekit("quantize", str(folder), "--version", "1", "--per-channel")
    assert result.returncode == 1
    assert "--per-channel applies to ONNX models only" in result.stderr
    assert sorted(path.name for path in folder.iterdir()) == ["1"]

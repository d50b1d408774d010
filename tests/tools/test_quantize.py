"""`servekit quantize` on the example MLP, checked on held-out digits."""

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

from servekit.examples import EXAMPLE_REPOSITORY
from servekit.examples.build import digits_split, upscale_to_mnist
from tests.conftest import ServerProcess


@pytest.fixture
def mlp(tmp_path: Path) -> Path:
    folder = tmp_path / "mnist_mlp"
    shutil.copytree(EXAMPLE_REPOSITORY / "mnist_mlp", folder)
    train_x, test_x, _, test_y = digits_split()
    images = upscale_to_mnist(test_x).astype(np.float32)
    np.savez(tmp_path / "validation.npz", images=images, labels=test_y)
    np.savez(tmp_path / "calibration.npz", images=upscale_to_mnist(train_x[:128]))
    return folder


def run(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "servekit", "quantize", *arguments],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def report_of(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    start = result.stdout.index("{\n")
    report: dict[str, Any] = json.loads(result.stdout[start:])
    return report


@pytest.mark.parametrize("mode", ["int8-dynamic", "int8-static"])
def test_int8_version_is_smaller_and_agrees(mlp: Path, mode: str) -> None:
    validation = str(mlp.parent / "validation.npz")
    report = report_of(
        run(str(mlp), "--version", "1", "--mode", mode, "--per-channel",
            "--calibration", str(mlp.parent / "calibration.npz"),
            "--validation", validation, "--max-accuracy-drop", "0.02", "--seconds", "0.2")
    )  # fmt: skip
    assert report["output_version"] == 2
    assert report["size_bytes"]["quantized"] < report["size_bytes"]["original"] / 3
    quality = report["quality"]
    assert quality["rows"] == 450
    assert quality["accuracy_original"] >= 0.97
    assert quality["accuracy_drop"] <= 0.02
    assert quality["agreement"] >= 0.98
    assert quality["probabilities"]["mean_cosine"] > 0.999
    written = mlp / "2"
    assert sorted(path.name for path in written.iterdir()) == ["model.onnx", "quantize.json"]
    assert not any(path.name.startswith(".") for path in mlp.iterdir())

    # The server serves the new version beside the original, with the same predictions.
    images = np.load(validation)["images"][:20]
    (mlp / "servekit.yaml").write_text("version_policy: {all: {}}\n")
    server = ServerProcess("--model_base_path", str(mlp), "--model_name", "mlp")
    try:
        predictions = [
            np.array(
                httpx.post(
                    f"{server.url}/v1/models/mlp/versions/{version}:predict",
                    json={"instances": images.tolist()},
                ).json()["predictions"]
            )
            for version in (1, 2)
        ]
    finally:
        server.stop()
    agreement = np.mean(predictions[0].argmax(axis=1) == predictions[1].argmax(axis=1))
    assert agreement >= 0.95


def test_quality_limit_writes_nothing(mlp: Path) -> None:
    result = run(
        str(mlp), "--version", "1", "--validation", str(mlp.parent / "validation.npz"),
        "--min-cosine", "1", "--seconds", "0.1",
    )  # fmt: skip
    assert result.returncode == 1
    assert "nothing written" in result.stderr
    assert sorted(path.name for path in mlp.iterdir()) == ["1"]


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["--version", "7"], "does not exist"),
        (["--version", "1", "--mode", "int8-static"], "needs --calibration"),
        (["--version", "1", "--output-version", "1"], "already exists"),
        (["--version", "1", "--max-accuracy-drop", "0.1"], "need --validation"),
    ],
)
def test_usage_errors(mlp: Path, arguments: list[str], expected: str) -> None:
    result = run(str(mlp), *arguments, "--seconds", "0.1")
    assert result.returncode == 1
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(path.name for path in mlp.iterdir()) == ["1"]


def test_quality_limit_tries_per_channel_before_giving_up(mlp: Path) -> None:
    result = run(
        str(mlp), "--version", "1", "--validation", str(mlp.parent / "validation.npz"),
        "--min-cosine", "1", "--seconds", "0.1",
    )  # fmt: skip
    assert result.returncode == 1
    assert "also with one scale per channel" in result.stderr


PYTHON_MODEL = """
import numpy as np
import onnxruntime as ort


class Model:
    inputs = [("pixels", "FP32", [-1, 784])]
    outputs = [("scores", "FP32", [-1, 10])]

    def load(self, directory, options):
        settings = ort.SessionOptions()
        settings.intra_op_num_threads = options.intra_op_threads
        self.session = ort.InferenceSession(str(directory / "net.onnx"), settings)
        self.threads = options.intra_op_threads

    def predict(self, inputs):
        (name,) = [node.name for node in self.session.get_inputs()]
        return {"scores": self.session.run(None, {name: inputs["pixels"]})[-1]}
"""


def test_file_inside_a_python_model(mlp: Path) -> None:
    """--file quantizes one ONNX file of a Python model, measured through model.py."""
    version = mlp / "1"
    (version / "model.onnx").rename(version / "net.onnx")
    (version / "model.py").write_text(PYTHON_MODEL)
    images = np.load(mlp.parent / "validation.npz")["images"]
    labels = np.load(mlp.parent / "validation.npz")["labels"]
    np.savez(mlp.parent / "pixels.npz", pixels=images, labels=labels)
    report = report_of(
        run(str(mlp), "--version", "1", "--file", "net.onnx", "--per-channel",
            "--validation", str(mlp.parent / "pixels.npz"), "--max-accuracy-drop", "0.02",
            "--seconds", "0.1")
    )  # fmt: skip
    assert report["file"] == "net.onnx"
    assert report["quality"]["rows"] == 450
    assert report["quality"]["agreement"] >= 0.98
    assert report["size_bytes"]["quantized"] < report["size_bytes"]["original"] / 3
    assert sorted(path.name for path in (mlp / "2").iterdir()) == [
        "model.py", "net.onnx", "quantize.json",
    ]  # fmt: skip


def test_models_without_quantizable_operators(tmp_path: Path) -> None:
    """skl2onnx's models (two default-domain opsets, ML operators) get a clear error."""
    folder = tmp_path / "digits"
    shutil.copytree(EXAMPLE_REPOSITORY / "digits", folder)
    int8 = run(str(folder), "--version", "1", "--seconds", "0.1")
    assert int8.returncode == 1
    assert "no operator of model.onnx can be quantized to int8" in int8.stderr
    assert "LinearClassifier" in int8.stderr
    assert sorted(path.name for path in folder.iterdir()) == ["1"]
    fp16 = run(str(folder), "--version", "1", "--mode", "fp16", "--seconds", "0.1")
    assert report_of(fp16)["output_version"] == 2

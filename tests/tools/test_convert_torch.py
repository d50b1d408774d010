"""`servekit convert pytorch`: TorchScript and torch.export digits models, served as ONNX."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from tests.conftest import ServerProcess
from tests.runtimes.test_torch_runtime import (
    DigitsModel,
    save_exported,
    save_torchscript,
    train_digits_mlp,
)

pytestmark = [
    pytest.mark.extras,
    # PyTorch 2.13 deprecates TorchScript, which these tests build on purpose.
    pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning"),
]


def run(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "servekit", "convert", "pytorch", *arguments],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip


@pytest.fixture(scope="module")
def digits() -> DigitsModel:
    return train_digits_mlp()


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    from sklearn.datasets import load_digits

    path = tmp_path / "sample.npy"
    np.save(path, (load_digits().data[1500:] / 16.0).astype(np.float32))
    return path


def test_exported_program_is_served_as_onnx(
    digits: DigitsModel, sample: Path, tmp_path: Path
) -> None:
    save_exported(digits.module, tmp_path / "source")
    folder = tmp_path / "repository" / "digits"
    result = run(
        str(tmp_path / "source" / "model.pt2"), "--output", str(folder),
        "--sample", str(sample), "--allow-pickle",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["format"] == "torch.export"
    assert report["rows_compared"] == 297
    assert report["max_difference"] < 1e-4
    assert report["label_agreement"] == 1.0
    assert list(report["outputs"]) == ["output_0"]
    assert "can run code" in result.stderr  # the warning naming the file
    assert json.loads((folder / "1" / "convert.json").read_text())["version"] == 1

    server = ServerProcess("--model_repository", str(folder.parent))
    try:
        metadata = httpx.get(f"{server.url}/v2/models/digits").json()
        response = httpx.post(
            f"{server.url}/v1/models/digits:predict", json={"instances": digits.rows.tolist()}
        )
    finally:
        server.stop()
    # The ONNX version keeps the names that the server gives the .pt2 file itself.
    assert metadata["platform"] == "onnx_onnxv1"
    assert metadata["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
    assert metadata["outputs"] == [{"name": "output_0", "datatype": "FP32", "shape": [-1, 10]}]
    served = np.array(response.json()["predictions"], np.float32)
    assert np.allclose(served, digits.scores(digits.rows), atol=1e-5)


def test_torchscript_converts_with_dynamic_batch(
    digits: DigitsModel, sample: Path, tmp_path: Path
) -> None:
    save_torchscript(digits, tmp_path / "source")
    result = run(
        str(tmp_path / "source" / "model.pt"), "--output", str(tmp_path / "digits"),
        "--sample", str(sample), "--allow-pickle", "--version", "7",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["format"] == "torchscript"
    assert report["version"] == 7
    assert report["max_difference"] < 1e-4

    session = ort.InferenceSession(
        str(tmp_path / "digits" / "7" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    assert [node.name for node in session.get_inputs()] == ["pixels"]
    assert session.get_inputs()[0].shape == ["batch", 64]
    for count in (1, 30):
        rows = digits.rows[:count]
        (scores,) = session.run(["output_0"], {"pixels": rows})
        assert np.allclose(scores, digits.scores(rows), atol=1e-5)


def test_strict_tolerance_writes_nothing(digits: DigitsModel, sample: Path, tmp_path: Path) -> None:
    save_exported(digits.module, tmp_path / "source")
    result = run(
        str(tmp_path / "source" / "model.pt2"), "--output", str(tmp_path / "out"),
        "--sample", str(sample), "--allow-pickle", "--tolerance", "0",
    )  # fmt: skip
    assert result.returncode == 1
    assert "nothing written" in result.stderr
    assert not (tmp_path / "out").exists()


def test_fixed_batch_program_is_rejected(digits: DigitsModel, sample: Path, tmp_path: Path) -> None:
    import torch

    program = torch.export.export(digits.module, (torch.zeros(4, 64),))
    (tmp_path / "source").mkdir()
    torch.export.save(program, str(tmp_path / "source" / "model.pt2"))
    result = run(
        str(tmp_path / "source" / "model.pt2"), "--output", str(tmp_path / "out"),
        "--sample", str(sample), "--allow-pickle",
    )  # fmt: skip
    assert result.returncode == 1
    assert "fixed shape [4, 64]" in result.stderr
    assert not (tmp_path / "out").exists()


def test_pytorch_file_needs_allow_pickle(sample: Path, tmp_path: Path) -> None:
    # Never loaded: the check comes first, so the file's content does not matter.
    (tmp_path / "model.pt").write_bytes(b"not a TorchScript archive")
    result = run(
        str(tmp_path / "model.pt"), "--output", str(tmp_path / "out"), "--sample", str(sample)
    )
    assert result.returncode == 1
    assert "--allow-pickle" in result.stderr
    assert not (tmp_path / "out").exists()


def test_unreadable_file_is_reported(sample: Path, tmp_path: Path) -> None:
    (tmp_path / "model.pt").write_bytes(b"not a TorchScript archive")
    result = run(
        str(tmp_path / "model.pt"), "--output", str(tmp_path / "out"),
        "--sample", str(sample), "--allow-pickle",
    )  # fmt: skip
    assert result.returncode == 1
    assert "PyTorch cannot read the file" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_torchscript_keeps_signature_file_names(
    digits: DigitsModel, sample: Path, tmp_path: Path
) -> None:
    """A signature.json beside the .pt names the ONNX tensors as the server names the .pt."""
    save_torchscript(digits, tmp_path / "source")
    (tmp_path / "source" / "signature.json").write_text(json.dumps({
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, 10]}],
    }))  # fmt: skip
    result = run(
        str(tmp_path / "source" / "model.pt"), "--output", str(tmp_path / "digits"),
        "--sample", str(sample), "--allow-pickle",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    session = ort.InferenceSession(
        str(tmp_path / "digits" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    assert [node.name for node in session.get_inputs()] == ["image"]
    assert [node.name for node in session.get_outputs()] == ["scores"]

"""PyTorch models (TorchScript and torch.export): served outputs equal PyTorch's in process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_digits

from servekit.core.types import DataType, TensorSpec
from servekit.runtimes.base import PickleNotAllowedError, RuntimeOptions, runtime_for
from tests.conftest import ServerProcess, assert_json_error

pytestmark = [
    pytest.mark.extras,
    # PyTorch 2.13 deprecates TorchScript, which these tests build and load on purpose.
    pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning"),
]

SIGNATURE = {
    "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}],
    "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, 10]}],
}
# Held-out digits: the model trains on the first 1500.
TEST_ROWS = slice(1500, 1530)


@dataclass
class DigitsModel:
    """A small MLP trained on scikit-learn's digits, with its held-out rows and labels."""

    module: Any
    rows: np.ndarray[Any, Any]
    labels: np.ndarray[Any, Any]

    def scores(self, rows: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        import torch

        with torch.inference_mode():
            return self.module(torch.from_numpy(rows)).numpy()  # type: ignore[no-any-return]


def train_digits_mlp() -> DigitsModel:
    """Train a 64-32-10 MLP on 1500 digits (pixels scaled to 0..1) for 300 full-batch steps."""
    import torch
    from torch import nn

    class DigitsMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.layers(pixels)  # type: ignore[no-any-return]

    torch.manual_seed(0)
    data = load_digits()
    features = torch.tensor(data.data[:1500] / 16.0, dtype=torch.float32)
    labels = torch.tensor(data.target[:1500])
    module = DigitsMLP()
    optimizer = torch.optim.Adam(module.parameters(), lr=0.01)
    # One thread: with two threads on 2 cores shared with a busy process, the steps took 20 s
    # instead of 0.5 s.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(300):
            optimizer.zero_grad()
            nn.functional.cross_entropy(module(features), labels).backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    module.eval()
    rows = (data.data[TEST_ROWS] / 16.0).astype(np.float32)
    return DigitsModel(module, rows, data.target[TEST_ROWS])


def save_torchscript(model: DigitsModel, version: Path) -> None:
    import torch

    version.mkdir(parents=True)
    torch.jit.script(model.module).save(str(version / "model.pt"))


def save_exported(module: Any, version: Path) -> None:
    """Export `module` for 64-pixel rows with a dynamic batch dimension and save it."""
    import torch

    version.mkdir(parents=True)
    batch = torch.export.Dim("batch")
    program = torch.export.export(module, (torch.zeros(4, 64),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(version / "model.pt2"))


@pytest.fixture(scope="module")
def digits() -> DigitsModel:
    return train_digits_mlp()


@pytest.fixture(scope="module")
def torch_server(
    digits: DigitsModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    repository = tmp_path_factory.mktemp("torch_models")
    save_torchscript(digits, repository / "digits_ts" / "1")
    (repository / "digits_ts" / "1" / "signature.json").write_text(json.dumps(SIGNATURE))
    save_exported(digits.module, repository / "digits_export" / "1")
    server = ServerProcess("--model_repository", str(repository), "--allow_pickle")
    _ = server.url
    yield server
    server.stop()


@pytest.mark.parametrize(
    ("model", "platform", "output"),
    [
        ("digits_ts", "pytorch_torchscript", "scores"),
        ("digits_export", "pytorch_export", "output_0"),
    ],
)
def test_served_outputs_match_pytorch(
    torch_server: ServerProcess, digits: DigitsModel, model: str, platform: str, output: str
) -> None:
    expected = digits.scores(digits.rows)
    url = torch_server.url
    metadata = httpx.get(f"{url}/v2/models/{model}").json()
    tfserving = httpx.post(
        f"{url}/v1/models/{model}:predict", json={"instances": digits.rows.tolist()}
    ).json()
    v2 = httpx.post(
        f"{url}/v2/models/{model}/infer",
        json={"inputs": [{"name": "pixels", "shape": [30, 64], "datatype": "FP32",
                          "data": digits.rows.ravel().tolist()}]},
    ).json()  # fmt: skip

    assert metadata["platform"] == platform
    assert metadata["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
    assert metadata["outputs"] == [{"name": output, "datatype": "FP32", "shape": [-1, 10]}]
    assert np.allclose(np.array(tfserving["predictions"], np.float32), expected, atol=1e-5)
    assert v2["outputs"][0]["name"] == output
    assert v2["outputs"][0]["shape"] == [30, 10]
    assert np.allclose(np.array(v2["outputs"][0]["data"], np.float32), expected.ravel(), atol=1e-5)
    accuracy = np.mean(expected.argmax(axis=1) == digits.labels)
    assert accuracy > 0.8


@pytest.mark.parametrize("model", ["digits_ts", "digits_export"])
def test_bad_input_rejected_then_served(
    torch_server: ServerProcess, digits: DigitsModel, model: str
) -> None:
    url = torch_server.url
    wrong_shape = httpx.post(
        f"{url}/v1/models/{model}:predict", json={"instances": [[0.5] * 63, [0.5] * 63]}
    )
    message = assert_json_error(wrong_shape, 400)
    assert "[-1, 64]" in message
    wrong_datatype = httpx.post(
        f"{url}/v2/models/{model}/infer",
        json={"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "INT32",
                          "data": [1] * 64}]},
    )  # fmt: skip
    message = assert_json_error(wrong_datatype, 400)
    assert "INT32" in message
    assert "FP32" in message
    unknown_input = httpx.post(
        f"{url}/v2/models/{model}/infer",
        json={"inputs": [{"name": "images", "shape": [1, 64], "datatype": "FP32",
                          "data": [0.0] * 64}]},
    )  # fmt: skip
    assert_json_error(unknown_input, 400)

    after = httpx.post(
        f"{url}/v1/models/{model}:predict", json={"instances": digits.rows[:2].tolist()}
    )
    assert after.status_code == 200
    expected = digits.scores(digits.rows[:2])
    assert np.allclose(np.array(after.json()["predictions"], np.float32), expected, atol=1e-5)


def test_pytorch_files_need_allow_pickle(digits: DigitsModel, tmp_path: Path) -> None:
    save_torchscript(digits, tmp_path / "ts")
    (tmp_path / "ts" / "signature.json").write_text(json.dumps(SIGNATURE))
    save_exported(digits.module, tmp_path / "export")
    for version in (tmp_path / "ts", tmp_path / "export"):
        runtime = runtime_for(version, RuntimeOptions())
        with pytest.raises(PickleNotAllowedError, match="--allow_pickle"):
            runtime.load(version)


def test_torchscript_without_signature_file(digits: DigitsModel, tmp_path: Path) -> None:
    save_torchscript(digits, tmp_path / "1")
    runtime = runtime_for(tmp_path / "1", RuntimeOptions(allow_pickle=True))
    with pytest.raises(ValueError, match=r"model.pt needs a signature.json beside it"):
        runtime.load(tmp_path / "1")


@pytest.mark.parametrize(
    ("document", "error"),
    [
        ("[1, 2]", "must contain an object"),
        ("{not json", "not valid JSON"),
        (json.dumps({"inputs": SIGNATURE["inputs"]}), "both inputs and outputs"),
        (json.dumps({**SIGNATURE, "extra": 1}), "unknown keys"),
        (json.dumps({**SIGNATURE, "inputs": []}), "non-empty list"),
        (
            json.dumps({**SIGNATURE, "inputs": [{"name": "pixels", "datatype": "BYTES",
                                                 "shape": [-1, 64]}]}),
            "unsupported tensor type BYTES",
        ),
        (
            json.dumps({**SIGNATURE, "inputs": [{"name": "pixels", "datatype": "FP32",
                                                 "shape": [-1, "64"]}]}),
            "shape must be a list of sizes",
        ),
        (
            json.dumps({**SIGNATURE, "outputs": SIGNATURE["outputs"] * 2}),
            "names ['scores'] more than once",
        ),
        (
            json.dumps({**SIGNATURE, "inputs": [*SIGNATURE["inputs"], {"name": "mask",
                                                "datatype": "BOOL", "shape": [-1, 64]}]}),
            "declares 2 inputs, but forward takes 1",
        ),
    ],
)  # fmt: skip
def test_invalid_signature_file(
    digits: DigitsModel, tmp_path: Path, document: str, error: str
) -> None:
    save_torchscript(digits, tmp_path / "1")
    (tmp_path / "1" / "signature.json").write_text(document)
    runtime = runtime_for(tmp_path / "1", RuntimeOptions(allow_pickle=True))
    with pytest.raises(ValueError, match=error.replace("[", r"\[")):
        runtime.load(tmp_path / "1")


def test_declared_datatype_differs_from_output(digits: DigitsModel, tmp_path: Path) -> None:
    save_torchscript(digits, tmp_path / "1")
    signature = {
        **SIGNATURE,
        "outputs": [{"name": "scores", "datatype": "FP64", "shape": [-1, 10]}],
    }
    (tmp_path / "1" / "signature.json").write_text(json.dumps(signature))
    runtime = runtime_for(tmp_path / "1", RuntimeOptions(allow_pickle=True))
    runtime.load(tmp_path / "1")
    with pytest.raises(ValueError, match="has datatype FP32, but the signature declares FP64"):
        runtime.predict({"pixels": digits.rows}, ["scores"])


def test_exported_dict_outputs_take_their_keys(digits: DigitsModel, tmp_path: Path) -> None:
    import torch
    from torch import nn

    class ScoresAndLabel(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
            scores = self.inner(pixels)
            return {"scores": scores, "label": scores.argmax(dim=1)}

    save_exported(ScoresAndLabel(digits.module).eval(), tmp_path / "1")
    runtime = runtime_for(tmp_path / "1", RuntimeOptions(allow_pickle=True))
    signature = runtime.load(tmp_path / "1")
    assert signature.outputs == (
        TensorSpec("scores", DataType.FP32, (-1, 10)),
        TensorSpec("label", DataType.INT64, (-1,)),
    )
    results = runtime.predict({"pixels": digits.rows}, ["label", "scores"])
    expected = digits.scores(digits.rows)
    assert np.array_equal(results["label"], expected.argmax(axis=1))
    assert np.allclose(results["scores"], expected, atol=1e-5)


def test_signature_file_renames_exported_outputs(digits: DigitsModel, tmp_path: Path) -> None:
    save_exported(digits.module, tmp_path / "1")
    outputs = {"outputs": SIGNATURE["outputs"]}
    (tmp_path / "1" / "signature.json").write_text(json.dumps(outputs))
    runtime = runtime_for(tmp_path / "1", RuntimeOptions(allow_pickle=True))
    signature = runtime.load(tmp_path / "1")
    assert signature.input_names == ("pixels",)
    assert signature.output_names == ("scores",)
    # A read-only input, as decoded from a request body, is copied rather than rejected.
    rows = digits.rows.copy()
    rows.flags.writeable = False
    results = runtime.predict({"pixels": rows}, ["scores"])
    assert np.allclose(results["scores"], digits.scores(digits.rows), atol=1e-5)


def test_intra_op_threads_set_torch_threads(digits: DigitsModel, tmp_path: Path) -> None:
    import torch

    save_exported(digits.module, tmp_path / "1")
    before = torch.get_num_threads()
    try:
        runtime = runtime_for(tmp_path / "1", RuntimeOptions(intra_op_threads=1, allow_pickle=True))
        runtime.load(tmp_path / "1")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_unsupported_torch_dtype_is_named(digits: DigitsModel, tmp_path: Path) -> None:
    import torch
    from torch import nn

    class HalfPrecisionScores(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.inner(pixels).to(torch.bfloat16)  # type: ignore[no-any-return]

    save_exported(HalfPrecisionScores(digits.module).eval(), tmp_path / "1")
    runtime = runtime_for(tmp_path / "1", RuntimeOptions(allow_pickle=True))
    with pytest.raises(ValueError, match="unsupported tensor type bfloat16: PyTorch models may"):
        runtime.load(tmp_path / "1")

"""TFLite models through ai-edge-litert: served outputs equal the interpreter's in process."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import numpy as np
from ai_edge_litert.interpreter import Interpreter
from sklearn.datasets import load_digits

from tests.conftest import ServerProcess

MODEL = Path(__file__).parents[1] / "data" / "digits_mlp.tflite"


def test_tflite_model_over_both_protocols(tmp_path: Path) -> None:
    version = tmp_path / "digits_tflite" / "1"
    version.mkdir(parents=True)
    shutil.copy(MODEL, version / "model.tflite")
    rows = (load_digits().data[1500:1530] / 16.0).astype(np.float32)
    runner = Interpreter(model_path=str(MODEL)).get_signature_runner("serving_default")
    expected = runner(pixels=rows)["output_0"]

    server = ServerProcess("--model_repository", str(tmp_path))
    try:
        metadata = httpx.get(f"{server.url}/v2/models/digits_tflite").json()
        tfserving = httpx.post(
            f"{server.url}/v1/models/digits_tflite:predict", json={"instances": rows.tolist()}
        ).json()
        v2 = httpx.post(
            f"{server.url}/v2/models/digits_tflite/infer",
            json={"inputs": [{"name": "pixels", "shape": [30, 64], "datatype": "FP32",
                              "data": rows.ravel().tolist()}]},
        ).json()  # fmt: skip
    finally:
        server.stop()
    assert metadata["platform"] == "tflite"
    assert metadata["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
    assert metadata["outputs"] == [{"name": "output_0", "datatype": "FP32", "shape": [-1, 10]}]
    assert np.array_equal(np.array(tfserving["predictions"], np.float32), expected)
    assert np.array_equal(np.array(v2["outputs"][0]["data"], np.float32), expected.ravel())
    accuracy = np.mean(expected.argmax(axis=1) == load_digits().target[1500:1530])
    assert accuracy > 0.8

"""Python models: preprocess and postprocess steps around predict, served end to end."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.conftest import ServerProcess, assert_json_error
from tests.toy_models import write_python_model

# A toy "tokenizer" in preprocess, a model on ids, and a label lookup in postprocess.
PIPELINE_SOURCE = """
import numpy as np

WORDS = {b"good": 1, b"bad": -1}


class Model:
    inputs = [("text", "BYTES", [-1])]
    outputs = [("label", "BYTES", [-1]), ("score", "FP32", [-1])]

    def preprocess(self, inputs):
        ids = [sum(WORDS.get(word, 0) for word in text.split()) for text in inputs["text"]]
        return {"ids": np.array(ids, dtype=np.int64)}

    def predict(self, inputs):
        return {"score": inputs["ids"].astype(np.float64)}

    def postprocess(self, outputs):
        labels = np.array([b"positive" if s > 0 else b"negative" for s in outputs["score"]], object)
        return {**outputs, "label": labels}
"""

BROKEN_SOURCE = """
import numpy as np


class Model:
    inputs = [("x", "FP32", [-1])]
    outputs = [("y", "FP32", [-1])]

    def predict(self, inputs):
        return {"z": inputs["x"]}
"""


def test_preprocess_and_postprocess(tmp_path: Path) -> None:
    write_python_model(tmp_path, "sentiment", PIPELINE_SOURCE)
    write_python_model(tmp_path, "broken", BROKEN_SOURCE)
    server = ServerProcess("--model_repository", str(tmp_path))
    try:
        response = httpx.post(
            f"{server.url}/v1/models/sentiment:predict",
            json={"instances": ["good good bad", "bad"]},
        )
        broken = httpx.post(f"{server.url}/v1/models/broken:predict", json={"instances": [1.0]})
    finally:
        server.stop()
    assert response.json() == {
        "predictions": [
            {"label": "positive", "score": 1.0},
            {"label": "negative", "score": -1.0},
        ]
    }
    # The warm-up call at load time finds the missing output, so the version never serves.
    message = assert_json_error(broken, 503)
    assert "model.py returned no output 'y'" in message


def test_pickle_served_only_when_allowed(tmp_path: Path) -> None:
    import joblib
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    data = load_digits()
    model = LogisticRegression(max_iter=300).fit(data.data[:1000], data.target[:1000])
    version = tmp_path / "digits_lr" / "1"
    version.mkdir(parents=True)
    joblib.dump(model, version / "model.joblib")
    rows = data.data[1000:1020]

    refused = ServerProcess("--model_repository", str(tmp_path))
    try:
        response = httpx.post(
            f"{refused.url}/v1/models/digits_lr:predict", json={"instances": rows.tolist()}
        )
        status = httpx.get(f"{refused.url}/v1/models/digits_lr").json()
    finally:
        refused.stop()
    message = assert_json_error(response, 503)
    assert "--allow_pickle" in message
    assert status["model_version_status"][0]["status"]["error_code"] == "FAILED_PRECONDITION"

    allowed = ServerProcess("--model_repository", str(tmp_path), "--allow_pickle")
    try:
        response = httpx.post(
            f"{allowed.url}/v1/models/digits_lr:predict", json={"instances": rows.tolist()}
        )
    finally:
        allowed.stop()
    predictions = response.json()["predictions"]
    assert [row["label"] for row in predictions] == model.predict(rows).tolist()
    assert np.allclose(
        [row["probabilities"] for row in predictions], model.predict_proba(rows), atol=1e-6
    )
    assert "loading pickled model" in allowed.log


OUTPUT_SHAPES_SOURCE = """
import numpy as np


class Model:
    inputs = [("x", "FP32", [-1]), ("mode", "INT32", [-1])]
    outputs = [("y", "FP32", [-1])]

    def predict(self, inputs):
        mode = int(inputs["mode"][0])
        rows = len(inputs["x"])
        if mode == 1:
            return {"y": np.zeros((rows, 3))}      # a rank the signature does not declare
        if mode == 2:
            return {"y": np.zeros(rows + 2)}       # rows that belong to no caller
        if mode == 3:
            return [inputs["x"]]                   # not a dict
        return {"y": inputs["x"] * 2}
"""


def test_python_outputs_checked_against_signature(tmp_path: Path) -> None:
    write_python_model(tmp_path, "shapes", OUTPUT_SHAPES_SOURCE, "batching: {enabled: false}\n")
    server = ServerProcess("--model_repository", str(tmp_path))
    url = f"{server.url}/v1/models/shapes:predict"
    try:
        responses = {
            mode: httpx.post(url, json={"inputs": {"x": [1.0], "mode": [mode]}})
            for mode in (0, 1, 2, 3)
        }
    finally:
        server.stop()
    assert responses[0].json() == {"outputs": [2.0]}
    for mode in (1, 2, 3):
        assert_json_error(responses[mode], 500)
    log = "".join(server.lines)
    assert "returned output 'y' with shape [1, 3], but it declares [-1]" in log
    assert "returned 3 rows of output 'y' for 1 input rows" in log
    assert "returned a list, not a dict of output arrays" in log

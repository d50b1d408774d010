"""An MLServer runtime that serves the benchmark MLP through onnxruntime.

MLServer has no ONNX runtime of its own; this is the custom-runtime class its documentation
describes. Adaptive batching is MLServer's (`max_batch_size`, `max_batch_time` in
model-settings.json).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxModel(MLModel):
    async def load(self) -> bool:
        path = self.settings.parameters.uri
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.output = self.session.get_outputs()[0].name
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32)
        (y,) = self.session.run([self.output], {"x": x})
        return InferenceResponse(
            model_name=self.name, outputs=[NumpyCodec.encode_output(self.output, y)]
        )

"""TFLite / LiteRT models (`model.tflite`), run by ai-edge-litert without tensorflow.

Inputs and outputs take the names of the model's first signature (`serving_default` for
models exported from Keras or a SavedModel), or the tensor names when it has none. A LiteRT
interpreter runs one call at a time, so calls to one version take turns under a lock; more
`instances` add queueing, not parallelism. The extra `tflite` installs ai-edge-litert.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from servekit.core.types import DataType, Signature, TensorSpec
from servekit.runtimes.base import RuntimeOptions


class TFLiteRuntime:
    """Runs a `.tflite` file through a LiteRT interpreter and its signature runner."""

    platform = "tflite"
    model_file = "model.tflite"
    inline_safe = True
    holds_gil = False

    def __init__(self, options: RuntimeOptions) -> None:
        self._options = options
        self._runner: Any = None
        self._lock = threading.Lock()

    def load(self, directory: Path) -> Signature:
        from ai_edge_litert.interpreter import Interpreter

        threads = self._options.intra_op_threads or None
        interpreter = Interpreter(model_path=str(directory / self.model_file), num_threads=threads)
        signatures = interpreter.get_signature_list()
        if not signatures:
            raise ValueError(f"{self.model_file} has no signature; export it with one")
        runner = interpreter.get_signature_runner(next(iter(signatures)))
        self._runner = runner
        return Signature(
            inputs=_specs(runner.get_input_details()),
            outputs=_specs(runner.get_output_details()),
        )

    def predict(
        self, inputs: dict[str, np.ndarray[Any, Any]], outputs: Sequence[str]
    ) -> dict[str, np.ndarray[Any, Any]]:
        with self._lock:
            results = self._runner(**inputs)
        return {name: np.array(results[name]) for name in outputs}

    def unload(self) -> None:
        self._runner = None


def _specs(details: dict[str, dict[str, Any]]) -> tuple[TensorSpec, ...]:
    specs = []
    for name, detail in details.items():
        shape = detail.get("shape_signature")
        if shape is None or len(shape) == 0:
            shape = detail["shape"]
        datatype = DataType.from_numpy(np.dtype(detail["dtype"]))
        specs.append(TensorSpec(name, datatype, tuple(int(size) for size in shape)))
    return tuple(specs)

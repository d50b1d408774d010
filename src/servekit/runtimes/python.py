"""Plain Python models: a `model.py` that defines a `Model` class.

The class declares its signature and computes outputs with numpy::

    class Model:
        inputs = [("text", "BYTES", [-1])]
        outputs = [("length", "INT64", [-1])]

        def load(self, directory):          # optional; may take a second argument,
            ...                             # the RuntimeOptions (threads) of the server

        def predict(self, inputs):
            return {"length": np.array([len(t) for t in inputs["text"]], dtype=np.int64)}

`predict` receives and returns a dict of numpy arrays. BYTES tensors are object arrays of
`bytes`. It runs in a worker thread, so it may block.

Two optional steps wrap it, so a tokenizer or a label lookup can live beside the model:
`preprocess(inputs)` turns the request's arrays into what `predict` takes (for example text
into token ids), and `postprocess(outputs)` turns `predict`'s result into the declared
outputs. Each takes and returns a dict of arrays, for the whole batch at once.
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from servekit.core.types import DataType, Signature, TensorSpec
from servekit.runtimes.base import RuntimeOptions

_module_ids = itertools.count()


class PythonRuntime:
    """Runs the `Model` class of a version's `model.py`."""

    platform = "python"
    model_file = "model.py"
    inline_safe = False
    holds_gil = True

    def __init__(self, options: RuntimeOptions) -> None:
        self._options = options
        self._model: Any = None
        self._output_dtypes: dict[str, np.dtype[Any]] = {}
        self._outputs: dict[str, TensorSpec] = {}
        self._batch_inputs: list[str] = []

    def load(self, directory: Path) -> Signature:
        # A unique module name per load keeps two versions of one model apart.
        module_name = f"servekit_model_{next(_module_ids)}"
        spec = importlib.util.spec_from_file_location(module_name, directory / self.model_file)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {self.model_file}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model = module.Model()
        if hasattr(model, "load"):
            if len(inspect.signature(model.load).parameters) >= 2:
                model.load(directory, self._options)
            else:
                model.load(directory)
        signature = Signature(
            inputs=tuple(_tensor_spec(item) for item in model.inputs),
            outputs=tuple(_tensor_spec(item) for item in model.outputs),
        )
        self._model = model
        self._output_dtypes = {spec.name: spec.datatype.numpy_dtype for spec in signature.outputs}
        self._outputs = {spec.name: spec for spec in signature.outputs}
        self._batch_inputs = [spec.name for spec in signature.inputs if spec.shape[:1] == (-1,)]
        return signature

    def predict(
        self, inputs: dict[str, np.ndarray[Any, Any]], outputs: Sequence[str]
    ) -> dict[str, np.ndarray[Any, Any]]:
        model = self._model
        rows = len(inputs[self._batch_inputs[0]]) if self._batch_inputs else None
        if hasattr(model, "preprocess"):
            inputs = model.preprocess(inputs)
        results = model.predict(inputs)
        if hasattr(model, "postprocess"):
            results = model.postprocess(results)
        if not isinstance(results, dict):
            raise ValueError(
                f"model.py returned a {type(results).__name__}, not a dict of output arrays"
            )
        missing = [name for name in outputs if name not in results]
        if missing:
            raise ValueError(
                f"model.py returned no output {missing[0]!r}; it returned {sorted(results)}"
            )
        # Cast to the declared datatype so a model returning float64 for FP32 stays in contract.
        arrays = {
            name: np.asarray(results[name], dtype=self._output_dtypes[name]) for name in outputs
        }
        self._check_shapes(arrays, rows)
        return arrays

    def _check_shapes(self, arrays: dict[str, np.ndarray[Any, Any]], rows: int | None) -> None:
        """Raise ValueError for an output whose shape breaks its declaration or the row count.

        An output whose first dimension is -1 must have one row per input row, or batched
        requests would receive rows that belong to other callers.
        """
        for name, array in arrays.items():
            spec = self._outputs[name]
            if not spec.shape_matches(array.shape):
                raise ValueError(
                    f"model.py returned output {name!r} with shape {list(array.shape)}, but it "
                    f"declares {list(spec.shape)} (-1 means any size)"
                )
            if rows is not None and spec.shape and spec.shape[0] == -1 and len(array) != rows:
                raise ValueError(
                    f"model.py returned {len(array)} rows of output {name!r} for {rows} input "
                    "rows; outputs with a variable first dimension need one row per input row"
                )

    def unload(self) -> None:
        self._model = None


def _tensor_spec(item: tuple[str, str, Sequence[int]]) -> TensorSpec:
    name, datatype, shape = item
    return TensorSpec(name, DataType.from_v2(datatype), tuple(int(dim) for dim in shape))

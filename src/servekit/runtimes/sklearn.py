"""scikit-learn models stored as `model.joblib` or `model.pkl`, served only when allowed.

Unpickling runs code from the file, so these files load only with `--allow_pickle`, and each
load logs a warning naming the file. `servekit convert sklearn` turns such a model into ONNX,
which needs neither. The signature follows skl2onnx's names, so a model keeps its API when it is
converted: input `X` (FP32 rows of `n_features_in_` features); classifiers return `label` and
`probabilities` (FP32), regressors `variable` (FP32).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from servekit.core.types import DataType, Signature, TensorSpec
from servekit.runtimes.base import PICKLE_FILES, RuntimeOptions

logger = logging.getLogger(__name__)


class SklearnRuntime:
    """Runs a pickled scikit-learn estimator's predict (and predict_proba)."""

    platform = "sklearn"
    inline_safe = False
    holds_gil = True

    def __init__(self, options: RuntimeOptions) -> None:
        self._options = options
        self._model: Any = None

    def load(self, directory: Path) -> Signature:
        import joblib

        path = next(directory / name for name in PICKLE_FILES if (directory / name).is_file())
        logger.warning("loading pickled model %s: this runs code from the file", path)
        model = joblib.load(path)
        features = int(model.n_features_in_)
        inputs = (TensorSpec("X", DataType.FP32, (-1, features)),)
        outputs: tuple[TensorSpec, ...]
        if hasattr(model, "predict_proba"):
            classes = np.asarray(model.classes_)
            label_type = DataType.BYTES if classes.dtype.kind in "OSU" else DataType.INT64
            outputs = (
                TensorSpec("label", label_type, (-1,)),
                TensorSpec("probabilities", DataType.FP32, (-1, len(classes))),
            )
        else:
            outputs = (TensorSpec("variable", DataType.FP32, (-1,)),)
        self._model = model
        return Signature(inputs, outputs)

    def predict(
        self, inputs: dict[str, np.ndarray[Any, Any]], outputs: Sequence[str]
    ) -> dict[str, np.ndarray[Any, Any]]:
        rows = inputs["X"]
        results: dict[str, np.ndarray[Any, Any]] = {}
        if "label" in outputs:
            labels = np.asarray(self._model.predict(rows))
            if labels.dtype.kind in "OSU":
                encoded = np.empty(len(labels), dtype=object)
                encoded[:] = [str(label).encode() for label in labels]
                results["label"] = encoded
            else:
                results["label"] = labels.astype(np.int64)
        if "probabilities" in outputs:
            results["probabilities"] = self._model.predict_proba(rows).astype(np.float32)
        if "variable" in outputs:
            results["variable"] = np.asarray(self._model.predict(rows), np.float32).reshape(-1)
        return results

    def unload(self) -> None:
        self._model = None

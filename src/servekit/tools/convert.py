"""`servekit convert sklearn`: a scikit-learn model as an ONNX version, checked against itself.

XGBoost and LightGBM estimators (their scikit-learn classes, such as `XGBClassifier`) convert
the same way, with onnxmltools' converters (the `gbm` extra).

A pickled or joblib model file runs code when it is loaded, so conversion needs
`--allow-pickle` and logs a warning naming the file. skl2onnx converts the model, with
classifiers built without ZipMap so that they output a label tensor and a probability tensor.
Both models then run on the `--sample` rows. The converted one must predict the same classes
and give outputs within `--tolerance` of the original, or nothing is written. The new version
directory appears all at once (see tools/versions.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from servekit.tools.bench.requests import load_arrays
from servekit.tools.versions import next_version, staged_version

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
REPORT_FILE = "convert.json"
_BOOSTING_OPSET = 17


class ConversionMismatchError(Exception):
    """The converted model does not reproduce the original; nothing was written."""


def convert_sklearn(
    source: Path,
    model_dir: Path,
    sample: Path,
    version: int | None = None,
    allow_pickle: bool = False,
    tolerance: float = 1e-4,
) -> dict[str, Any]:
    """Convert, compare on the sample rows, and write the new version; return the report."""
    if not allow_pickle:
        raise ValueError(
            f"loading {source} runs the code it contains; pass --allow-pickle if you trust it"
        )
    import joblib
    from skl2onnx import to_onnx

    logger.warning("loading pickled model %s: this runs code from the file", source)
    model = joblib.load(source)
    rows = sample_rows(sample)
    features = getattr(model, "n_features_in_", None)
    if features is not None and rows.shape[1] != features:
        raise ValueError(
            f"{sample} has rows of {rows.shape[1]} values, but the model takes {features} features"
        )
    classifier = hasattr(model, "predict_proba")
    target_opset = _register_boosting_converters(model)
    options = {id(model): {"zipmap": False}} if classifier else None
    onnx_model = to_onnx(model, rows[:1], options=options, target_opset=target_opset)
    model_dir.mkdir(parents=True, exist_ok=True)
    version = version if version is not None else next_version(model_dir)
    with staged_version(model_dir, version) as work:
        path = work / MODEL_FILE
        path.write_bytes(onnx_model.SerializeToString())
        report = _compare(model, path, rows, classifier, tolerance)
        report.update({"source": str(source), "version": version, "rows_compared": len(rows)})
        (work / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    report["written"] = str(model_dir / str(version))
    return report


def _register_boosting_converters(model: Any) -> dict[str, int] | None:
    """Register onnxmltools' converter for an XGBoost or LightGBM `model`; return its opsets.

    skl2onnx converts scikit-learn's own estimators (HistGradientBoosting among them) by itself,
    at its latest opsets (None). The `gbm` extra installs xgboost, lightgbm and onnxmltools.
    """
    package = type(model).__module__.partition(".")[0]
    if package not in ("xgboost", "lightgbm"):
        return None
    from skl2onnx import update_registered_converter
    from skl2onnx.common.shape_calculator import (
        calculate_linear_classifier_output_shapes,
        calculate_linear_regressor_output_shapes,
    )

    if package == "xgboost":
        from onnxmltools.convert.xgboost.operator_converters.XGBoost import (
            convert_xgboost as converter,
        )
    else:
        from onnxmltools.convert.lightgbm.operator_converters.LightGbm import (
            convert_lightgbm as converter,
        )
    classifier = hasattr(model, "predict_proba")
    shapes = (
        calculate_linear_classifier_output_shapes
        if classifier
        else calculate_linear_regressor_output_shapes
    )
    options = {"nocl": [True, False], "zipmap": [True, False, "columns"]} if classifier else None
    alias = f"{package}{type(model).__name__}"
    update_registered_converter(type(model), alias, shapes, converter, options=options)
    # onnxmltools' tree converters write version 3 of the ai.onnx.ml operators.
    return {"": _BOOSTING_OPSET, "ai.onnx.ml": 3}


def sample_rows(sample: Path) -> np.ndarray[Any, Any]:
    """Load the rows to compare from a .npy or .npz file (its first array) as FP32."""
    arrays = load_arrays(sample)
    if not arrays:
        raise ValueError(f"{sample} contains no array")
    rows = np.asarray(arrays[0], dtype=np.float32)
    if rows.ndim != 2 or len(rows) == 0:
        raise ValueError(f"{sample} must hold a 2-D array of rows (rows x features)")
    return rows


def _compare(
    model: Any, path: Path, rows: np.ndarray[Any, Any], classifier: bool, tolerance: float
) -> dict[str, Any]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: rows})
    if classifier:
        expected_labels = model.predict(rows)
        expected_scores = model.predict_proba(rows)
        agreement = float(np.mean(outputs[0].ravel() == expected_labels))
        difference = float(np.max(np.abs(outputs[1] - expected_scores)))
        report = {"kind": "classifier", "label_agreement": agreement, "max_difference": difference}
        if agreement < 1.0 or difference > tolerance:
            raise ConversionMismatchError(
                f"the converted model agrees on {agreement:.2%} of the labels and differs by up "
                f"to {difference:.3g} in probabilities (tolerance {tolerance}); nothing written"
            )
        return report
    expected = np.asarray(model.predict(rows), dtype=np.float64).reshape(len(rows), -1)
    difference = float(np.max(np.abs(outputs[0].reshape(len(rows), -1) - expected)))
    if difference > tolerance:
        raise ConversionMismatchError(
            f"the converted model differs by up to {difference:.3g} (tolerance {tolerance}); "
            "nothing written"
        )
    return {"kind": "regressor", "max_difference": difference}

"""`servekit convert sklearn`: a scikit-learn model as an ONNX version, checked against itself.

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

from servekit.tools.versions import next_version, staged_version

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
REPORT_FILE = "convert.json"


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
    rows = _sample_rows(sample)
    classifier = hasattr(model, "predict_proba")
    options = {id(model): {"zipmap": False}} if classifier else None
    onnx_model = to_onnx(model, rows[:1], options=options, target_opset=None)
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


def _sample_rows(sample: Path) -> np.ndarray[Any, Any]:
    if sample.suffix == ".npz":
        with np.load(sample, allow_pickle=False) as archive:
            rows = archive[archive.files[0]]
    else:
        rows = np.load(sample, allow_pickle=False)
    rows = np.asarray(rows, dtype=np.float32)
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

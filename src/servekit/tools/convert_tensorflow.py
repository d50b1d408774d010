"""`servekit convert keras` and `convert saved-model`: TensorFlow models as ONNX or TFLite.

A Keras file is first exported as a SavedModel whose `serving_default` signature is the function
the tensorflow runtime serves for it, so the converted model computes the same outputs under the
same input and output names, whichever format it is converted to. A SavedModel directory is
converted through the signature the runtime would serve. ONNX comes from tf2onnx, TFLite from
TensorFlow's TFLiteConverter, with float32 weights in both (`servekit quantize` writes int8
TFLite models).

The original and the converted model then run on the `--sample` rows: the original through
TensorFlow, the converted one through the runtime that serves it (onnxruntime, or ai-edge-litert
for TFLite). Every output must be within `--tolerance` of the original, or nothing is written.
The new version directory contains the converted model and a `convert.json` report, and appears
all at once (see tools/versions.py).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from servekit.core.types import Signature
from servekit.runtimes.base import RuntimeOptions, runtime_for
from servekit.runtimes.tensorflow import (
    SAVED_MODEL_FILE,
    SERVING_SIGNATURE,
    call_function,
    function_signature,
    keras_function,
    load_keras,
    load_saved_model,
)
from servekit.tools.bench.requests import file_inputs
from servekit.tools.convert import REPORT_FILE, ConversionMismatchError
from servekit.tools.versions import next_version, staged_version

FORMATS = ("onnx", "tflite")
MODEL_FILES = {"onnx": "model.onnx", "tflite": "model.tflite"}


@dataclass(frozen=True)
class ServingModel:
    """A TensorFlow model as a SavedModel on disk, with the functions that run it."""

    saved_model: Path
    signature_key: str
    # The SavedModel's serving signature, a concrete function that takes inputs by keyword.
    signature: Any
    # The function that computes the reference outputs: the Keras model's, or `signature`.
    original: Any


@contextlib.contextmanager
def serving_model(source: Path) -> Iterator[ServingModel]:
    """Open a `.keras` file or a SavedModel directory as a SavedModel with its serving signature.

    A Keras file is exported into a temporary directory that is removed afterwards.
    """
    if source.is_dir():
        if not (source / SAVED_MODEL_FILE).is_file():
            raise ValueError(f"{source} has no {SAVED_MODEL_FILE}; pass a SavedModel directory")
        loaded, key = load_saved_model(source)
        signature = loaded.signatures[key]
        yield ServingModel(source, key, signature, signature)
        return
    if source.suffix != ".keras":
        raise ValueError(f"{source} is not a .keras file")
    import keras

    model = load_keras(source)
    function = keras_function(model)
    with tempfile.TemporaryDirectory(prefix="servekit-keras-") as folder:
        exported = Path(folder) / "saved_model"
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(SERVING_SIGNATURE, function)
        archive.write_out(str(exported), verbose=False)
        loaded, key = load_saved_model(exported)
        yield ServingModel(exported, key, loaded.signatures[key], function.get_concrete_function())


def convert_tensorflow(
    source: Path,
    model_dir: Path,
    sample: Path,
    version: int | None = None,
    tolerance: float = 1e-4,
    target_format: str = "onnx",
) -> dict[str, Any]:
    """Convert a `.keras` file or SavedModel, compare on the sample rows, write the version.

    Returns the report, with the new version's directory under `written`.
    """
    if target_format not in FORMATS:
        raise ValueError(f"unknown format {target_format!r}; use one of {', '.join(FORMATS)}")
    with serving_model(source) as model:
        signature = function_signature(model.original)
        feed = file_inputs(sample, list(signature.inputs))
        expected = call_function(model.original, signature.input_names, feed)
        model_dir.mkdir(parents=True, exist_ok=True)
        version = version if version is not None else next_version(model_dir)
        with staged_version(model_dir, version) as work:
            path = work / MODEL_FILES[target_format]
            if target_format == "onnx":
                write_onnx(model.signature, path)
            else:
                path.write_bytes(tflite_converter(model).convert())
            differences = _compare(work, signature, feed, expected, tolerance)
            report: dict[str, Any] = {
                "source": str(source),
                "format": target_format,
                "version": version,
                "rows_compared": len(next(iter(feed.values()))),
                "max_difference": max(differences.values()),
                "max_difference_per_output": differences,
            }
            (work / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    report["written"] = str(model_dir / str(version))
    return report


def write_onnx(signature: Any, path: Path) -> None:
    """Convert a SavedModel signature to ONNX with tf2onnx, keeping its tensor names."""
    import tensorflow as tf
    import tf2onnx

    _, keywords = signature.structured_input_signature
    names = list(keywords)
    specs = [tf.TensorSpec(spec.shape, spec.dtype, name=name) for name, spec in keywords.items()]

    # tf2onnx traces a tf.function with positional inputs; signatures take them by keyword.
    def positional(*tensors: Any) -> Any:
        return signature(**dict(zip(names, tensors, strict=True)))

    function = tf.function(positional, input_signature=specs)
    tf2onnx.convert.from_function(function, input_signature=specs, output_path=str(path))


def tflite_converter(model: ServingModel) -> Any:
    """Return a TFLiteConverter for the model's serving signature."""
    import tensorflow as tf

    return tf.lite.TFLiteConverter.from_saved_model(
        str(model.saved_model), signature_keys=[model.signature_key]
    )


def _compare(
    work: Path,
    signature: Signature,
    feed: dict[str, np.ndarray[Any, Any]],
    expected: dict[str, np.ndarray[Any, Any]],
    tolerance: float,
) -> dict[str, float]:
    """Run the converted version on the feed; return each output's largest difference."""
    runtime = runtime_for(work, RuntimeOptions())
    converted = runtime.load(work)
    try:
        if set(converted.input_names) != set(signature.input_names) or not set(
            signature.output_names
        ).issubset(converted.output_names):
            raise ConversionMismatchError(
                f"the converted model has inputs {list(converted.input_names)} and outputs "
                f"{list(converted.output_names)}, but the original has inputs "
                f"{list(signature.input_names)} and outputs {list(signature.output_names)}; "
                "nothing written"
            )
        actual = runtime.predict(feed, signature.output_names)
    finally:
        runtime.unload()
    differences = {name: _difference(expected[name], actual[name]) for name in expected}
    for name, difference in differences.items():
        if difference > tolerance:
            raise ConversionMismatchError(
                f"the converted model's output {name!r} differs by up to {difference:.3g} "
                f"(tolerance {tolerance}); nothing written"
            )
    return differences


def _difference(expected: np.ndarray[Any, Any], actual: np.ndarray[Any, Any]) -> float:
    if expected.shape != actual.shape:
        return float("inf")
    if expected.dtype == object or actual.dtype == object:
        return 0.0 if np.array_equal(expected, actual) else float("inf")
    if expected.size == 0:
        return 0.0
    return float(np.max(np.abs(expected.astype(np.float64) - actual.astype(np.float64))))

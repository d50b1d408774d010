"""`servekit quantize` for TensorFlow versions: a quantized `model.tflite`, with a quality check.

A version that contains `saved_model.pb` or `model.keras` (and not the ONNX file to quantize) is
converted with TensorFlow's TFLiteConverter, through the same SavedModel signature that
`servekit convert` uses. The modes map to the converter's post-training quantization:

- `int8-dynamic`: dynamic range quantization. Weights are stored as int8, and activations are
  quantized per call where a kernel supports it.
- `int8-static`: full integer quantization. Weights and activations are int8, with activation
  ranges calibrated on the `--calibration` rows. Inputs and outputs stay float32, so clients
  send the same requests.
- `fp16`: weights stored as float16; inputs and outputs stay float32.

The converter chooses the weight scales itself, so `--per-channel` applies to ONNX models only.
The report and the checks are those of the ONNX path (see tools/quantize.py). The original
version runs on TensorFlow and the new one on ai-edge-litert, both in this process on one thread
each, so the speed figures include the change of runtime. `--max-accuracy-drop` or
`--min-cosine` fail the command and write nothing. The new version contains `model.tflite` and
the report only, because the source version's other files belong to the TensorFlow model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from servekit.runtimes.tensorflow import KERAS_FILE, SAVED_MODEL_FILE, configure_threads
from servekit.tools.bench.requests import file_inputs
from servekit.tools.convert_tensorflow import serving_model, tflite_converter
from servekit.tools.quantize import (
    MODEL_FILE,
    REPORT_FILE,
    QualityError,
    QuantizeSettings,
    check_settings,
    loaded_version,
    measure_quality,
    measure_speed,
    quality_problem,
    read_validation,
    row_batches,
)
from servekit.tools.versions import next_version, staged_version

TFLITE_FILE = "model.tflite"
METHODS = {
    "int8-dynamic": "dynamic-range",
    "int8-static": "full-integer",
    "fp16": "float16",
}


def tensorflow_source(settings: QuantizeSettings) -> Path | None:
    """Return the SavedModel directory or Keras file to quantize, or None for an ONNX version.

    The ONNX file named by `settings.model_file` takes precedence when the version has one.
    """
    version_dir = settings.model_dir / str(settings.version)
    if (version_dir / settings.model_file).is_file():
        return None
    if settings.model_file != MODEL_FILE:
        return None
    if (version_dir / SAVED_MODEL_FILE).is_file():
        return version_dir
    if (version_dir / KERAS_FILE).is_file():
        return version_dir / KERAS_FILE
    return None


def quantize_tflite(settings: QuantizeSettings) -> dict[str, Any]:
    """Quantize a TensorFlow version to TFLite, measure and check it, and write it.

    Returns the report, with the new version's directory under `written`.
    """
    source = tensorflow_source(settings)
    if source is None:
        version_dir = settings.model_dir / str(settings.version)
        raise ValueError(f"{version_dir} contains no {SAVED_MODEL_FILE} or {KERAS_FILE}")
    check_settings(settings)
    if settings.per_channel:
        raise ValueError(
            "--per-channel applies to ONNX models only; the TFLite converter chooses the "
            "weight scales itself"
        )

    # TensorFlow fixes its thread pools when it first runs an op, which the conversion does,
    # so the one-thread setting of the speed test has to come first.
    configure_threads(1, 1)
    version = settings.output_version
    output_version = version if version is not None else next_version(settings.model_dir)

    with loaded_version(settings.model_dir / str(settings.version)) as (original, signature):
        validation = read_validation(settings.validation, signature)
        calibration = None
        if settings.calibration is not None:
            calibration = file_inputs(settings.calibration, list(signature.inputs))

        with staged_version(settings.model_dir, output_version) as work:
            quantized = work / TFLITE_FILE
            quantized.write_bytes(_convert(source, settings.mode, calibration))

            with loaded_version(work) as (candidate, _):
                quality = None
                if validation is not None:
                    quality = measure_quality(original, candidate, signature, *validation)
                problem = quality_problem(quality, settings)
                if problem is not None:
                    raise QualityError(f"{problem}; nothing written")
                speed = measure_speed(original, candidate, signature, validation, settings)

            report: dict[str, Any] = {
                "model": settings.model_dir.name,
                "source_version": settings.version,
                "output_version": output_version,
                "file": TFLITE_FILE,
                "format": "tflite",
                "mode": settings.mode,
                "method": METHODS[settings.mode],
                "size_bytes": {
                    "original": _model_bytes(source),
                    "quantized": quantized.stat().st_size,
                },
                "speed": speed,
            }
            if quality is not None:
                report["quality"] = quality
            (work / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    report["written"] = str(settings.model_dir / str(output_version))
    return report


def _convert(source: Path, mode: str, calibration: dict[str, np.ndarray[Any, Any]] | None) -> bytes:
    import tensorflow as tf

    with serving_model(source) as model:
        converter = tflite_converter(model)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if mode == "int8-static":
            assert calibration is not None

            def representative_dataset() -> Iterator[dict[str, np.ndarray[Any, Any]]]:
                yield from row_batches(calibration)

            converter.representative_dataset = representative_dataset
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        elif mode == "fp16":
            converter.target_spec.supported_types = [tf.float16]
        result: bytes = converter.convert()
    return result


def _model_bytes(source: Path) -> int:
    """Size of a Keras file, or of a SavedModel's graph, variables and assets."""
    if source.is_file():
        return source.stat().st_size
    paths = [source / SAVED_MODEL_FILE]
    for folder in ("variables", "assets"):
        if (source / folder).is_dir():
            paths.extend(path for path in (source / folder).rglob("*") if path.is_file())
    return sum(path.stat().st_size for path in paths)

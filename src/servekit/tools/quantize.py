"""`servekit quantize`: a smaller, faster version of an ONNX model, with a quality check.

Modes, all through ONNX Runtime's own tools:

- `int8-dynamic`: weights stored as int8, activations quantized per call (no calibration).
  `--per-channel` keeps one scale per output channel, which loses less accuracy.
- `int8-static`: weights and activations int8, with activation ranges calibrated on
  `--calibration` data.
- `fp16`: weights and computation in float16; inputs and outputs stay float32, so clients
  send the same requests.

The new model is compared with the original in the same run: file size, latency of one row,
rows per second in batches of 32, and quality on `--validation` data. With labels (an array
named `labels` in the `.npz`), quality is the accuracy of each model and how often their
predicted classes agree. Without labels, it is the largest absolute difference and the mean
cosine similarity of the outputs. `--max-accuracy-drop` (or `--min-cosine`) makes the command fail
and write nothing when the new model is worse than allowed. Otherwise the model is written as
a new version directory, which appears all at once (see tools/versions.py).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from servekit.core.types import TensorSpec
from servekit.runtimes.onnx import tensor_spec
from servekit.tools.bench.requests import file_inputs
from servekit.tools.versions import next_version, staged_version

MODES = ("int8-dynamic", "int8-static", "fp16")
MODEL_FILE = "model.onnx"
REPORT_FILE = "quantize.json"
_BATCH = 32


class QualityError(Exception):
    """The quantized model is worse than the limit allows; nothing was written."""


@dataclass(frozen=True)
class QuantizeSettings:
    model_dir: Path
    version: int
    mode: str = "int8-dynamic"
    per_channel: bool = False
    calibration: Path | None = None
    validation: Path | None = None
    output_version: int | None = None
    max_accuracy_drop: float | None = None
    min_cosine: float | None = None
    seconds: float = 1.0


def quantize(settings: QuantizeSettings) -> dict[str, Any]:
    """Quantize, measure, check and write the new version; return the report."""
    source = settings.model_dir / str(settings.version) / MODEL_FILE
    if not source.is_file():
        raise ValueError(f"{source} does not exist; quantize works on ONNX versions")
    version = settings.output_version
    output_version = version if version is not None else next_version(settings.model_dir)
    specs = _input_specs(source)
    with staged_version(settings.model_dir, output_version) as work:
        quantized = work / MODEL_FILE
        _convert(settings, source, quantized, specs)
        report: dict[str, Any] = {
            "model": settings.model_dir.name,
            "source_version": settings.version,
            "output_version": output_version,
            "mode": settings.mode,
            "per_channel": settings.per_channel,
            "size_bytes": {
                "original": source.stat().st_size,
                "quantized": quantized.stat().st_size,
            },
            "speed": _speed(source, quantized, specs, settings.seconds),
        }
        if settings.validation is not None:
            report["quality"] = _quality(source, quantized, specs, settings.validation)
        _check_quality(report.get("quality"), settings)
        (work / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    report["written"] = str(settings.model_dir / str(output_version))
    return report


def _input_specs(path: Path) -> list[TensorSpec]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [tensor_spec(node) for node in session.get_inputs()]


def _convert(
    settings: QuantizeSettings, source: Path, target: Path, specs: list[TensorSpec]
) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic, quantize_static

    if settings.mode == "int8-dynamic":
        quantize_dynamic(
            str(source), str(target), weight_type=QuantType.QInt8, per_channel=settings.per_channel
        )
    elif settings.mode == "int8-static":
        if settings.calibration is None:
            raise ValueError("int8-static needs --calibration data (.npy, .npz or .jsonl)")
        arrays = file_inputs(settings.calibration, specs)
        quantize_static(
            str(source),
            str(target),
            _Calibration(arrays),
            per_channel=settings.per_channel,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QInt8,
        )
    elif settings.mode == "fp16":
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
        onnx.save(model, str(target))
    else:
        raise ValueError(f"unknown mode {settings.mode!r}; use one of {', '.join(MODES)}")


class _Calibration:
    """Feeds calibration rows to ONNX Runtime's static quantizer, a batch at a time."""

    def __init__(self, arrays: dict[str, np.ndarray[Any, Any]]) -> None:
        rows = min(len(array) for array in arrays.values())
        self._batches = iter(
            {name: array[start : start + _BATCH] for name, array in arrays.items()}
            for start in range(0, rows, _BATCH)
        )

    def get_next(self) -> dict[str, np.ndarray[Any, Any]] | None:
        return next(self._batches, None)


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # One thread each, so the comparison is not decided by how threads share two cores.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _random_feed(specs: list[TensorSpec], rows: int) -> dict[str, np.ndarray[Any, Any]]:
    rng = np.random.default_rng(0)
    feed = {}
    for spec in specs:
        shape = [rows if index == 0 and size < 0 else max(size, 1)
                 for index, size in enumerate(spec.shape)]  # fmt: skip
        feed[spec.name] = rng.random(shape).astype(spec.datatype.numpy_dtype)
    return feed


def _speed(
    original: Path, quantized: Path, specs: list[TensorSpec], seconds: float
) -> dict[str, Any]:
    """Measure both models in turn, in this process: latency at batch 1, rate at batch 32."""
    result: dict[str, Any] = {}
    for name, path in (("original", original), ("quantized", quantized)):
        session = _session(path)
        single, batch = _random_feed(specs, 1), _random_feed(specs, _BATCH)
        session.run(None, single)
        latencies = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            session.run(None, single)
            latencies.append(time.perf_counter() - started)
        calls = 0
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            session.run(None, batch)
            calls += 1
        result[name] = {
            "latency_ms_batch_1": statistics.median(latencies) * 1000,
            "rows_per_second_batch_32": calls * _BATCH / (time.perf_counter() - started),
        }
    result["speedup_batch_1"] = (
        result["original"]["latency_ms_batch_1"] / result["quantized"]["latency_ms_batch_1"]
    )
    result["speedup_batch_32"] = (
        result["quantized"]["rows_per_second_batch_32"]
        / result["original"]["rows_per_second_batch_32"]
    )
    return result


def _quality(
    original: Path, quantized: Path, specs: list[TensorSpec], validation: Path
) -> dict[str, Any]:
    feed = file_inputs(validation, specs)
    labels = None
    if validation.suffix == ".npz":
        with np.load(validation, allow_pickle=False) as archive:
            if "labels" in archive.files:
                labels = archive["labels"]
    before = _session(original).run(None, feed)
    after = _session(quantized).run(None, feed)
    names = [node.name for node in _session(original).get_outputs()]
    quality: dict[str, Any] = {"rows": len(next(iter(feed.values())))}
    scores = [index for index, array in enumerate(before) if array.dtype.kind == "f"]
    for index in scores:
        first = before[index].reshape(len(before[index]), -1).astype(np.float64)
        second = after[index].reshape(len(after[index]), -1).astype(np.float64)
        norms = np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1)
        cosine = np.sum(first * second, axis=1) / np.where(norms == 0, 1, norms)
        quality[names[index]] = {
            "max_abs_difference": float(np.max(np.abs(first - second))),
            "mean_cosine": float(np.mean(cosine)),
            "min_cosine": float(np.min(cosine)),
        }
    if labels is not None and scores:
        index = scores[-1]
        predicted_before = before[index].reshape(len(labels), -1).argmax(axis=1)
        predicted_after = after[index].reshape(len(labels), -1).argmax(axis=1)
        quality["accuracy_original"] = float(np.mean(predicted_before == labels))
        quality["accuracy_quantized"] = float(np.mean(predicted_after == labels))
        quality["agreement"] = float(np.mean(predicted_before == predicted_after))
        quality["accuracy_drop"] = quality["accuracy_original"] - quality["accuracy_quantized"]
    return quality


def _check_quality(quality: dict[str, Any] | None, settings: QuantizeSettings) -> None:
    if settings.max_accuracy_drop is None and settings.min_cosine is None:
        return
    if quality is None:
        raise ValueError("--max-accuracy-drop and --min-cosine need --validation data")
    if settings.max_accuracy_drop is not None:
        if "accuracy_drop" not in quality:
            raise ValueError("--max-accuracy-drop needs `labels` in the --validation .npz")
        if quality["accuracy_drop"] > settings.max_accuracy_drop:
            raise QualityError(
                f"accuracy dropped by {quality['accuracy_drop']:.4f} "
                f"({quality['accuracy_original']:.4f} -> {quality['accuracy_quantized']:.4f}), "
                f"more than --max-accuracy-drop {settings.max_accuracy_drop}; nothing written"
            )
    if settings.min_cosine is not None:
        cosines = [item["mean_cosine"] for item in quality.values() if isinstance(item, dict)]
        if cosines and min(cosines) < settings.min_cosine:
            raise QualityError(
                f"mean cosine similarity {min(cosines):.4f} is under --min-cosine "
                f"{settings.min_cosine}; nothing written"
            )

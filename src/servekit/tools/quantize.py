"""`servekit quantize`: a smaller, faster version of an ONNX model, with a quality check.

Modes, all through ONNX Runtime's own tools:

- `int8-dynamic`: weights stored as int8, activations quantized per call (no calibration).
  `--per-channel` keeps one scale per output channel, which loses less accuracy.
- `int8-static`: weights and activations int8, with activation ranges calibrated on
  `--calibration` data.
- `fp16`: weights and computation in float16; inputs and outputs stay float32, so clients
  send the same requests.

`--file` names the ONNX file to quantize when it is not `model.onnx`, such as the encoder of a
Python model that tokenizes text first; the version's other files are copied unchanged.

The new version is compared with the original in the same run, each loaded by the runtime that
serves it (so a Python model's own pre- and postprocessing are part of the measurement): file
size, latency of one row, rows per second in batches of 32, and quality on `--validation` data.
The speed runs use the first validation rows, or random values without `--validation`. With
labels (an array named `labels` in the `.npz`), quality is the accuracy of each model and how
often their predicted classes agree. Without labels, it is the largest absolute difference and
the mean cosine similarity of the outputs. `--max-accuracy-drop` (or `--min-cosine`) makes the
command fail and write nothing when the new model is worse than allowed. An int8 model that
fails that check with one scale per tensor is quantized again per channel before the command
gives up; the report lists both attempts. Otherwise the model is written as a new version
directory, which appears all at once (see tools/versions.py).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from servekit.core.types import Signature, TensorSpec
from servekit.runtimes.base import Runtime, RuntimeOptions, runtime_for
from servekit.runtimes.onnx import tensor_spec
from servekit.tools.bench.requests import file_inputs
from servekit.tools.versions import next_version, staged_version

MODES = ("int8-dynamic", "int8-static", "fp16")
MODEL_FILE = "model.onnx"
REPORT_FILE = "quantize.json"
# Reports that describe the source version, not the new one.
_REPORTS = (REPORT_FILE, "convert.json")
_BATCH = 32


class QualityError(Exception):
    """The quantized model is worse than the limit allows; nothing was written."""


@dataclass(frozen=True)
class QuantizeSettings:
    model_dir: Path
    version: int
    model_file: str = MODEL_FILE
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
    source_dir = settings.model_dir / str(settings.version)
    source = source_dir / settings.model_file
    if not source.is_file():
        raise ValueError(f"{source} does not exist; quantize works on ONNX files")
    check_settings(settings)
    version = settings.output_version
    output_version = version if version is not None else next_version(settings.model_dir)
    onnx_specs = _input_specs(source)
    with loaded_version(source_dir) as (original, signature):
        validation = read_validation(settings.validation, signature)
        with staged_version(settings.model_dir, output_version) as work:
            _copy_companions(source_dir, work, settings.model_file)
            quantized = work / settings.model_file
            attempts: list[dict[str, Any]] = []
            for per_channel in _per_channel_choices(settings):
                _convert(settings, per_channel, source, quantized, onnx_specs)
                with loaded_version(work) as (candidate, _):
                    quality = None
                    if validation is not None:
                        quality = measure_quality(original, candidate, signature, *validation)
                    problem = quality_problem(quality, settings)
                    attempts.append({"per_channel": per_channel, "quality": quality})
                    if problem is None:
                        speed = measure_speed(original, candidate, signature, validation, settings)
                        break
            else:
                tried = " (also with one scale per channel)" if len(attempts) > 1 else ""
                raise QualityError(f"{problem}{tried}; nothing written")
            report: dict[str, Any] = {
                "model": settings.model_dir.name,
                "source_version": settings.version,
                "output_version": output_version,
                "file": settings.model_file,
                "mode": settings.mode,
                "per_channel": attempts[-1]["per_channel"],
                "size_bytes": {
                    "original": source.stat().st_size,
                    "quantized": quantized.stat().st_size,
                },
                "speed": speed,
            }
            if quality is not None:
                report["quality"] = quality
            if len(attempts) > 1:
                report["attempts"] = attempts
            (work / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    report["written"] = str(settings.model_dir / str(output_version))
    return report


def check_settings(settings: QuantizeSettings) -> None:
    """Raise ValueError for an unknown mode or a missing --calibration or --validation file."""
    if settings.mode not in MODES:
        raise ValueError(f"unknown mode {settings.mode!r}; use one of {', '.join(MODES)}")
    if settings.mode == "int8-static" and settings.calibration is None:
        raise ValueError("int8-static needs --calibration data (.npy, .npz or .jsonl)")
    limited = settings.max_accuracy_drop is not None or settings.min_cosine is not None
    if limited and settings.validation is None:
        raise ValueError("--max-accuracy-drop and --min-cosine need --validation data")


def _per_channel_choices(settings: QuantizeSettings) -> tuple[bool, ...]:
    """Per-tensor first, then per-channel when a quality limit may reject the first."""
    limited = settings.max_accuracy_drop is not None or settings.min_cosine is not None
    if settings.per_channel or settings.mode == "fp16" or not limited:
        return (settings.per_channel,)
    return (False, True)


@contextlib.contextmanager
def loaded_version(directory: Path) -> Iterator[tuple[Runtime, Signature]]:
    """Load a version with the runtime that serves it, on one thread, and unload it after."""
    runtime = runtime_for(directory, RuntimeOptions(intra_op_threads=1, inter_op_threads=1))
    signature = runtime.load(directory)
    try:
        yield runtime, signature
    finally:
        runtime.unload()


def _copy_companions(source: Path, target: Path, model_file: str) -> None:
    """Copy the version's other files (a Python model, a tokenizer) into the new version."""
    for path in source.iterdir():
        if path.name in (model_file, *_REPORTS):
            continue
        if path.is_dir():
            shutil.copytree(path, target / path.name)
        else:
            shutil.copy2(path, target / path.name)


def _input_specs(path: Path) -> list[TensorSpec]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [tensor_spec(node) for node in session.get_inputs()]


def _convert(
    settings: QuantizeSettings,
    per_channel: bool,
    source: Path,
    target: Path,
    specs: list[TensorSpec],
) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic, quantize_static

    # ONNX Runtime's quantizer reads the file itself, so a cleaned copy goes beside the target.
    cleaned = target.with_name(f".source-{target.name}")
    onnx.save(_merged_opsets(onnx.load(str(source))), str(cleaned))
    try:
        if settings.mode == "int8-dynamic":
            quantize_dynamic(
                str(cleaned), str(target), weight_type=QuantType.QInt8, per_channel=per_channel
            )
        elif settings.mode == "int8-static":
            assert settings.calibration is not None
            arrays = file_inputs(settings.calibration, specs)
            quantize_static(
                str(cleaned),
                str(target),
                _Calibration(arrays),
                per_channel=per_channel,
                weight_type=QuantType.QInt8,
                activation_type=QuantType.QInt8,
            )
        else:
            from onnxruntime.transformers.float16 import convert_float_to_float16

            model = convert_float_to_float16(onnx.load(str(cleaned)), keep_io_types=True)
            onnx.save(model, str(target))
    finally:
        cleaned.unlink(missing_ok=True)
    if settings.mode != "fp16":
        _check_quantized(onnx.load(str(target)), source.name)


def _merged_opsets(model: Any) -> Any:
    """Keep one opset import per domain (the highest), as ONNX Runtime's quantizer requires.

    skl2onnx lists the default domain twice in the models it writes.
    """
    from onnx import helper

    versions: dict[str, int] = {}
    for opset in model.opset_import:
        versions[opset.domain] = max(versions.get(opset.domain, 0), opset.version)
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(domain, v) for domain, v in versions.items())
    return model


def _check_quantized(model: Any, name: str) -> None:
    """Raise ValueError when the quantizer left every operator in float."""
    integer_ops = [node.op_type for node in model.graph.node if "Integer" in node.op_type
                   or "Quantize" in node.op_type or node.op_type.startswith("QLinear")]  # fmt: skip
    if not integer_ops:
        kinds = sorted({node.op_type for node in model.graph.node})
        raise ValueError(
            f"no operator of {name} can be quantized to int8: ONNX Runtime quantizes MatMul, "
            f"Gemm, Conv and their kin, and this model has {', '.join(kinds)}; nothing written"
        )


class _Calibration:
    """Feeds calibration rows to ONNX Runtime's static quantizer, a batch at a time."""

    def __init__(self, arrays: dict[str, np.ndarray[Any, Any]]) -> None:
        self._batches = row_batches(arrays)

    def get_next(self) -> dict[str, np.ndarray[Any, Any]] | None:
        return next(self._batches, None)


def row_batches(
    arrays: dict[str, np.ndarray[Any, Any]],
) -> Iterator[dict[str, np.ndarray[Any, Any]]]:
    """Yield the arrays' rows in batches of 32, cut to the shortest array."""
    rows = min(len(array) for array in arrays.values())
    for start in range(0, rows, _BATCH):
        yield {name: array[start : start + _BATCH] for name, array in arrays.items()}


def read_validation(
    path: Path | None, signature: Signature
) -> tuple[dict[str, np.ndarray[Any, Any]], np.ndarray[Any, Any] | None] | None:
    """Read the validation inputs, and the `labels` array of an .npz if it has one."""
    if path is None:
        return None
    feed = file_inputs(path, list(signature.inputs))
    labels = None
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            if "labels" in archive.files:
                labels = archive["labels"]
    return feed, labels


def _rows(feed: dict[str, np.ndarray[Any, Any]], count: int) -> dict[str, np.ndarray[Any, Any]]:
    """Return the first `count` rows of every input, repeated when there are fewer."""
    return {
        name: np.take(array, np.arange(count) % len(array), axis=0) for name, array in feed.items()
    }


def _random_feed(signature: Signature, rows: int) -> dict[str, np.ndarray[Any, Any]]:
    rng = np.random.default_rng(0)
    feed = {}
    for spec in signature.inputs:
        if spec.datatype.is_bytes:
            raise ValueError(
                f"input {spec.name!r} is BYTES; measuring speed needs --validation data"
            )
        shape = [rows if index == 0 and size < 0 else max(size, 1)
                 for index, size in enumerate(spec.shape)]  # fmt: skip
        feed[spec.name] = rng.random(shape).astype(spec.datatype.numpy_dtype)
    return feed


def measure_speed(
    original: Runtime,
    quantized: Runtime,
    signature: Signature,
    validation: tuple[dict[str, np.ndarray[Any, Any]], Any] | None,
    settings: QuantizeSettings,
) -> dict[str, Any]:
    """Measure both versions in turn, in this process: latency at batch 1, rate at batch 32."""
    if validation is not None:
        single, batch = _rows(validation[0], 1), _rows(validation[0], _BATCH)
    else:
        single, batch = _random_feed(signature, 1), _random_feed(signature, _BATCH)
    outputs = signature.output_names
    seconds = settings.seconds
    result: dict[str, Any] = {}
    for name, runtime in (("original", original), ("quantized", quantized)):
        runtime.predict(single, outputs)
        latencies = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            runtime.predict(single, outputs)
            latencies.append(time.perf_counter() - started)
        calls = 0
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            runtime.predict(batch, outputs)
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


def _predict_all(
    runtime: Runtime, feed: dict[str, np.ndarray[Any, Any]], outputs: tuple[str, ...]
) -> dict[str, np.ndarray[Any, Any]]:
    """Run every validation row, a batch at a time, and join the outputs."""
    parts = [runtime.predict(batch, outputs) for batch in row_batches(feed)]
    return {name: np.concatenate([part[name] for part in parts]) for name in outputs}


def measure_quality(
    original: Runtime,
    quantized: Runtime,
    signature: Signature,
    feed: dict[str, np.ndarray[Any, Any]],
    labels: np.ndarray[Any, Any] | None,
) -> dict[str, Any]:
    """Compare both versions' float outputs on the validation rows, and their accuracy."""
    names = signature.output_names
    before = _predict_all(original, feed, names)
    after = _predict_all(quantized, feed, names)
    quality: dict[str, Any] = {"rows": len(next(iter(feed.values())))}
    scores = [name for name in names if before[name].dtype.kind == "f"]
    for name in scores:
        first = before[name].reshape(len(before[name]), -1).astype(np.float64)
        second = after[name].reshape(len(after[name]), -1).astype(np.float64)
        norms = np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1)
        cosine = np.sum(first * second, axis=1) / np.where(norms == 0, 1, norms)
        quality[name] = {
            "max_abs_difference": float(np.max(np.abs(first - second))),
            "mean_cosine": float(np.mean(cosine)),
            "min_cosine": float(np.min(cosine)),
        }
    if labels is not None and scores:
        name = scores[-1]
        predicted_before = before[name].reshape(len(labels), -1).argmax(axis=1)
        predicted_after = after[name].reshape(len(labels), -1).argmax(axis=1)
        quality["accuracy_original"] = float(np.mean(predicted_before == labels))
        quality["accuracy_quantized"] = float(np.mean(predicted_after == labels))
        quality["agreement"] = float(np.mean(predicted_before == predicted_after))
        quality["accuracy_drop"] = quality["accuracy_original"] - quality["accuracy_quantized"]
    return quality


def quality_problem(quality: dict[str, Any] | None, settings: QuantizeSettings) -> str | None:
    """Say how the quantized model breaks the quality limits, or None when it keeps them."""
    if quality is None:
        return None
    if settings.max_accuracy_drop is not None:
        if "accuracy_drop" not in quality:
            raise ValueError("--max-accuracy-drop needs `labels` in the --validation .npz")
        if quality["accuracy_drop"] > settings.max_accuracy_drop:
            return (
                f"accuracy dropped by {quality['accuracy_drop']:.4f} "
                f"({quality['accuracy_original']:.4f} -> {quality['accuracy_quantized']:.4f}), "
                f"more than --max-accuracy-drop {settings.max_accuracy_drop}"
            )
    if settings.min_cosine is not None:
        cosines = [item["mean_cosine"] for item in quality.values() if isinstance(item, dict)]
        if cosines and min(cosines) < settings.min_cosine:
            return (
                f"mean cosine similarity {min(cosines):.4f} is under --min-cosine "
                f"{settings.min_cosine}"
            )
    return None

"""`servekit convert pytorch`: a TorchScript or torch.export model as an ONNX version.

SOURCE is a TorchScript file (`.pt`, from `torch.jit.save`) or a torch.export program (`.pt2`,
from `torch.export.save`). PyTorch documents that loading either can run code from the file,
so conversion needs `--allow-pickle` and logs a warning naming the file.

A `.pt2` program is exported by the torch.export-based ONNX exporter (which needs onnxscript)
and keeps the names the server gives it (see runtimes/torch.py). Its first input dimension
must have been exported as dynamic (`torch.export.Dim`), because a program traced for one
batch size cannot be re-exported for others. In torch 2.13 that exporter rejects TorchScript
modules, so a `.pt` file goes through the TorchScript-based exporter, with the first dimension
of every input and output marked dynamic. Its input takes the name of `forward`'s argument and
its outputs are `output_0`, `output_1`, ... in the order returned, unless a `signature.json`
beside SOURCE names them: then the ONNX model keeps the names the server gives the original.

The model must take one tensor input, which the `--sample` rows fill: as FP32 for a `.pt`
file, and cast to the input's datatype for a `.pt2` program. Both models run on those rows, and
every output must be within `--tolerance` of PyTorch's, or nothing is written. The report gives
the largest difference per output and, for 2-D float outputs read as class scores, how often
the two models pick the same class. The new version directory appears all at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from servekit.runtimes.torch import (
    SIGNATURE_FILE,
    datatype_from_torch,
    exported_signature,
    name_outputs,
    read_signature_file,
)
from servekit.tools.convert import (
    MODEL_FILE,
    REPORT_FILE,
    ConversionMismatchError,
    sample_rows,
)
from servekit.tools.versions import next_version, staged_version

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _LoadedModel:
    """A PyTorch model ready to run and to export to ONNX."""

    format: str
    module: Any
    # The exported program of a .pt2 file; None for TorchScript.
    program: Any
    input_name: str
    output_names: tuple[str, ...]
    rows: np.ndarray[Any, Any]


def convert_pytorch(
    source: Path,
    model_dir: Path,
    sample: Path,
    version: int | None = None,
    allow_pickle: bool = False,
    tolerance: float = 1e-4,
) -> dict[str, Any]:
    """Export to ONNX, compare on the sample rows, and write the new version; return the report."""
    if source.suffix not in (".pt", ".pt2"):
        raise ValueError(
            f"SOURCE must be a TorchScript .pt file or a torch.export .pt2 file, not {source.name}"
        )
    if not allow_pickle:
        raise ValueError(
            f"loading {source} can run code from the file (PyTorch unpickles it); pass "
            "--allow-pickle if you trust it"
        )
    logger.warning("loading PyTorch model %s: this can run code from the file", source)
    rows = sample_rows(sample)
    model = _load(source, rows)
    _apply_signature_file(model, source.parent / SIGNATURE_FILE)
    expected = _run_torch(model)

    model_dir_created = not model_dir.exists()
    model_dir.mkdir(parents=True, exist_ok=True)
    version = version if version is not None else next_version(model_dir)
    try:
        with staged_version(model_dir, version) as work:
            path = work / MODEL_FILE
            _export(model, path)
            report = _compare(model, path, expected, tolerance)
            report.update({"source": str(source), "version": version, "rows_compared": len(rows)})
            (work / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    except BaseException:
        # staged_version has removed its folder; the model folder goes too if this call made
        # it and it is still empty.
        if model_dir_created:
            with contextlib.suppress(OSError):
                model_dir.rmdir()
        raise
    report["written"] = str(model_dir / str(version))
    return report


def _apply_signature_file(model: _LoadedModel, path: Path) -> None:
    """Take the tensor names of a signature.json beside SOURCE, as the server does."""
    if not path.is_file():
        return
    inputs, outputs = read_signature_file(path)
    if inputs is not None and len(inputs) == 1:
        model.input_name = inputs[0].name
    if outputs is not None:
        model.output_names = tuple(spec.name for spec in outputs)


def _load(source: Path, rows: np.ndarray[Any, Any]) -> _LoadedModel:
    import torch

    try:
        if source.suffix == ".pt":
            module = torch.jit.load(str(source), map_location="cpu")
        else:
            program = torch.export.load(str(source))
    except RuntimeError as exc:
        # A truncated or foreign file fails inside PyTorch's C++ reader with RuntimeError.
        raise ValueError(f"PyTorch cannot read the file: {_first_line(exc)}") from None
    if source.suffix == ".pt":
        return _describe_torchscript(module, rows)
    return _describe_exported(program, rows)


def _describe_torchscript(module: Any, rows: np.ndarray[Any, Any]) -> _LoadedModel:
    module.eval()
    # The schema's first argument is `self`.
    arguments = module.forward.schema.arguments[1:]
    required = [argument for argument in arguments if not argument.has_default_value()]
    if len(required) != 1:
        names = ", ".join(argument.name for argument in arguments)
        raise ValueError(
            f"forward must take one tensor input to fill from --sample; it takes {names}"
        )
    # The output names follow from what forward returns (see _run_torch).
    return _LoadedModel("torchscript", module, None, required[0].name, (), rows)


def _describe_exported(program: Any, rows: np.ndarray[Any, Any]) -> _LoadedModel:
    signature = exported_signature(program)
    if len(signature.inputs) != 1:
        names = ", ".join(signature.input_names)
        raise ValueError(
            f"the program must take one tensor input to fill from --sample; it takes {names}"
        )
    spec = signature.inputs[0]
    if not spec.shape or spec.shape[0] != -1:
        raise ValueError(
            f"input {spec.name!r} has the fixed shape {list(spec.shape)}; export the program "
            "with a dynamic first dimension (dynamic_shapes with torch.export.Dim)"
        )
    rows = rows.astype(spec.datatype.numpy_dtype)
    return _LoadedModel(
        "torch.export", program.module(), program, spec.name, signature.output_names, rows
    )


def _run_torch(model: _LoadedModel) -> dict[str, np.ndarray[Any, Any]]:
    """Run the PyTorch model on the rows; fill in TorchScript's output names on the way."""
    import torch

    try:
        with torch.inference_mode():
            result = model.module(torch.from_numpy(model.rows))
    except (RuntimeError, AssertionError) as exc:
        # An exported program checks input shapes with assertions.
        raise ValueError(f"the model failed on the --sample rows: {_first_line(exc)}") from None
    if not model.output_names:
        if isinstance(result, dict):
            raise ValueError(
                "the TorchScript-based ONNX exporter cannot export a forward that returns a "
                "dict; return a tensor or a tuple of tensors"
            )
        count = len(result) if isinstance(result, tuple | list) else 1
        model.output_names = tuple(f"output_{index}" for index in range(count))
    named = name_outputs(result, model.output_names)
    arrays = {}
    for name in model.output_names:
        value = named[name]
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"output {name!r} is a {type(value).__name__}, not a tensor")
        # Raises ValueError for a dtype that servekit cannot serve, such as bfloat16.
        datatype_from_torch(value.dtype)
        arrays[name] = value.detach().cpu().numpy()
    return arrays


def _export(model: _LoadedModel, path: Path) -> None:
    try:
        _run_exporter(model, path)
    except RuntimeError as exc:
        # The exporters' own errors (torch.onnx.OnnxExporterError) are RuntimeErrors too.
        raise ValueError(f"exporting to ONNX failed: {_first_line(exc)}") from exc


def _run_exporter(model: _LoadedModel, path: Path) -> None:
    import torch

    if model.program is not None:
        # The program keeps the dynamic dimensions it was exported with.
        torch.onnx.export(
            model.program,
            f=str(path),
            input_names=[model.input_name],
            output_names=list(model.output_names),
            external_data=False,
            verbose=False,
        )
        return
    dynamic_axes = {name: {0: "batch"} for name in (model.input_name, *model.output_names)}
    with _quiet_torchscript_exporter():
        torch.onnx.export(
            model.module,
            (torch.from_numpy(model.rows[:2]),),
            str(path),
            dynamo=False,
            input_names=[model.input_name],
            output_names=list(model.output_names),
            dynamic_axes=dynamic_axes,
        )


@contextlib.contextmanager
def _quiet_torchscript_exporter() -> Iterator[None]:
    """Hide the warnings that the TorchScript-based exporter gives on every ScriptModule."""
    with warnings.catch_warnings():
        # Chosen on purpose: the torch.export-based exporter rejects ScriptModules.
        warnings.filterwarnings(
            "ignore", "You are using the legacy TorchScript", DeprecationWarning
        )
        # A ScriptModule's forward has no Python signature to inspect; its schema names the inputs.
        warnings.filterwarnings("ignore", "no signature found for", UserWarning)
        yield


def _compare(
    model: _LoadedModel,
    path: Path,
    expected: dict[str, np.ndarray[Any, Any]],
    tolerance: float,
) -> dict[str, Any]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    results = session.run(list(model.output_names), {model.input_name: model.rows})
    outputs: dict[str, dict[str, float]] = {}
    for name, actual in zip(model.output_names, results, strict=True):
        reference = expected[name]
        if actual.shape != reference.shape:
            raise ConversionMismatchError(
                f"output {name!r} has shape {list(actual.shape)} in ONNX but "
                f"{list(reference.shape)} in PyTorch; nothing written"
            )
        figures = {"max_difference": _max_difference(actual, reference)}
        if reference.ndim == 2 and reference.shape[1] > 1 and reference.dtype.kind == "f":
            agreement = np.mean(actual.argmax(axis=1) == reference.argmax(axis=1))
            figures["label_agreement"] = float(agreement)
        outputs[name] = figures
    difference = max(figures["max_difference"] for figures in outputs.values())
    report: dict[str, Any] = {"format": model.format, "max_difference": difference}
    agreements = [
        figures["label_agreement"] for figures in outputs.values() if "label_agreement" in figures
    ]
    if agreements:
        report["label_agreement"] = min(agreements)
    report["outputs"] = outputs
    if not difference <= tolerance:
        raise ConversionMismatchError(
            f"the ONNX model differs from the PyTorch model by up to {difference:.3g} "
            f"(tolerance {tolerance}); nothing written"
        )
    return report


def _max_difference(actual: np.ndarray[Any, Any], expected: np.ndarray[Any, Any]) -> float:
    if actual.size == 0:
        return 0.0
    first = actual.astype(np.float64)
    second = expected.astype(np.float64)
    with np.errstate(invalid="ignore"):
        difference = np.abs(first - second)
    # Equal infinities and NaN in both count as equal; NaN in only one as an infinite difference.
    same = (first == second) | (np.isnan(first) & np.isnan(second))
    difference = np.where(same, 0.0, difference)
    return float(np.max(np.where(np.isnan(difference), np.inf, difference)))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

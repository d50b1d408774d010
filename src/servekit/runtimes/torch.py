"""PyTorch models: TorchScript (`model.pt`) and torch.export programs (`model.pt2`).

`model.pt` is loaded with `torch.jit.load` and `model.pt2` with `torch.export.load` (then
`.module()`), on the CPU. The docstrings of both loaders in torch 2.13 warn that a crafted
file can run arbitrary code (`torch.export.load` unpickles weights with
`torch.load(weights_only=False)`), so both files load only with `--allow_pickle`, and each load
logs a warning naming the file. PyTorch 2.13 also marks TorchScript as deprecated in favour of
torch.export.

A TorchScript file records no tensor types or shapes, so its version directory needs a
`signature.json` beside `model.pt` that declares them, in the V2 metadata format::

    {
      "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}],
      "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, 10]}]
    }

A -1 dimension takes any size; a first dimension of -1 on every input lets requests be
batched together. Datatypes are FP16, FP32, FP64, INT8, INT16, INT32, INT64, UINT8 and BOOL.

A torch.export program carries its signature: inputs take the names of the exported
`forward`'s arguments, dynamic dimensions become -1, and outputs are named after the keys of a
returned dict, or `output_0`, `output_1`, ... in order. A `signature.json` beside `model.pt2`
replaces either half: its `inputs`, its `outputs`, or both (to rename outputs, say).

Inputs are passed to `forward` positionally, in signature order, as tensors. Keyword-only or
nested arguments are not supported. `forward` may return one tensor (for a single declared
output), a tuple or list of tensors (matched to the declared outputs in order), or a dict of
tensors whose keys include every declared output name. An output whose dtype differs from its
declared datatype is an error, not a silent cast. Calls run under `torch.inference_mode()`.

PyTorch's ATen kernels release the GIL, so instances compute in parallel threads. A nonzero
`--tensorflow_intra_op_parallelism` calls `torch.set_num_threads`, which is process-wide: it
applies to every PyTorch model in the server, and the last model loaded sets it. PyTorch's
docs promise the setting only before the process first runs PyTorch code, but in torch 2.13
`torch.get_num_threads` does report a later call. The inter-op setting is not applied, because
PyTorch allows `torch.set_num_interop_threads` only once and before any inter-op work starts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from servekit.core.types import DataType, Signature, TensorSpec
from servekit.runtimes.base import PickleNotAllowedError, RuntimeOptions

logger = logging.getLogger(__name__)

SIGNATURE_FILE = "signature.json"
_SIGNATURE_EXAMPLE = (
    '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}], '
    '"outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 10]}]}'
)

# Datatypes that both servekit and PyTorch carry, with the name of the torch dtype.
_TORCH_DTYPE_NAMES = {
    DataType.BOOL: "bool",
    DataType.UINT8: "uint8",
    DataType.INT8: "int8",
    DataType.INT16: "int16",
    DataType.INT32: "int32",
    DataType.INT64: "int64",
    DataType.FP16: "float16",
    DataType.FP32: "float32",
    DataType.FP64: "float64",
}
_DATATYPES_BY_TORCH_NAME = {name: datatype for datatype, name in _TORCH_DTYPE_NAMES.items()}


def datatype_from_torch(dtype: Any) -> DataType:
    """Return the datatype of a torch dtype, raising ValueError for one servekit lacks."""
    name = str(dtype).removeprefix("torch.")
    try:
        return _DATATYPES_BY_TORCH_NAME[name]
    except KeyError:
        raise ValueError(_unsupported(name)) from None


def _unsupported(name: str) -> str:
    known = ", ".join(datatype.v2_name for datatype in _TORCH_DTYPE_NAMES)
    return f"unsupported tensor type {name}: PyTorch models may use {known}"


class _TorchRuntime:
    """Loading and calling shared by the TorchScript and torch.export runtimes."""

    platform: str
    model_file: str
    inline_safe = False
    holds_gil = False

    def __init__(self, options: RuntimeOptions) -> None:
        self._options = options
        self._torch: Any = None
        self._module: Any = None
        self._signature: Signature | None = None

    def load(self, directory: Path) -> Signature:
        path = directory / self.model_file
        if not self._options.allow_pickle:
            raise PickleNotAllowedError(
                f"{self.model_file} is a PyTorch file, and loading it can run code from the "
                "file; start the server with --allow_pickle if you trust it"
            )
        import torch

        if self._options.intra_op_threads:
            torch.set_num_threads(self._options.intra_op_threads)
        logger.warning("loading PyTorch model %s: this can run code from the file", path)
        module, signature = self._load_module(path)
        self._torch = torch
        self._module = module
        self._signature = signature
        return signature

    def _load_module(self, path: Path) -> tuple[Any, Signature]:
        raise NotImplementedError

    def predict(
        self, inputs: dict[str, np.ndarray[Any, Any]], outputs: Sequence[str]
    ) -> dict[str, np.ndarray[Any, Any]]:
        if self._module is None or self._signature is None:
            raise RuntimeError("predict called before load")
        torch = self._torch
        # torch.from_numpy shares memory and warns on read-only arrays, such as those decoded
        # from a request body; np.require copies only such arrays and non-contiguous ones.
        tensors = [
            torch.from_numpy(np.require(inputs[spec.name], requirements=["C", "W"]))
            for spec in self._signature.inputs
        ]
        with torch.inference_mode():
            result = self._module(*tensors)
        named = name_outputs(result, self._signature.output_names)
        specs = {spec.name: spec for spec in self._signature.outputs}
        return {name: _to_numpy(named[name], specs[name]) for name in outputs}

    def unload(self) -> None:
        self._module = None
        self._signature = None


class TorchScriptRuntime(_TorchRuntime):
    """Runs a TorchScript `model.pt` with the signature declared in `signature.json`."""

    platform = "pytorch_torchscript"
    model_file = "model.pt"

    def _load_module(self, path: Path) -> tuple[Any, Signature]:
        import torch

        signature_path = path.parent / SIGNATURE_FILE
        if not signature_path.is_file():
            raise ValueError(
                f"{self.model_file} needs a {SIGNATURE_FILE} beside it, because TorchScript "
                f"files record no tensor types or shapes; for example {_SIGNATURE_EXAMPLE}"
            )
        inputs, outputs = read_signature_file(signature_path)
        if inputs is None or outputs is None:
            raise ValueError(
                f"{SIGNATURE_FILE} must declare both inputs and outputs for {self.model_file}"
            )
        module = torch.jit.load(str(path), map_location="cpu")
        module.eval()
        _check_argument_count(module, len(inputs))
        return module, Signature(inputs, outputs)


class TorchExportRuntime(_TorchRuntime):
    """Runs a torch.export `model.pt2`, with the signature the program records."""

    platform = "pytorch_export"
    model_file = "model.pt2"

    def _load_module(self, path: Path) -> tuple[Any, Signature]:
        import torch

        program = torch.export.load(str(path))
        signature = exported_signature(program)
        signature_path = path.parent / SIGNATURE_FILE
        if signature_path.is_file():
            inputs, outputs = read_signature_file(signature_path)
            if inputs is not None and len(inputs) != len(signature.inputs):
                raise ValueError(
                    f"{SIGNATURE_FILE} declares {len(inputs)} inputs, but the exported program "
                    f"takes {len(signature.inputs)}: {', '.join(signature.input_names)}"
                )
            signature = Signature(inputs or signature.inputs, outputs or signature.outputs)
        return program.module(), signature


def read_signature_file(
    path: Path,
) -> tuple[tuple[TensorSpec, ...] | None, tuple[TensorSpec, ...] | None]:
    """Parse a signature.json into its inputs and outputs, None for a half it leaves out."""
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{SIGNATURE_FILE} is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ValueError(
            f"{SIGNATURE_FILE} must contain an object, for example {_SIGNATURE_EXAMPLE}"
        )
    unknown = sorted(set(document) - {"inputs", "outputs"})
    if unknown:
        raise ValueError(
            f"{SIGNATURE_FILE} has unknown keys {unknown}; expected 'inputs' and 'outputs'"
        )
    return _read_specs(document, "inputs"), _read_specs(document, "outputs")


def _read_specs(document: dict[str, Any], key: str) -> tuple[TensorSpec, ...] | None:
    entries = document.get(key)
    if entries is None:
        return None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{SIGNATURE_FILE}: {key!r} must be a non-empty list of tensors")
    specs = tuple(_read_spec(entry, f"{key}[{index}]") for index, entry in enumerate(entries))
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{SIGNATURE_FILE}: {key} names {duplicates} more than once")
    return specs


def _read_spec(entry: Any, where: str) -> TensorSpec:
    if not isinstance(entry, dict) or set(entry) != {"name", "datatype", "shape"}:
        raise ValueError(
            f'{SIGNATURE_FILE}: {where} must be an object with "name", "datatype" and "shape"'
        )
    name, datatype_name, shape = entry["name"], entry["datatype"], entry["shape"]
    if not isinstance(name, str) or not name:
        raise ValueError(f"{SIGNATURE_FILE}: {where}.name must be a non-empty string")
    datatype = next((known for known in _TORCH_DTYPE_NAMES if known.v2_name == datatype_name), None)
    if datatype is None:
        raise ValueError(f"{SIGNATURE_FILE}: {where}.datatype: {_unsupported(str(datatype_name))}")
    valid_shape = isinstance(shape, list) and all(
        isinstance(dim, int) and not isinstance(dim, bool) and dim >= -1 for dim in shape
    )
    if not valid_shape:
        raise ValueError(
            f"{SIGNATURE_FILE}: {where}.shape must be a list of sizes, -1 for any size"
        )
    return TensorSpec(name, datatype, tuple(shape))


def exported_signature(program: Any) -> Signature:
    """Read the inputs and outputs of a torch.export ExportedProgram as a Signature."""
    from torch.export.graph_signature import InputKind, OutputKind, TensorArgument

    args_spec, kwargs_spec = program.call_spec.in_spec.children()
    positional = all(child.is_leaf() for child in args_spec.children())
    if kwargs_spec.num_children or not positional:
        raise ValueError(
            "the exported program takes keyword or nested arguments, but servekit passes each "
            "input tensor positionally; export a forward that takes tensors only"
        )
    nodes = {node.name: node for node in program.graph.nodes}
    inputs = []
    for spec in program.graph_signature.input_specs:
        if spec.kind is not InputKind.USER_INPUT:
            continue
        if not isinstance(spec.arg, TensorArgument):
            raise ValueError(f"input {spec.arg.name!r} of the exported program is not a tensor")
        inputs.append(_exported_spec(spec.arg.name, nodes[spec.arg.name]))
    names = _output_names(program.call_spec.out_spec)
    user_outputs = [
        spec.arg for spec in program.graph_signature.output_specs
        if spec.kind is OutputKind.USER_OUTPUT
    ]  # fmt: skip
    if len(names) != len(user_outputs):
        raise ValueError("the exported program returns a nested structure; return tensors")
    outputs = []
    for name, argument in zip(names, user_outputs, strict=True):
        if not isinstance(argument, TensorArgument):
            raise ValueError(f"output {name!r} of the exported program is not a tensor")
        outputs.append(_exported_spec(name, nodes[argument.name]))
    return Signature(tuple(inputs), tuple(outputs))


def _exported_spec(name: str, node: Any) -> TensorSpec:
    value = node.meta["val"]
    # Dynamic dimensions are symbolic integers (torch.SymInt), which are not int.
    shape = tuple(dim if isinstance(dim, int) else -1 for dim in value.shape)
    return TensorSpec(name, datatype_from_torch(value.dtype), shape)


def _output_names(out_spec: Any) -> list[str]:
    """Name the outputs of a pytree spec: a dict's keys, else output_0, output_1, ..."""
    if out_spec.is_leaf():
        return ["output_0"]
    children = out_spec.children()
    if not all(child.is_leaf() for child in children):
        raise ValueError("the exported program returns a nested structure; return tensors")
    if out_spec.type is dict:
        return [str(key) for key in out_spec.context]
    return [f"output_{index}" for index in range(len(children))]


def _check_argument_count(module: Any, count: int) -> None:
    # The schema's first argument is `self`.
    arguments = module.forward.schema.arguments[1:]
    required = sum(1 for argument in arguments if not argument.has_default_value())
    if not required <= count <= len(arguments):
        names = ", ".join(argument.name for argument in arguments)
        raise ValueError(
            f"{SIGNATURE_FILE} declares {count} inputs, but forward takes {len(arguments)} "
            f"({required} required): {names}"
        )


def name_outputs(result: Any, names: Sequence[str]) -> dict[str, Any]:
    """Match what `forward` returned (tensor, tuple, list or dict) to the output names."""
    import torch

    if isinstance(result, torch.Tensor):
        if len(names) != 1:
            raise ValueError(
                f"the model returned one tensor, but the signature declares {len(names)} "
                f"outputs: {', '.join(names)}"
            )
        return {names[0]: result}
    if isinstance(result, tuple | list):
        if len(result) != len(names):
            raise ValueError(
                f"the model returned {len(result)} values, but the signature declares "
                f"{len(names)} outputs: {', '.join(names)}"
            )
        return dict(zip(names, result, strict=True))
    if isinstance(result, dict):
        missing = [name for name in names if name not in result]
        if missing:
            raise ValueError(
                f"the model returned no output {missing[0]!r}; it returned {sorted(result)}"
            )
        return result
    raise ValueError(
        f"the model returned {type(result).__name__}; return a tensor, a tuple, a list or a dict"
    )


def _to_numpy(value: Any, spec: TensorSpec) -> np.ndarray[Any, Any]:
    import torch

    if not isinstance(value, torch.Tensor):
        raise ValueError(f"output {spec.name!r} is a {type(value).__name__}, not a tensor")
    datatype = datatype_from_torch(value.dtype)
    if datatype is not spec.datatype:
        raise ValueError(
            f"output {spec.name!r} has datatype {datatype.v2_name}, but the signature declares "
            f"{spec.datatype.v2_name}"
        )
    return value.detach().cpu().numpy()  # type: ignore[no-any-return]

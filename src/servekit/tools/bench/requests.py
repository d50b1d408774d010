"""Requests for the load generator: model metadata, input tensors and per-protocol encoding.

Inputs are random tensors shaped from the model's metadata, where a dimension of any size
becomes the rows per request if it is the first and 1 elsewhere. Or they are rows read from a
file: `.npy` for the model's only input, `.npz` with one array per input name, JSON Lines with
one object per row keyed by input name, or Parquet with one column per input (list columns
become 2-D). Requests of `rows` consecutive rows are encoded once, before the load starts, and
requests cycle through them, so encoding costs nothing during the measurement: 64 of random
rows, and up to 4096 of a file's rows (and 64 MiB of bodies), so that inputs of varied sizes,
such as texts, are sampled as the file has them.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from servekit.core.types import DataType, TensorSpec

PROTOCOLS = ("tfserving", "v2", "v2-binary", "grpc")
# Distinct request bodies prepared for one step; requests cycle through them.
_POOL_SIZE = 64
FILE_POOL_SIZE = 4096
_POOL_BYTES = 64 * 2**20
_TF_NAMES = {member.tf_name: member for member in DataType}


@dataclass(frozen=True)
class Target:
    """The destination of the requests: a server address, a protocol and a model."""

    url: str
    protocol: str
    model: str
    version: str = ""

    @property
    def grpc_address(self) -> str:
        return self.url.removeprefix("grpc://").removeprefix("http://").rstrip("/")

    @property
    def http_path(self) -> str:
        version = f"/versions/{self.version}" if self.version else ""
        if self.protocol == "tfserving":
            return f"/v1/models/{self.model}{version}:predict"
        return f"/v2/models/{self.model}{version}/infer"


@dataclass(frozen=True)
class Payload:
    """One encoded request: the body and, for HTTP, its headers."""

    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


def fetch_inputs(target: Target, timeout: float = 10.0) -> list[TensorSpec]:
    """Read the model's inputs from the server's metadata endpoint."""
    if target.protocol == "grpc":
        return _grpc_inputs(target, timeout)
    version = f"/versions/{target.version}" if target.version else ""
    if target.protocol == "tfserving":
        document = _get_json(f"{target.url}/v1/models/{target.model}{version}/metadata", timeout)
        signature = document["metadata"]["signature_def"]["signature_def"]["serving_default"]
        return [
            TensorSpec(
                name,
                _TF_NAMES[info["dtype"]],
                tuple(int(dim["size"]) for dim in info["tensor_shape"]["dim"]),
            )
            for name, info in signature["inputs"].items()
        ]
    document = _get_json(f"{target.url}/v2/models/{target.model}{version}", timeout)
    return [
        TensorSpec(item["name"], DataType.from_v2(item["datatype"]), tuple(item["shape"]))
        for item in document["inputs"]
    ]


def _get_json(url: str, timeout: float) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        raise ValueError(f"GET {url} failed with HTTP {exc.code}; check --model and URL") from None
    except (http.client.HTTPException, json.JSONDecodeError):
        raise ValueError(
            f"GET {url} did not return JSON metadata; is this a REST port? (gRPC needs "
            "--protocol grpc)"
        ) from None


def _grpc_inputs(target: Target, timeout: float) -> list[TensorSpec]:
    import grpc

    from servekit.protocols.protos import kserve_v2_pb2 as pb

    with grpc.insecure_channel(target.grpc_address) as channel:
        method = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelMetadata",
            request_serializer=pb.ModelMetadataRequest.SerializeToString,
            response_deserializer=pb.ModelMetadataResponse.FromString,
        )
        request = pb.ModelMetadataRequest(name=target.model, version=target.version)
        try:
            response = method(request, timeout=timeout)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
            raise ValueError(
                f"gRPC ModelMetadata on {target.grpc_address} failed: {code.name}: {details}"
            ) from None
    return [
        TensorSpec(item.name, DataType.from_v2(item.datatype), tuple(item.shape))
        for item in response.inputs
    ]


def random_inputs(
    specs: list[TensorSpec], rows: int, seed: int = 0
) -> dict[str, np.ndarray[Any, Any]]:
    """Make `_POOL_SIZE` requests' worth of random rows for every input."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in specs:
        shape = [size if size >= 0 else 1 for size in spec.shape]
        if shape:
            shape[0] = rows * _POOL_SIZE if spec.shape[0] < 0 else shape[0]
        arrays[spec.name] = _random(rng, spec.datatype, tuple(shape))
    return arrays


def _random(rng: np.random.Generator, datatype: DataType, shape: tuple[int, ...]) -> Any:
    kind = datatype.numpy_dtype.kind
    if datatype.is_bytes:
        flat = np.array([f"text {index}".encode() for index in range(int(np.prod(shape)))], object)
        return flat.reshape(shape)
    if kind == "b":
        return rng.random(shape) < 0.5
    if kind in "iu":
        return rng.integers(0, 10, size=shape).astype(datatype.numpy_dtype)
    return rng.random(shape).astype(datatype.numpy_dtype)


def file_inputs(path: Path, specs: list[TensorSpec]) -> dict[str, np.ndarray[Any, Any]]:
    """Read rows for every input from a .npy, .npz, JSON Lines or Parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        if len(specs) != 1:
            raise ValueError(
                f"{path} contains one array, but the model has {len(specs)} inputs; use .npz"
            )
        arrays = {specs[0].name: load_arrays(path)[0]}
    elif suffix == ".npz":
        arrays = dict(zip(*_named_arrays(path), strict=True))
    elif suffix in (".jsonl", ".ndjson"):
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path} line {number} is not JSON: {exc.msg}") from None
        arrays = {
            spec.name: np.array([row[spec.name] for row in rows])
            for spec in specs
            if rows and all(isinstance(row, dict) and spec.name in row for row in rows)
        }
    elif suffix == ".parquet":
        import pyarrow.parquet as parquet

        table = parquet.read_table(path)
        arrays = {
            spec.name: np.array(table.column(spec.name).to_pylist())
            for spec in specs
            if spec.name in table.column_names
        }
    else:
        raise ValueError(f"unsupported input file {path}: use .npy, .npz, .jsonl or .parquet")
    missing = [spec.name for spec in specs if spec.name not in arrays]
    if missing:
        raise ValueError(f"{path} has no data for input(s) {', '.join(missing)}")
    result = {}
    for spec in specs:
        array = np.asarray(arrays[spec.name])
        rows_shape, expected = array.shape[1:], spec.shape[1:]
        if (
            spec.shape
            and spec.shape[0] < 0
            and (
                len(rows_shape) != len(expected)
                or any(
                    want not in (-1, got) for want, got in zip(expected, rows_shape, strict=True)
                )
            )
        ):
            raise ValueError(
                f"{path}: rows of input {spec.name} have shape {list(rows_shape)}, but the model "
                f"expects {list(expected)} (-1 means any size)"
            )
        if spec.datatype.is_bytes:
            # BYTES tensors hold bytes; text from JSON or Parquet arrives as str.
            encode = np.vectorize(_utf8, otypes=[object])
            result[spec.name] = encode(array) if array.size else array.astype(object)
        else:
            result[spec.name] = array.astype(spec.datatype.numpy_dtype)
    return result


def load_arrays(path: Path) -> list[np.ndarray[Any, Any]]:
    """Read the arrays of a .npy file (one) or an .npz file (in order), refusing pickles.

    NumPy's own message for a file that is not an array suggests allowing pickles, which would
    run code from the file; this raises a ValueError that names the file instead.
    """
    return _named_arrays(path)[1]


def _named_arrays(path: Path) -> tuple[list[str], list[np.ndarray[Any, Any]]]:
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                return list(archive.files), [archive[name] for name in archive.files]
        return [path.stem], [np.load(path, allow_pickle=False)]
    except (ValueError, OSError, EOFError):
        raise ValueError(
            f"{path} is not a NumPy {path.suffix or '.npy'} file of plain arrays; arrays of "
            "Python objects are not read, because loading them runs code from the file"
        ) from None


def _utf8(item: Any) -> bytes:
    return item.encode() if isinstance(item, str) else bytes(item)


def encode_pool(
    target: Target,
    specs: list[TensorSpec],
    arrays: dict[str, np.ndarray[Any, Any]],
    rows: int,
    limit: int = _POOL_SIZE,
) -> list[Payload]:
    """Encode up to `limit` requests of `rows` rows each, in the target's protocol."""
    available = min(len(arrays[spec.name]) for spec in specs)
    if available < rows:
        raise ValueError(f"the inputs have {available} rows, fewer than --rows {rows}")
    payloads: list[Payload] = []
    size = 0
    for index in range(min(limit, max(1, available // rows))):
        start = index * rows
        batch = {spec.name: arrays[spec.name][start : start + rows] for spec in specs}
        payloads.append(encode(target, specs, batch))
        size += len(payloads[-1].body)
        if size > _POOL_BYTES:
            break
    return payloads


def encode(
    target: Target, specs: list[TensorSpec], batch: dict[str, np.ndarray[Any, Any]]
) -> Payload:
    if target.protocol == "tfserving":
        columns = {name: _json_values(array) for name, array in batch.items()}
        return Payload(_dump({"inputs": columns}), (("content-type", "application/json"),))
    if target.protocol == "v2":
        inputs = [
            {
                "name": spec.name,
                "datatype": spec.datatype.v2_name,
                "shape": list(batch[spec.name].shape),
                "data": _json_values(batch[spec.name].ravel()),
            }
            for spec in specs
        ]
        return Payload(_dump({"inputs": inputs}), (("content-type", "application/json"),))
    if target.protocol == "v2-binary":
        return _binary_payload(specs, batch)
    return _grpc_payload(target, specs, batch)


def _dump(document: Any) -> bytes:
    # orjson writes each float32 with the shortest text that reads back the same, as a client
    # library would, instead of the float64 expansion of `tolist()`.
    return orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)


def _json_values(array: np.ndarray[Any, Any]) -> Any:
    """Return the array as orjson writes it: numbers as they are, BYTES as nested strings."""
    if array.dtype != object:
        return np.ascontiguousarray(array)
    texts = np.empty(array.shape, dtype=object)
    texts.ravel()[:] = [item.decode() for item in array.ravel()]
    return texts.tolist()


def _binary_payload(specs: list[TensorSpec], batch: dict[str, np.ndarray[Any, Any]]) -> Payload:
    from servekit.protocols.v2 import encode_raw

    chunks = [encode_raw(batch[spec.name]) for spec in specs]
    inputs = [
        {
            "name": spec.name,
            "datatype": spec.datatype.v2_name,
            "shape": list(batch[spec.name].shape),
            "parameters": {"binary_data_size": len(chunk)},
        }
        for spec, chunk in zip(specs, chunks, strict=True)
    ]
    header = json.dumps({"inputs": inputs, "parameters": {"binary_data_output": True}}).encode()
    headers = (
        ("content-type", "application/octet-stream"),
        ("inference-header-content-length", str(len(header))),
    )
    return Payload(b"".join([header, *chunks]), headers)


def _grpc_payload(
    target: Target, specs: list[TensorSpec], batch: dict[str, np.ndarray[Any, Any]]
) -> Payload:
    from servekit.protocols.protos import kserve_v2_pb2 as pb
    from servekit.protocols.v2 import encode_raw

    message = pb.ModelInferRequest(model_name=target.model, model_version=target.version)
    for spec in specs:
        array = batch[spec.name]
        message.inputs.add(name=spec.name, datatype=spec.datatype.v2_name, shape=array.shape)
        message.raw_input_contents.append(encode_raw(array))
    return Payload(message.SerializeToString())

"""Per-model settings: `servekit.yaml` in a model's base path, over server-wide defaults.

An example, with every key optional::

    version_policy: {latest: 1}  # or {all: {}} or {specific: [1, 2]}
    labels: {stable: 1, canary: 2}
    runtime: onnx                # choose the runtime instead of going by the model files
    instances: 2                 # concurrent executions of each version
    instance_kind: auto          # auto, thread or process (auto: processes for runtimes
                                 # that hold the GIL, such as model.py, when instances > 1)
    intra_op_threads: 1          # runtime threads inside one operator
    batching:
      enabled: true              # on by default when every input's first dimension varies
      execution: auto            # auto, thread or inline: where batches run
      max_batch_size: 32         # rows per call to the runtime
      max_queue_delay_ms: 0      # wait for more rows before running an under-full batch
      max_queue_size: 4096       # rows waiting; beyond this, 429
      allowed_batch_sizes: [8, 16, 32]
      padding:                   # pad these inputs so different lengths share a batch
        tokens: {value: 0, axes: [1]}
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from google.protobuf import text_format
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from servekit.batching.config import BatchingConfig, PadSpec
from servekit.config.protos.batching_parameters_pb2 import BatchingParameters
from servekit.core.options import ModelOptions, ServableOptions
from servekit.repository.layout import ModelSource
from servekit.repository.policy import VersionPolicy
from servekit.runtimes.base import RUNTIME_NAMES

MODEL_CONFIG_FILE = "servekit.yaml"
# BatchingParameters fields that are read but have no servekit equivalent.
_UNSUPPORTED_FIELDS = (
    "thread_pool_name",
    "enable_large_batch_splitting",
    "max_execution_batch_size",
)
logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration file that cannot be read or is invalid."""


class _Padding(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    value: float = 0.0
    axes: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1], min_length=1)


class _Batching(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    enabled: bool | None = None
    execution: Literal["auto", "thread", "inline"] | None = None
    max_batch_size: int | None = Field(None, ge=1)
    max_queue_delay_ms: float | None = Field(None, ge=0)
    max_queue_size: int | None = Field(None, ge=1)
    allowed_batch_sizes: list[Annotated[int, Field(ge=1)]] | None = None
    padding: dict[str, _Padding] | None = None


class _Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    latest: int | None = Field(None, ge=1)
    all: dict[str, Any] | None = None
    specific: list[Annotated[int, Field(ge=0)]] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_kind(self) -> _Policy:
        chosen = [name for name in ("latest", "all", "specific") if getattr(self, name) is not None]
        if len(chosen) != 1:
            raise ValueError("give exactly one of latest, all or specific")
        return self

    def to_policy(self) -> VersionPolicy:
        if self.latest is not None:
            return VersionPolicy("latest", count=self.latest)
        if self.all is not None:
            return VersionPolicy("all")
        return VersionPolicy("specific", versions=tuple(self.specific or ()))


class _ModelFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    version_policy: _Policy | None = None
    labels: dict[Annotated[str, Field(pattern=r"^[a-zA-Z0-9_]+$")], Annotated[int, Field(ge=0)]] = (
        Field(default_factory=dict)
    )
    runtime: Literal[tuple(RUNTIME_NAMES)] | None = None  # type: ignore[valid-type]
    instances: int | None = Field(None, ge=1)
    instance_kind: Literal["auto", "thread", "process"] | None = None
    intra_op_threads: int | None = Field(None, ge=0)
    inter_op_threads: int | None = Field(None, ge=0)
    batching: _Batching | None = None


def load_model_options(source: ModelSource, defaults: ServableOptions) -> ModelOptions:
    """Read `servekit.yaml` from the model's base path, if present, over `defaults`.

    A source loaded through the management API with a config override uses that JSON text in
    place of the file. Raises ConfigError with a readable reason when either is invalid.
    """
    path = source.base_path / MODEL_CONFIG_FILE
    if source.override is None and not path.is_file():
        return _from_source(ModelOptions(defaults), source)
    try:
        text = source.override if source.override is not None else path.read_text()
        document = yaml.safe_load(text) or {}
        parsed = _ModelFile.model_validate(document)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{MODEL_CONFIG_FILE} is not valid YAML{where}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {MODEL_CONFIG_FILE}: {exc}") from None
    policy = parsed.version_policy.to_policy() if parsed.version_policy else VersionPolicy()
    options = ModelOptions(_merge(parsed, defaults), policy, dict(parsed.labels))
    return _from_source(options, source)


def _from_source(options: ModelOptions, source: ModelSource) -> ModelOptions:
    # A model config file's policy and labels win over the model's own servekit.yaml.
    if source.policy is not None:
        options = dataclasses.replace(options, policy=source.policy)
    if source.labels is not None:
        options = dataclasses.replace(options, labels=dict(source.labels))
    return options


def describe_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """Turn pydantic's report into one line: `key.path: problem; ...`."""
    problems = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{prefix}{location}: {message}" if location else message)
    return "; ".join(problems)


def _merge(parsed: _ModelFile, defaults: ServableOptions) -> ServableOptions:
    runtime = defaults.runtime
    if parsed.intra_op_threads is not None:
        runtime = dataclasses.replace(runtime, intra_op_threads=parsed.intra_op_threads)
    if parsed.inter_op_threads is not None:
        runtime = dataclasses.replace(runtime, inter_op_threads=parsed.inter_op_threads)
    if parsed.runtime is not None:
        runtime = dataclasses.replace(runtime, runtime=parsed.runtime)
    batching = defaults.batching
    if parsed.batching is not None:
        batching = _merge_batching(parsed.batching, batching)
    return ServableOptions(
        instances=parsed.instances or defaults.instances,
        instance_kind=parsed.instance_kind or defaults.instance_kind,
        runtime=runtime,
        batching=batching,
    )


def _merge_batching(section: _Batching, defaults: BatchingConfig) -> BatchingConfig:
    changes: dict[str, Any] = {
        key: value
        for key, value in section.model_dump(exclude_none=True).items()
        if key in ("enabled", "execution", "max_batch_size", "max_queue_size")
    }
    if section.max_queue_delay_ms is not None:
        changes["max_queue_delay"] = section.max_queue_delay_ms / 1000
    if section.allowed_batch_sizes is not None:
        changes["allowed_batch_sizes"] = tuple(section.allowed_batch_sizes)
    if section.padding is not None:
        changes["padding"] = {
            name: PadSpec(pad.value, tuple(pad.axes)) for name, pad in section.padding.items()
        }
    try:
        return dataclasses.replace(defaults, **changes)
    except ValueError as exc:
        raise ConfigError(f"invalid batching settings: {exc}") from None


def read_batching_parameters(path: Path) -> tuple[BatchingConfig, int | None]:
    """Read TF Serving's text-format BatchingParameters file.

    Returns the batching config and the instance count that `num_batch_threads` sets (None
    when unset). `max_enqueued_batches` becomes a queue of that many full batches, and
    `pad_variable_length_inputs` pads every input along all its non-batch axes.
    """
    message = BatchingParameters()
    try:
        text_format.Parse(path.read_text(), message)
    except (text_format.ParseError, OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read batching parameters file {path}: {exc}") from None
    ignored = [name for name in _UNSUPPORTED_FIELDS if message.HasField(name)]
    if ignored:
        logger.warning(
            "batching parameters file %s: ignoring %s, which servekit does not support",
            path,
            ", ".join(ignored),
        )
    defaults = BatchingConfig()
    max_batch_size = _wrapped(message, "max_batch_size", defaults.max_batch_size)
    changes: dict[str, Any] = {"max_batch_size": max_batch_size}
    if message.HasField("batch_timeout_micros"):
        changes["max_queue_delay"] = message.batch_timeout_micros.value / 1_000_000
    if message.HasField("max_enqueued_batches"):
        changes["max_queue_size"] = message.max_enqueued_batches.value * max_batch_size
    if message.allowed_batch_sizes:
        changes["allowed_batch_sizes"] = tuple(message.allowed_batch_sizes)
    if message.pad_variable_length_inputs:
        changes["pad_all_inputs"] = True
    instances = message.num_batch_threads.value if message.HasField("num_batch_threads") else None
    if instances is not None and instances < 1:
        raise ConfigError(
            f"invalid batching parameters file {path}: num_batch_threads must be >= 1"
        )
    try:
        return dataclasses.replace(defaults, **changes), instances
    except ValueError as exc:
        raise ConfigError(f"invalid batching parameters file {path}: {exc}") from None


def _wrapped(message: BatchingParameters, field: str, default: int) -> int:
    return int(getattr(message, field).value) if message.HasField(field) else default

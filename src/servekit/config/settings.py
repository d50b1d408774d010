"""Server settings: one typed model from which the command line is derived.

Every setting is also read from an environment variable `SERVEKIT_<NAME>` (for example
`SERVEKIT_REST_API_PORT`); a command-line flag wins over the environment.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024


class ServerSettings(BaseSettings):
    """Settings of `servekit serve`; names follow TF Serving's flags where one exists."""

    model_config = SettingsConfigDict(
        env_prefix="SERVEKIT_", extra="forbid", protected_namespaces=()
    )

    rest_api_port: int = Field(
        8501, ge=0, le=65535, description="Port of the REST API; 0 picks a free port."
    )
    rest_api_host: str = Field(
        "127.0.0.1",
        description="Address the REST API binds to; use 0.0.0.0 to accept remote clients.",
    )
    port: int = Field(
        8500,
        ge=0,
        le=65535,
        description="Port of the gRPC API (TF Serving's and KServe V2's services); 0 turns "
        "gRPC off. It binds to the --rest_api_host address.",
    )
    grpc_max_message_bytes: int = Field(
        DEFAULT_MAX_BODY_BYTES,
        gt=0,
        description="Largest gRPC message received or sent, in bytes; larger ones fail with "
        "RESOURCE_EXHAUSTED.",
    )
    model_name: str = Field(
        "default", description="Name clients use for the model at --model_base_path."
    )
    model_base_path: Path | None = Field(
        None, description="Directory of one model's numbered version directories."
    )
    model_repository: Path | None = Field(
        None,
        description="Directory with one folder per model; serves each of them. Without this "
        "or --model_base_path, the built-in example models are served.",
    )
    model_config_file: Path | None = Field(
        None,
        description="TF Serving model config file (text format, or YAML with a .yaml name) "
        "listing the models to serve.",
    )
    model_config_file_poll_wait_seconds: float = Field(
        0.0,
        ge=0,
        description="Seconds between re-reads of --model_config_file; 0 reads it once.",
    )
    tensorflow_intra_op_parallelism: int = Field(
        0, ge=0, description="Threads inside one operator of a runtime; 0 lets it choose."
    )
    tensorflow_inter_op_parallelism: int = Field(
        0, ge=0, description="Operators a runtime runs at once; 0 lets it choose."
    )
    allow_pickle: bool = Field(
        False,
        description="Serve pickled models: scikit-learn's model.joblib or model.pkl, and "
        "PyTorch's model.pt and model.pt2. Loading a pickle runs code from the file, so only "
        "use it for files you trust.",
    )
    runtime_spinning: bool = Field(
        False,
        description="Let ONNX Runtime's idle threads busy-wait for the next call: slightly "
        "faster wake-ups, but a core kept busy that the server's own threads then lack.",
    )
    file_system_poll_wait_seconds: float = Field(
        1.0,
        ge=0,
        description="Seconds between scans of the model base paths for new or removed "
        "versions; 0 scans once at start.",
    )
    max_num_load_retries: int = Field(
        5, ge=0, description="Times a version that failed to load is tried again."
    )
    load_retry_interval_micros: int = Field(
        60_000_000, ge=0, description="Time between load retries, in microseconds."
    )
    enable_model_management: bool = Field(
        True,
        description="Serve the V2 repository API (index, load, unload) on the REST port.",
    )
    model_management_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Serve the management API only on this port (0 picks one) instead of "
        "the REST port.",
    )
    model_management_host: str = Field(
        "127.0.0.1", description="Address the separate management port binds to."
    )
    rest_api_timeout_in_ms: int = Field(
        30000,
        gt=0,
        description="Time allowed for an inference request, in milliseconds; past it, 504. "
        "A request may ask for less with the X-Request-Timeout-Ms header.",
    )
    workers: int = Field(
        1, ge=1, description="Server processes sharing the REST port (SO_REUSEPORT)."
    )
    instances: int = Field(
        1,
        ge=1,
        description="Concurrent executions of each model version, each in its own thread; "
        "servekit.yaml may set it per model.",
    )
    enable_batching: bool = Field(
        True,
        description="Merge concurrent requests into batches for models whose inputs all have "
        "a variable first dimension.",
    )
    batching_parameters_file: Path | None = Field(
        None,
        description="TF Serving text-format BatchingParameters file with the batching "
        "defaults of every model.",
    )
    max_request_body_bytes: int = Field(
        DEFAULT_MAX_BODY_BYTES,
        gt=0,
        description="Largest request body accepted, in bytes; larger ones get 413.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Lowest level of log lines written to stderr."
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="Log line format: plain text, or one JSON object per line."
    )
    access_log: bool = Field(
        False, description="Log one line per HTTP request with its status, time and request id."
    )

    @field_validator("port", "rest_api_port", "model_management_port", mode="before")
    @classmethod
    def _skip_service_links(cls, value: Any, info: ValidationInfo) -> Any:
        """Ignore Kubernetes service links, such as SERVEKIT_PORT=tcp://10.0.0.1:8501.

        Kubernetes sets `<SERVICE>_PORT` in every pod of a namespace, so a Service named
        `servekit` would otherwise set the gRPC port to an address.
        """
        if isinstance(value, str) and value.startswith(("tcp://", "udp://")):
            return cls.model_fields[info.field_name or ""].default
        return value

    @model_validator(mode="after")
    def _check_model_source(self) -> ServerSettings:
        given = [
            flag
            for flag, value in (
                ("--model_base_path", self.model_base_path),
                ("--model_repository", self.model_repository),
                ("--model_config_file", self.model_config_file),
            )
            if value is not None
        ]
        if len(given) > 1:
            raise ValueError(f"give only one of {', '.join(given)}")
        if self.model_config_file is not None and not self.model_config_file.is_file():
            raise ValueError(f"model config file {self.model_config_file} does not exist")
        for path in (self.model_base_path, self.model_repository):
            if path is not None and not path.is_dir():
                raise ValueError(f"model directory {path} does not exist or is not a directory")
        if self.port != 0 and self.port == self.rest_api_port:
            raise ValueError(f"--port and --rest_api_port must differ (both are {self.port})")
        batching_file = self.batching_parameters_file
        if batching_file is not None and not batching_file.is_file():
            raise ValueError(f"batching parameters file {batching_file} does not exist")
        return self


# TF Serving's container image serves MODEL_BASE_PATH/MODEL_NAME as MODEL_NAME.
_SOURCE_SETTINGS = ("model_base_path", "model_repository", "model_config_file")
_TF_SERVING_BASE_PATH = "/models"


def tf_serving_container_settings(
    given: dict[str, Any], environ: Mapping[str, str]
) -> dict[str, Any]:
    """Return `given` with TF Serving's container variables applied, when they are set.

    TF Serving's image serves `$MODEL_BASE_PATH/$MODEL_NAME` (MODEL_BASE_PATH defaults to
    /models) under the name `$MODEL_NAME`, so deployments that set those variables switch
    images without changes. They apply when MODEL_NAME is set and no command-line flag names
    the models. They win over SERVEKIT_ variables, because those (such as the image's
    SERVEKIT_MODEL_REPOSITORY) are the image's defaults rather than the deployment's choice.
    """
    name = environ.get("MODEL_NAME")
    if not name or any(key in given for key in _SOURCE_SETTINGS):
        return given
    base = Path(environ.get("MODEL_BASE_PATH") or _TF_SERVING_BASE_PATH)
    # None overrides any SERVEKIT_ variable for the other sources.
    cleared = dict.fromkeys(_SOURCE_SETTINGS)
    return {
        **given,
        **cleared,
        "model_name": given.get("model_name", name),
        "model_base_path": base / name,
    }

"""TF Serving's model config file: the list of models, in text format or the same in YAML.

    model_config_list {
      config {
        name: "ranker"
        base_path: "/models/ranker"
        model_platform: "onnx"
        model_version_policy { specific { versions: 7 versions: 8 } }
        version_labels { key: "stable" value: 7 }
      }
    }

A file ending in `.yaml` or `.yml` contains the same fields as YAML, for example
`model_config_list: {config: [{name: ranker, base_path: /models/ranker}]}`. Relative base paths
are taken from the file's folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format, text_format

from servekit.config.model_config import ConfigError
from servekit.config.protos.model_server_config_pb2 import ModelConfig, ModelServerConfig
from servekit.repository.layout import ModelSource
from servekit.repository.policy import VersionPolicy

_LABEL = re.compile("[a-zA-Z0-9_]+")


def read_model_config_file(path: Path) -> list[ModelSource]:
    """Read the models of a config file; raise ConfigError naming what is wrong."""
    message = ModelServerConfig()
    try:
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            json_format.ParseDict(yaml.safe_load(text) or {}, message)
        else:
            text_format.Parse(text, message)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read model config file {path}: {exc}") from None
    except (text_format.ParseError, json_format.ParseError, yaml.YAMLError) as exc:
        raise ConfigError(f"invalid model config file {path}: {exc}") from None
    sources = [_source(config, path.parent) for config in message.model_config_list.config]
    names = [source.name for source in sources]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"model config file {path} names {', '.join(duplicates)} twice")
    return sources


# Platforms a config entry may name. The runtime is still chosen by each version's files, so
# TF Serving's usual "tensorflow" works for SavedModels as written.
_PLATFORMS = ("", "onnx", "python", "tensorflow", "tflite", "pytorch", "sklearn")


def _source(config: ModelConfig, folder: Path) -> ModelSource:
    if not config.name or not config.base_path:
        raise ConfigError("every config entry needs a name and a base_path")
    if config.model_platform not in _PLATFORMS:
        raise ConfigError(
            f"model {config.name}: model_platform {config.model_platform!r} is not supported; "
            f"use one of {', '.join(sorted(filter(None, _PLATFORMS)))}"
        )
    for label in config.version_labels:
        if not _LABEL.fullmatch(label):
            raise ConfigError(f"model {config.name}: invalid label {label!r}")
    base_path = Path(config.base_path)
    if not base_path.is_absolute():
        base_path = folder / base_path
    labels = tuple(sorted(config.version_labels.items())) or None
    return ModelSource(config.name, base_path, _policy(config), labels)


def _policy(config: ModelConfig) -> VersionPolicy | None:
    policy: Any = config.model_version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice is None:
        return None
    try:
        if choice == "latest":
            return VersionPolicy("latest", count=policy.latest.num_versions or 1)
        if choice == "all":
            return VersionPolicy("all")
        return VersionPolicy("specific", versions=tuple(policy.specific.versions))
    except ValueError as exc:
        raise ConfigError(f"model {config.name}: {exc}") from None

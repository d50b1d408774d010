"""Models and versions on disk.

A model's base path holds one directory per version, named by a decimal integer that fits a
signed 64-bit integer (`1`, `42`, `00000123` is version 123). Everything else is ignored with a
debug log line, except names with a digit in them (`v8`, `0.9`, `-3`, a file named `12`, a
number past 2**63 - 1), which look like a mistaken version and log a warning. Each entry is
reported once per process, so a repeated scan does not repeat the log line.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from servekit.repository.policy import VersionPolicy

logger = logging.getLogger(__name__)

_VERSION_NAME = re.compile(r"[0-9]+")
_INT64_MAX = 2**63 - 1
_reported: set[tuple[Path, str]] = set()


@dataclass(frozen=True, slots=True)
class ModelSource:
    """A model name and the base path that contains its version directories.

    A model config file may also set the version policy and labels, which then take the
    place of those in the model's servekit.yaml.
    """

    name: str
    base_path: Path
    policy: VersionPolicy | None = None
    labels: tuple[tuple[str, int], ...] | None = None
    # servekit.yaml content (JSON is YAML too) given with a management API load.
    override: str | None = None


def sources_in_repository(repository: Path) -> list[ModelSource]:
    """List every model folder directly under a repository directory, sorted by name."""
    if not repository.is_dir():
        raise FileNotFoundError(f"model repository {repository} is not a directory")
    return [
        ModelSource(entry.name, entry)
        for entry in sorted(repository.iterdir())
        if entry.is_dir() and not entry.name.startswith(".")
    ]


def list_versions(base_path: Path) -> dict[int, Path]:
    """Map each version number under `base_path` to its directory."""
    versions: dict[int, Path] = {}
    for entry in sorted(base_path.iterdir()):
        version = _parse_version(entry)
        if version is None:
            continue
        if version in versions:
            _report_once(
                entry,
                logging.WARNING,
                "ignoring %s: version %d is already provided by %s",
                entry,
                version,
                versions[version].name,
            )
            continue
        versions[version] = entry
    return versions


def _parse_version(entry: Path) -> int | None:
    name = entry.name
    if name.startswith("."):
        _report_once(entry, logging.DEBUG, "ignoring hidden entry %s", entry)
        return None
    level = logging.WARNING if any(char.isdigit() for char in name) else logging.DEBUG
    if not _VERSION_NAME.fullmatch(name) or int(name) > _INT64_MAX:
        _report_once(
            entry,
            level,
            "ignoring %s: a version directory name must be a non-negative 64-bit integer",
            entry,
        )
        return None
    if not entry.is_dir():
        _report_once(entry, level, "ignoring %s: it is not a directory", entry)
        return None
    return int(name)


def _report_once(entry: Path, level: int, message: str, *args: object) -> None:
    key = (entry.parent, entry.name)
    if key in _reported:
        return
    _reported.add(key)
    logger.log(level, message, *args)


# A version directory's contents: (relative path, size, modification time in ns) per file.
Fingerprint = tuple[tuple[str, int, int], ...]


def fingerprint(directory: Path) -> Fingerprint:
    """Describe every file under `directory`, so a later scan can tell whether it changed."""
    entries = []
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            stat = path.stat()
            entries.append((str(path.relative_to(directory)), stat.st_size, stat.st_mtime_ns))
    return tuple(entries)

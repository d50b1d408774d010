"""Version policies: which of the versions on disk a model serves."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class VersionPolicy:
    """TF Serving's `model_version_policy`: the latest N versions, all of them, or a list."""

    kind: Literal["latest", "all", "specific"] = "latest"
    # How many of the highest versions `latest` serves.
    count: int = 1
    # The versions `specific` serves.
    versions: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind == "latest" and self.count < 1:
            raise ValueError("latest must serve at least 1 version")
        if self.kind == "specific" and not self.versions:
            raise ValueError("specific needs at least one version")

    def select(self, versions: Iterable[int]) -> set[int]:
        """Return the versions to serve out of those on disk."""
        present = sorted(versions, reverse=True)
        if self.kind == "all":
            return set(present)
        if self.kind == "specific":
            return set(present).intersection(self.versions)
        return set(present[: self.count])

"""A model as the manager tracks it: its servables, labels and load attempts."""

from __future__ import annotations

from dataclasses import dataclass

from servekit.core.servable import Servable, State
from servekit.repository.layout import Fingerprint, ModelSource


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often a version that failed to load is tried again, and how long to wait between."""

    max_retries: int = 5
    interval_seconds: float = 60.0


@dataclass(slots=True)
class Attempts:
    """The failed loads of one version's files: how many, and when the last one was."""

    fingerprint: Fingerprint
    count: int
    last: float


class Model:
    """A named model, its servables by version and its active labels."""

    def __init__(self, source: ModelSource) -> None:
        self.source = source
        self.name = source.name
        self.base_path = source.base_path
        # Replaced whole by the poll thread, never changed in place (see the module doc).
        self.servables: dict[int, Servable] = {}
        self.labels: dict[str, int] = {}
        self.fingerprints: dict[int, Fingerprint] = {}
        self.attempts: dict[int, Attempts] = {}
        self.unreadable = False
        # Set by an explicit unload through the management API; polling then leaves it alone.
        self.disabled = False
        # Labels set through the management API, which win over the configured ones.
        self.label_overrides: dict[str, int] = {}
        # The last settings error logged, and labels already reported as pointing nowhere.
        self.last_error = ""
        self.stray_labels: set[tuple[str, int]] = set()

    def available_versions(self) -> list[int]:
        return sorted(v for v, s in self.servables.items() if s.state is State.AVAILABLE)

    def latest_available(self) -> Servable | None:
        versions = self.available_versions()
        return self.servables[versions[-1]] if versions else None

    def newest(self) -> Servable | None:
        return self.servables[max(self.servables)] if self.servables else None

    def reconfigure(self, source: ModelSource) -> Model:
        """Take new settings for this model; a new base path starts a new model."""
        if source.base_path != self.base_path:
            return Model(source)
        self.source = source
        return self

    def put(self, servable: Servable) -> None:
        self.servables = {**self.servables, servable.version: servable}

"""The ModelManager: owns every servable and resolves requests to one of them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from servekit.batching.batcher import BatcherMetrics
from servekit.core.errors import NotFoundError, shorten
from servekit.core.options import ServableOptions
from servekit.core.servable import Servable, ServableMetrics, State, VersionStatus
from servekit.observability.metrics import Metrics
from servekit.repository.layout import ModelSource, list_versions

logger = logging.getLogger(__name__)


class Model:
    """A named model and its servables, keyed by version number."""

    def __init__(self, source: ModelSource) -> None:
        self.source = source
        self.name = source.name
        self.base_path = source.base_path
        self.servables: dict[int, Servable] = {}

    def latest(self) -> Servable | None:
        """Return the highest-numbered servable, whatever its state."""
        if not self.servables:
            return None
        return self.servables[max(self.servables)]

    def available_versions(self) -> list[int]:
        return sorted(v for v, s in self.servables.items() if s.state is State.AVAILABLE)


class ModelManager:
    """Loads the versions each source calls for and finds the servable for each request.

    The default version policy serves only the highest-numbered version of each model.
    """

    def __init__(
        self,
        sources: Iterable[ModelSource],
        options: Callable[[ModelSource], ServableOptions],
        metrics: Metrics,
    ) -> None:
        self._models = {source.name: Model(source) for source in sources}
        self._options = options
        self._metrics = metrics

    @property
    def model_names(self) -> list[str]:
        return sorted(self._models)

    def knows(self, name: str) -> bool:
        return name in self._models

    def load_all(self) -> None:
        """Load the serving version of every model; blocks until each has loaded or failed."""
        for model in self._models.values():
            self._load_latest(model)

    def unload_all(self) -> None:
        for model in self._models.values():
            for servable in model.servables.values():
                servable.unload()
                self._record_state(servable)

    def resolve(self, name: str, version: int | None) -> Servable:
        """Find the servable for a request; raise NotFoundError with TF Serving's wording."""
        model = self._models.get(name)
        if version is None:
            servable = model.latest() if model else None
            if servable is None:
                raise NotFoundError(f"Servable not found for request: Latest({shorten(name)})")
            return servable
        servable = model.servables.get(version) if model else None
        if servable is None:
            raise NotFoundError(
                f"Servable not found for request: Specific({shorten(name)}, {version})"
            )
        return servable

    def status(self, name: str, version: int | None) -> list[VersionStatus]:
        """Return the status of one version, or of every known version, newest first."""
        model = self._models.get(name)
        if model is None or not model.servables:
            raise NotFoundError(f"Could not find any versions of model {shorten(name)}")
        if version is None:
            return [model.servables[v].status for v in sorted(model.servables, reverse=True)]
        servable = model.servables.get(version)
        if servable is None:
            raise NotFoundError(f"Could not find version {version} of model {shorten(name)}")
        return [servable.status]

    def available_versions(self, name: str) -> list[int]:
        model = self._models.get(name)
        return model.available_versions() if model else []

    def ready(self) -> tuple[bool, str]:
        """Tell whether every model has an available version, with the reason if not."""
        if not self._models:
            return False, "no models are configured"
        for model in self._models.values():
            servable = model.latest()
            if servable is None:
                return False, f"model {model.name} has no versions"
            if servable.state is not State.AVAILABLE:
                return (
                    False,
                    f"model {model.name} version {servable.version} is {servable.state.name}",
                )
        return True, ""

    def _load_latest(self, model: Model) -> None:
        try:
            versions = list_versions(model.base_path)
        except OSError as exc:
            logger.error("cannot list versions of model %s: %s", model.name, exc)
            return
        if not versions:
            logger.warning("model %s has no version directories in %s", model.name, model.base_path)
            return
        version = max(versions)
        metrics = self._servable_metrics(model.name, version)
        try:
            options = self._options(model.source)
        except ValueError as exc:
            servable = Servable(model.name, version, versions[version], ServableOptions(), metrics)
            servable.fail(f"invalid servekit.yaml: {exc}")
            model.servables[version] = servable
            self._record_state(servable)
            return
        servable = Servable(model.name, version, versions[version], options, metrics)
        model.servables[version] = servable
        self._record_state(servable)
        servable.load()
        self._record_state(servable)
        if servable.state is State.AVAILABLE:
            self._metrics.load_duration.labels(model.name, str(version)).set(servable.load_seconds)

    def record_load(self) -> None:
        """Copy each servable's queue depth and in-flight count into their gauges.

        The batchers keep plain counters on the hot path; the gauges are set when metrics are
        read, so they are exact at every scrape and cost nothing per request.
        """
        for model in self._models.values():
            for servable in model.servables.values():
                labels = (model.name, str(servable.version))
                queued, inflight = servable.load_figures()
                self._metrics.queue_rows.labels(*labels).set(queued)
                self._metrics.inflight.labels(*labels).set(inflight)

    def _servable_metrics(self, name: str, version: int) -> ServableMetrics:
        labels = (name, str(version))
        metrics = self._metrics
        batcher = BatcherMetrics(
            queue_seconds=metrics.queue_duration.labels(*labels),
            batch_rows=metrics.batch_size.labels(*labels),
            rejected_full=metrics.rejected.labels(*labels, "queue_full"),
            rejected_deadline=metrics.rejected.labels(*labels, "deadline"),
        )
        return ServableMetrics(metrics.inference_duration.labels(*labels), batcher)

    def _record_state(self, servable: Servable) -> None:
        self._metrics.set_state(servable.model_name, str(servable.version), servable.state.name)

"""The ModelManager: owns every servable, follows the repository, and resolves requests.

`poll` runs off the event loop (in a thread) and is the only writer of a model's servables
and labels. It replaces those mappings whole instead of changing them in place, so request
handlers on the loop always read a consistent mapping without a lock.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from servekit.batching.batcher import BatcherMetrics
from servekit.core.errors import InvalidInputError, NotFoundError, UnavailableError, shorten
from servekit.core.model import Attempts, Model, RetryPolicy
from servekit.core.options import ModelOptions, ServableOptions
from servekit.core.servable import Servable, ServableMetrics, State, VersionStatus
from servekit.observability.metrics import Metrics
from servekit.repository.layout import Fingerprint, ModelSource, fingerprint, list_versions

logger = logging.getLogger(__name__)

# Versions that ended (unloaded or failed) stay listed in the status for this many versions.
_ENDED_KEPT = 10
# Load passes per scan: a failed version lets the next older one load in the same scan.
_MAX_PASSES = 3


class ModelManager:
    """Loads the versions each model's policy calls for and finds the servable for a request."""

    def __init__(
        self,
        sources: Iterable[ModelSource],
        options: Callable[[ModelSource], ModelOptions],
        metrics: Metrics,
        retry: RetryPolicy | None = None,
        discover: Callable[[str], ModelSource | None] | None = None,
    ) -> None:
        self._models = {source.name: Model(source) for source in sources}
        # Finds a model folder that is not loaded yet, for the management API's load.
        self._discover = discover
        self._options = options
        self._metrics = metrics
        self._retry = retry or RetryPolicy()
        # Repository polls and config reloads run on executor threads and may overlap.
        self._sync_lock = threading.RLock()

    @property
    def model_names(self) -> list[str]:
        return sorted(self._models)

    def knows(self, name: str) -> bool:
        return name in self._models

    def set_sources(self, sources: list[ModelSource]) -> None:
        """Make `sources` the complete list of models: add new ones, drop missing ones.

        Runs on the poll thread. New models load at once; a dropped model's versions drain and
        unload.
        """
        with self._sync_lock:
            self._replace_models(sources)
            self.poll()

    def _replace_models(self, sources: list[ModelSource]) -> None:
        current = self._models
        models = {}
        for source in sources:
            model = current.get(source.name)
            if model is None or model.source != source:
                model = Model(source) if model is None else model.reconfigure(source)
            models[source.name] = model
        # A model that is gone, or that now reads another base path, unloads its old versions.
        dropped = [model for name, model in current.items() if models.get(name) is not model]
        self._models = models
        for model in dropped:
            logger.info(
                "model %s at %s is no longer configured; unloading it", model.name, model.base_path
            )
            for servable in model.servables.values():
                self._unload(servable)

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """List every model version for the V2 repository index, as Triton does."""
        entries = []
        for name in sorted(self._models):
            model = self._models[name]
            if not model.servables:
                reason = "unloaded" if model.disabled else "no versions"
                entries.append(
                    {"name": name, "version": "", "state": "UNAVAILABLE", "reason": reason}
                )
            for version in sorted(model.servables):
                servable = model.servables[version]
                ready = servable.state is State.AVAILABLE
                reason = servable.error_message or ("" if ready else servable.state.name)
                entries.append(
                    {
                        "name": name,
                        "version": str(version),
                        "state": "READY" if ready else "UNAVAILABLE",
                        "reason": reason,
                    }
                )
        if ready_only:
            return [entry for entry in entries if entry["state"] == "READY"]
        return entries

    # NOTE: each worker process has its own manager, so with several workers the management
    # API's load, unload and labels change only the worker that receives the request.
    def load_model(self, name: str, override: str | None = None) -> Servable:
        """Load (or reload) a model now; raise if it has no available version afterwards.

        `override` replaces the model's servekit.yaml until the server restarts; an empty
        string goes back to the file. Invalid settings are rejected before anything changes.
        """
        with self._sync_lock:
            model = self._models.get(name)
            source = model.source if model is not None else None
            if source is None:
                source = self._discover(name) if self._discover else None
                if source is None:
                    raise NotFoundError(f"model {shorten(name)} is not in the repository")
            if override is not None:
                source = dataclasses.replace(source, override=override or None)
            try:
                self._options(source)
            except ValueError as exc:
                message = f"invalid settings for model {shorten(name)}: {exc}"
                raise InvalidInputError(message) from None
            previous = model.source if model is not None and not model.disabled else None
            if model is None:
                model = Model(source)
                self._models = {**self._models, name: model}
            model.source = source
            model.disabled = False
            model.attempts = {}
            self._sync(model, initial=True)
            servable = model.latest_available()
            if servable is None:
                newest = model.newest()
                if newest is None:
                    reason = "it has no version directories"
                else:
                    reason = newest.error_message or "no version matches its version policy"
                if previous is not None and previous != source:
                    # Settings that leave nothing to serve are undone, so the model keeps serving.
                    model.source = previous
                    model.attempts = {}
                    self._sync(model, initial=True)
                raise InvalidInputError(f"failed to load model {shorten(name)}: {reason}")
            return servable

    def set_label(self, name: str, label: str, version: int) -> None:
        """Point `label` at an available version until the server restarts."""
        with self._sync_lock:
            model = self._models.get(name)
            if model is None:
                raise NotFoundError(f"model {shorten(name)} is not loaded")
            if version not in model.available_versions():
                raise InvalidInputError(
                    f"version {version} of model {shorten(name)} is not available; a label "
                    "may only point at an available version"
                )
            model.label_overrides = {**model.label_overrides, label: version}
            model.labels = {**model.labels, label: version}
            logger.info("label %s of model %s now points at version %d", label, name, version)

    def unload_model(self, name: str) -> None:
        """Drain and unload every version of a model, and stop polling from reloading it."""
        with self._sync_lock:
            model = self._models.get(name)
            if model is None:
                raise NotFoundError(f"model {shorten(name)} is not loaded")
            model.disabled = True
            model.labels = {}
            for servable in model.servables.values():
                self._unload(servable)

    def load_all(self) -> None:
        """Load what every model serves at start; blocks until each has loaded or failed.

        The first scan is trusted as complete; later scans load a version only once its files
        are unchanged across two scans.
        """
        self.poll(initial=True)

    def poll(self, initial: bool = False) -> None:
        """Scan every base path once and load, swap or unload versions to match."""
        with self._sync_lock:
            for model in self._models.values():
                if model.disabled:
                    continue
                try:
                    self._sync(model, initial)
                except Exception:
                    logger.exception(
                        "failed to update model %s from %s", model.name, model.base_path
                    )

    def unload_all(self) -> None:
        for model in self._models.values():
            for servable in model.servables.values():
                servable.unload()
                self._record_state(servable)

    def resolve(self, name: str, version: int | None) -> Servable:
        """Find the servable for a request; raise with TF Serving's wording if there is none."""
        model = self._models.get(name)
        if model is None:
            if version is None:
                raise NotFoundError(f"Servable not found for request: Latest({shorten(name)})")
            raise NotFoundError(
                f"Servable not found for request: Specific({shorten(name)}, {version})"
            )
        if version is None:
            servable = model.latest_available() or model.newest()
            if servable is None:
                raise NotFoundError(f"Servable not found for request: Latest({shorten(name)})")
            return servable
        servable = model.servables.get(version)
        if servable is None or (servable.state is State.END and not servable.error_message):
            raise NotFoundError(
                f"Servable not found for request: Specific({shorten(name)}, {version})"
            )
        return servable

    def lookup(self, name: str, version: int | None, label: str | None) -> Servable:
        """Resolve a request that names a version, a label, or neither (the latest)."""
        if label is not None:
            return self.resolve_label(name, label)
        return self.resolve(name, version)

    def resolve_label(self, name: str, label: str) -> Servable:
        """Find the servable a label points at; an unknown or inactive label is a 400."""
        model = self._models.get(name)
        if model is None:
            raise NotFoundError(f"Servable not found for request: Latest({shorten(name)})")
        version = model.labels.get(label)
        if version is None:
            raise InvalidInputError(f"Unrecognized servable version label: {shorten(label)}")
        servable = model.servables.get(version)
        if servable is None:
            raise UnavailableError(f"label {label} points at version {version}, which is gone")
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
            if model.latest_available() is not None:
                continue
            servable = model.newest()
            if servable is None:
                return False, f"model {model.name} has no versions"
            return False, f"model {model.name} version {servable.version} is {servable.state.name}"
        return True, ""

    def _sync(self, model: Model, initial: bool) -> None:
        try:
            options = self._options(model.source)
        except ValueError as exc:
            self._fail_newest(model, f"invalid servekit.yaml: {exc}", initial)
            return
        model.last_error = ""
        versions = self._scan(model)
        if versions is None:
            return
        prints = {version: fingerprint(path) for version, path in versions.items()}
        settled = {v for v, p in prints.items() if initial or model.fingerprints.get(v) == p}
        model.fingerprints = prints
        # New versions load first, and only then do removed or unwanted ones go, so the model
        # keeps an available version throughout (a removed version serves from memory). A
        # version that fails to load makes room for the next older one, so the pass repeats.
        for _ in range(_MAX_PASSES):
            wanted = self._wanted(model, versions, options)
            loaded = [
                self._ensure_loaded(model, version, versions[version], prints[version], options)
                for version in sorted(wanted & settled, reverse=True)
            ]
            if not any(result is State.END for result in loaded):
                break
        self._warn_stray_labels(model, options.labels, wanted)
        self._unload_gone(model, versions)
        self._retire_unwanted(model, wanted, options)
        self._apply_labels(model, options.labels)
        self._forget_ended(model)

    def _wanted(self, model: Model, versions: dict[int, Path], options: ModelOptions) -> set[int]:
        """Apply the policy; under `latest: N`, versions that failed to load do not count."""
        policy = options.policy
        if policy.kind != "latest":
            return policy.select(versions)
        failed = {
            version
            for version, servable in model.servables.items()
            if servable.state is State.END and servable.error_message
        }
        wanted: set[int] = set()
        healthy = 0
        for version in sorted(versions, reverse=True):
            if healthy >= policy.count:
                break
            wanted.add(version)
            healthy += version not in failed
        return wanted

    def _scan(self, model: Model) -> dict[int, Path] | None:
        try:
            versions = list_versions(model.base_path)
        except OSError as exc:
            # Storage that is briefly gone or unreadable must not take a serving model down.
            if not model.unreadable:
                logger.warning(
                    "cannot read model %s at %s (%s); the loaded versions keep serving",
                    model.name,
                    model.base_path,
                    exc.strerror or exc,
                )
            model.unreadable = True
            return None
        if model.unreadable:
            logger.info("model %s at %s is readable again", model.name, model.base_path)
            model.unreadable = False
        if not versions and not model.servables:
            logger.warning("model %s has no version directories in %s", model.name, model.base_path)
        return versions

    def _ensure_loaded(
        self,
        model: Model,
        version: int,
        directory: Path,
        prints: Fingerprint,
        options: ModelOptions,
    ) -> State | None:
        """Load one version unless it is loaded or may not be retried yet; return its state."""
        current = model.servables.get(version)
        if current is not None and current.state in (State.AVAILABLE, State.LOADING):
            return None
        if (
            current is not None
            and current.error_message
            and not self._may_retry(model, version, prints)
        ):
            return None
        servable = Servable(
            model.name, version, directory, options.servable, self._servable_metrics(model, version)
        )
        model.put(servable)
        self._record_state(servable)
        servable.load()
        self._record_state(servable)
        if servable.state is State.AVAILABLE:
            model.attempts.pop(version, None)
            self._metrics.load_duration.labels(model.name, str(version)).set(servable.load_seconds)
            return servable.state
        self._metrics.load_failures.labels(model.name).inc()
        previous = model.attempts.get(version)
        count = previous.count + 1 if previous and previous.fingerprint == prints else 1
        model.attempts[version] = Attempts(prints, count, time.monotonic())
        return servable.state

    def _may_retry(self, model: Model, version: int, prints: Fingerprint) -> bool:
        attempts = model.attempts.get(version)
        if attempts is None or attempts.fingerprint != prints:
            return True  # the files changed, so this is a new attempt
        if attempts.count > self._retry.max_retries:
            return False
        return time.monotonic() - attempts.last >= self._retry.interval_seconds

    def _unload_gone(self, model: Model, versions: dict[int, Path]) -> None:
        for version, servable in model.servables.items():
            if version not in versions and servable.state is State.AVAILABLE:
                logger.info("version %d of model %s was removed from disk", version, model.name)
                self._unload(servable)

    def _retire_unwanted(self, model: Model, wanted: set[int], options: ModelOptions) -> None:
        available = model.available_versions()
        serving = [v for v in available if v in wanted]
        # Under `latest: N`, older versions keep serving until N wanted versions are available,
        # so a broken new version never leaves the model without one.
        keep = options.policy.count - len(serving) if options.policy.kind == "latest" else 0
        for version in sorted((v for v in available if v not in wanted), reverse=True):
            if keep > 0:
                keep -= 1
                continue
            self._unload(model.servables[version])

    def _unload(self, servable: Servable) -> None:
        servable.drain_and_unload()
        self._record_state(servable)

    def _warn_stray_labels(self, model: Model, labels: dict[str, int], wanted: set[int]) -> None:
        # A label on a version the policy does not serve can never take effect.
        for label, version in labels.items():
            if version in wanted or (label, version) in model.stray_labels:
                continue
            model.stray_labels.add((label, version))
            logger.warning(
                "label %s of model %s points at version %d, which its version policy does "
                "not serve; the label is not active",
                label,
                model.name,
                version,
            )

    def _apply_labels(self, model: Model, labels: dict[str, int]) -> None:
        # A label takes effect only once its version is available, as in TF Serving.
        labels = {**labels, **model.label_overrides}
        available = set(model.available_versions())
        active = {label: version for label, version in labels.items() if version in available}
        for label in labels.keys() - active.keys():
            logger.debug(
                "label %s of model %s waits for version %d", label, model.name, labels[label]
            )
        model.labels = active

    def _forget_ended(self, model: Model) -> None:
        ended = sorted(
            v for v, s in model.servables.items() if s.state is State.END and not s.error_message
        )
        if len(ended) > _ENDED_KEPT:
            drop = set(ended[: len(ended) - _ENDED_KEPT])
            model.servables = {v: s for v, s in model.servables.items() if v not in drop}

    def _fail_newest(self, model: Model, message: str, initial: bool) -> None:
        if model.servables or not initial:
            # Logged once per distinct problem, since every scan finds it again.
            if model.last_error != message:
                logger.error("model %s: %s; the loaded versions keep serving", model.name, message)
            model.last_error = message
            return
        versions = self._scan(model)
        if not versions:
            return
        version = max(versions)
        servable = Servable(
            model.name,
            version,
            versions[version],
            ServableOptions(),
            self._servable_metrics(model, version),
        )
        servable.fail(message)
        model.put(servable)
        self._record_state(servable)

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

    def _servable_metrics(self, model: Model, version: int) -> ServableMetrics:
        labels = (model.name, str(version))
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

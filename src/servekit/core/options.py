"""Per-servable options: instances, runtime threads and batching."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from servekit.batching.config import BatchingConfig
from servekit.repository.policy import VersionPolicy
from servekit.runtimes.base import RuntimeOptions


@dataclass(frozen=True, slots=True)
class ServableOptions:
    """The execution settings of one model's versions: `servekit.yaml` merged over the flags."""

    # Concurrent executions of the runtime.
    instances: int = 1
    # Where instances run: threads, processes, or "auto" (processes for runtimes that hold the
    # GIL when there is more than one instance, threads otherwise).
    instance_kind: Literal["auto", "thread", "process"] = "auto"
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    batching: BatchingConfig = field(default_factory=BatchingConfig)


@dataclass(frozen=True, slots=True)
class ModelOptions:
    """A model's settings: which versions it serves, its labels and how each version runs."""

    servable: ServableOptions = field(default_factory=ServableOptions)
    policy: VersionPolicy = field(default_factory=VersionPolicy)
    # Label name -> version, such as {"stable": 1, "canary": 2}.
    labels: dict[str, int] = field(default_factory=dict)

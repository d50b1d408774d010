"""Per-servable options: instances, runtime threads and batching."""

from __future__ import annotations

from dataclasses import dataclass, field

from servekit.batching.config import BatchingConfig
from servekit.runtimes.base import RuntimeOptions


@dataclass(frozen=True, slots=True)
class ServableOptions:
    """How one model's versions run: the settings of `servekit.yaml` merged over the flags."""

    # Concurrent executions of the runtime, each in its own thread.
    instances: int = 1
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    batching: BatchingConfig = field(default_factory=BatchingConfig)

"""Batching settings of one servable."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True, slots=True)
class PadSpec:
    """How to pad one input so requests of different lengths can share a batch.

    `axes` are the non-batch axes (1 or more) that may differ between requests. Each of them is
    padded at its end with `value` up to the longest request in the batch.
    """

    value: float = 0.0
    axes: tuple[int, ...] = (1,)


@dataclass(frozen=True, slots=True)
class BatchingConfig:
    """Settings of the batcher in front of one servable.

    With `enabled` false every request runs on its own, but the queue bound, deadlines and
    cancellation still apply.
    """

    enabled: bool = True
    # Where batches run: "thread" (instance threads), "inline" (the event loop thread, for
    # models that compute in microseconds), or "auto" (inline once batches prove fast).
    execution: Literal["auto", "thread", "inline"] = "auto"
    # Rows, not requests, in one call to the runtime.
    max_batch_size: int = 32
    # Seconds a free instance waits for more rows before it runs an under-full batch. The
    # default 0 runs at once, so batching adds no latency when there is nothing to merge;
    # batches still form from what queues up while every instance is busy.
    max_queue_delay: float = 0.0
    # Rows waiting in the queue; past this a request is rejected with 429.
    max_queue_size: int = 4096
    # When set, each batch is padded with extra rows up to the next of these sizes.
    allowed_batch_sizes: tuple[int, ...] = ()
    padding: dict[str, PadSpec] = field(default_factory=dict)
    # Pad every input not named in `padding` with zeros along all its non-batch axes, as TF
    # Serving's pad_variable_length_inputs does.
    pad_all_inputs: bool = False

    def pad_spec(self, name: str, ndim: int) -> PadSpec | None:
        """Return how to pad input `name` (of rank `ndim`), or None to leave it alone."""
        spec = self.padding.get(name)
        if spec is None and self.pad_all_inputs and ndim > 1:
            return PadSpec(0.0, tuple(range(1, ndim)))
        return spec

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if self.max_queue_delay < 0:
            raise ValueError("max_queue_delay must not be negative")
        if self.max_queue_size < 1:
            raise ValueError("max_queue_size must be at least 1")
        sizes = self.allowed_batch_sizes
        if any(size < 1 for size in sizes):
            raise ValueError("allowed_batch_sizes must all be at least 1")
        if sizes and (list(sizes) != sorted(set(sizes)) or sizes[-1] != self.max_batch_size):
            raise ValueError(
                "allowed_batch_sizes must be increasing and end with max_batch_size "
                f"({self.max_batch_size})"
            )

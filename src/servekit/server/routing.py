"""The steps every inference route shares, whatever the protocol."""

from __future__ import annotations

from typing import Any, Protocol

from servekit.core.manager import ModelManager
from servekit.core.servable import Servable
from servekit.core.types import InferenceRequest
from servekit.observability.metrics import UNKNOWN_MODEL
from servekit.protocols.examples import (
    classification_results,
    examples_to_inputs,
    regression_results,
)


class MetricLabels(Protocol):
    """The labels a request is counted under: an HTTP request or a gRPC call."""

    protocol: str
    metric_model: str | None
    metric_version: str


def route_inference(
    request: MetricLabels,
    manager: ModelManager,
    protocol: str,
    name: str,
    version: int | None,
    label: str | None,
) -> Servable:
    """Resolve the servable for an inference request and record its metric labels.

    Routes call this before reading the body, so an unknown model is a 404 whatever the body
    contains, and every later error is counted under the resolved version.
    """
    request.protocol = protocol
    request.metric_model = name if manager.knows(name) else UNKNOWN_MODEL
    servable = manager.lookup(name, version, label)
    request.metric_version = str(servable.version)
    return servable


async def run_examples(
    servable: Servable,
    examples: list[dict[str, Any]],
    context: dict[str, Any],
    method: str,
    deadline: float | None,
) -> Any:
    """Run TF Serving's classify or regress on examples; REST and gRPC both call this."""
    inputs = examples_to_inputs(examples, context, servable.signature)
    response = await servable.infer(InferenceRequest(inputs, deadline=deadline))
    if method == "classify":
        return classification_results(response.outputs, len(examples))
    return regression_results(response.outputs, len(examples))

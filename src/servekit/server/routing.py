"""The step every inference route shares: find the servable and label the request's metrics."""

from __future__ import annotations

from servekit.core.manager import ModelManager
from servekit.core.servable import Servable
from servekit.observability.metrics import UNKNOWN_MODEL
from servekit.server.http import Request


def route_inference(
    request: Request,
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

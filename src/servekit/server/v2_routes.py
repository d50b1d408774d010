"""KServe V2 REST routes under `/v2`.

Paths are case-sensitive, as the protocol specifies. Each path segment is percent-decoded on its
own, so an encoded slash stays inside a model name. Versions are decimal integers.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from servekit.core.errors import InvalidInputError, NotFoundError, shorten
from servekit.core.manager import ModelManager
from servekit.core.servable import Servable, State
from servekit.protocols import v2
from servekit.protocols.jsoncodec import parse_json
from servekit.server.http import Request, Response, json_response, require_method
from servekit.server.routing import route_inference

PROTOCOL = "v2"
_DIGITS = re.compile("[0-9]+")
_LABEL = re.compile("[a-zA-Z0-9_]+")
_REPOSITORY_PATH = re.compile(
    r"/v2/repository/models/(?P<name>[^/]+)/(?P<action>load|unload|labels)"
)
_MODEL_PATH = re.compile(
    r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<action>/ready|/infer)?"
)


class V2Routes:
    def __init__(
        self,
        manager: ModelManager,
        management: bool = True,
        management_port: Callable[[], int | None] = lambda: None,
    ) -> None:
        self._manager = manager
        self._management = management
        self._management_port = management_port

    async def handle(self, request: Request) -> Response:
        path = request.raw_path
        if path in ("/v2", "/v2/"):
            require_method(request, "GET")
            return json_response(v2.server_metadata())
        if path == "/v2/health/live":
            require_method(request, "GET")
            return json_response({"live": True})
        if path == "/v2/health/ready":
            require_method(request, "GET")
            return self._server_ready()
        if path.startswith("/v2/repository/"):
            return await self._repository(request, path)
        match = _MODEL_PATH.fullmatch(path)
        if match is None:
            raise NotFoundError(f"unknown path {shorten(path)}")
        name = unquote(match["name"])
        version_text = match["version"]
        version, label = parse_version(unquote(version_text) if version_text else None)
        action = match["action"]
        if action == "/infer":
            require_method(request, "POST")
            return await self._infer(request, name, version, label)
        require_method(request, "GET")
        if action == "/ready":
            return self._model_ready(name, version, label)
        return self._model_metadata(name, version, label)

    async def _repository(self, request: Request, path: str) -> Response:
        """Serve the repository extension: index, load and unload."""
        if not self._management:
            raise NotFoundError(
                f"unknown path {shorten(path)}; the management API is disabled on this server"
            )
        port = self._management_port()
        if port is not None and request.server_port != port:
            raise NotFoundError(
                f"unknown path {shorten(path)}; the management API is on its own port"
            )
        require_method(request, "POST")
        loop = asyncio.get_running_loop()
        if path == "/v2/repository/index":
            document = parse_json(await request.body() or b"{}")
            ready_only = isinstance(document, dict) and document.get("ready") is True
            return json_response(self._manager.index(ready_only))
        match = _REPOSITORY_PATH.fullmatch(path)
        if match is None:
            raise NotFoundError(f"unknown path {shorten(path)}")
        name = unquote(match["name"])
        action = match["action"]
        if action == "load":
            override = _config_override(parse_json(await request.body() or b"{}"))
            await loop.run_in_executor(None, self._manager.load_model, name, override)
        elif action == "unload":
            await loop.run_in_executor(None, self._manager.unload_model, name)
        else:
            label, version = _label_request(parse_json(await request.body()))
            await loop.run_in_executor(None, self._manager.set_label, name, label, version)
        return json_response({})

    def _server_ready(self) -> Response:
        ready, reason = self._manager.ready()
        if ready:
            return json_response({"ready": True})
        return json_response({"ready": False, "error": reason}, status=503)

    def _model_ready(self, name: str, version: int | None, label: str | None) -> Response:
        servable = self._manager.lookup(name, version, label)
        if servable.state is State.AVAILABLE:
            return json_response({"name": name, "ready": True})
        reason = f"model {name} version {servable.version} is {servable.state.name}"
        return json_response({"name": name, "ready": False, "error": reason}, status=503)

    def _model_metadata(self, name: str, version: int | None, label: str | None) -> Response:
        servable = self._manager.lookup(name, version, label)
        document = v2.encode_model_metadata(
            name,
            self._manager.available_versions(name),
            servable.platform,
            servable.signature,
        )
        return json_response(document)

    async def _infer(
        self, request: Request, name: str, version: int | None, label: str | None
    ) -> Response:
        servable = route_inference(request, self._manager, PROTOCOL, name, version, label)
        with servable.lease():
            return await self._run(request, servable)

    async def _run(self, request: Request, servable: Servable) -> Response:
        request.timeout_from_header()
        body = await request.body()
        request.watch_disconnect()
        inference_request, options = v2.decode_infer(body, request.headers.get(v2.HEADER_LENGTH))
        timeout = v2.timeout_parameter(inference_request.parameters)
        if timeout is not None:
            request.set_timeout(timeout)
        inference_request.deadline = request.deadline
        response = await servable.infer(inference_request)
        payload, json_length = v2.encode_infer(response, inference_request.id, options)
        if json_length is None:
            return Response(200, payload)
        headers = {v2.HEADER_LENGTH: str(json_length)}
        return Response(200, payload, "application/octet-stream", headers)


def _config_override(document: Any) -> str | None:
    """Read Triton's `{"parameters": {"config": "<JSON>"}}` load body, if present."""
    if not isinstance(document, dict):
        raise InvalidInputError("the request body must be a JSON object")
    parameters = document.get("parameters") or {}
    config = parameters.get("config") if isinstance(parameters, dict) else None
    if config is None:
        return None
    if not isinstance(config, str):
        raise InvalidInputError("parameter 'config' must be a string of JSON settings")
    return config


def _label_request(document: Any) -> tuple[str, int]:
    label = document.get("label") if isinstance(document, dict) else None
    version = document.get("version") if isinstance(document, dict) else None
    if not isinstance(label, str) or not _LABEL.fullmatch(label):
        raise InvalidInputError("'label' must be a name of letters, digits and underscores")
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise InvalidInputError("'version' must be a non-negative integer")
    return label, version


def parse_version(text: str | None) -> tuple[int | None, str | None]:
    """Read a V2 version string: a version number, or a label such as `stable`."""
    if text is None:
        return None, None
    if _DIGITS.fullmatch(text):
        return int(text), None
    if _LABEL.fullmatch(text):
        return None, text
    raise InvalidInputError(
        f"invalid version {shorten(text)!r}: a version is a non-negative integer or a label "
        "of letters, digits and underscores"
    )

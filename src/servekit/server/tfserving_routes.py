"""TF Serving REST routes: `/v1/models/NAME[/versions/N | /labels/L][:VERB | /metadata]`.

Matching follows TF Serving: the fixed words are case-insensitive, a version is decimal
digits only, and anything else under `/v1/` is a 400 `Malformed request`. A percent-encoded
colon (`%3Apredict`) is decoded before matching, because some HTTP clients encode `:` in
paths. A percent-encoded slash is decoded only after matching, so `%2F` stays part of the model
name and never acts as a path separator.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from servekit.core.errors import InvalidInputError, shorten
from servekit.core.manager import ModelManager
from servekit.core.servable import Servable
from servekit.protocols import tfserving
from servekit.protocols.jsoncodec import parse_json
from servekit.server.http import Request, Response, json_response
from servekit.server.routing import route_inference, run_examples

PROTOCOL = "tfserving"
_PATH = re.compile(
    r"/v1/models/(?P<name>[^/:]+)"
    r"(?:/versions/(?P<version>[0-9]+)|/labels/(?P<label>[^/:]+))?"
    r"(?::(?P<verb>[^/:]+)|(?P<metadata>/metadata))?",
    re.IGNORECASE,
)
_ENCODED_COLON = re.compile("%3a", re.IGNORECASE)


class TFServingRoutes:
    def __init__(self, manager: ModelManager) -> None:
        self._manager = manager

    async def handle(self, request: Request) -> Response:
        path = _ENCODED_COLON.sub(":", request.raw_path)
        match = _PATH.fullmatch(path)
        if match is None:
            if path.rstrip("/").lower() == "/v1/models" and not path.endswith("/"):
                raise InvalidInputError("Missing model name in request.")
            raise self._malformed(request)
        name = unquote(match["name"])
        version = int(match["version"]) if match["version"] is not None else None
        label = unquote(match["label"]) if match["label"] is not None else None
        verb = match["verb"].lower() if match["verb"] is not None else None
        if verb is None:
            if request.method != "GET":
                raise self._malformed(request)
            if match["metadata"] is not None:
                return self._metadata(name, version, label)
            if label is not None:
                # The status of a label is the status of the one version it points at.
                version = self._manager.resolve_label(name, label).version
            return json_response(tfserving.encode_status(self._manager.status(name, version)))
        if request.method != "POST" or verb not in ("predict", "classify", "regress"):
            raise self._malformed(request)
        if verb != "predict":
            return await self._examples(request, name, version, label, verb)
        return await self._predict(request, name, version, label)

    async def _examples(
        self, request: Request, name: str, version: int | None, label: str | None, verb: str
    ) -> Response:
        servable = route_inference(request, self._manager, PROTOCOL, name, version, label)
        with servable.lease():
            request.timeout_from_header()
            body = tfserving.parse_predict_body(parse_json(await request.body()))
            request.watch_disconnect()
            tfserving.check_signature_name(body.signature_name)
            examples, context = tfserving.decode_examples(body, verb)
            results = await run_examples(servable, examples, context, verb, request.deadline)
        return json_response({"results": results})

    async def _predict(
        self, request: Request, name: str, version: int | None, label: str | None
    ) -> Response:
        servable = route_inference(request, self._manager, PROTOCOL, name, version, label)
        with servable.lease():
            return await self._run(request, servable)

    async def _run(self, request: Request, servable: Servable) -> Response:
        request.timeout_from_header()
        body = tfserving.parse_predict_body(parse_json(await request.body()))
        request.watch_disconnect()
        tfserving.check_signature_name(body.signature_name)
        inference_request, row_format = tfserving.decode_predict(body, servable.signature)
        inference_request.deadline = request.deadline
        response = await servable.infer(inference_request)
        return json_response(tfserving.encode_predict(response, row_format))

    def _metadata(self, name: str, version: int | None, label: str | None) -> Response:
        servable = self._manager.lookup(name, version, label)
        document = tfserving.encode_metadata(name, servable.version, servable.signature)
        return json_response(document)

    @staticmethod
    def _malformed(request: Request) -> InvalidInputError:
        return InvalidInputError(f"Malformed request: {request.method} {shorten(request.raw_path)}")

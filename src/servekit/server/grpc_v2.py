"""KServe V2 gRPC service (`inference.GRPCInferenceService`).

Versions are strings as in the REST API: a version number, a label, or empty for the version the
server chooses. ModelReady returns `ready: false` for an unknown model or version, as Triton
does, so `tritonclient.grpc`'s `is_model_ready` returns False instead of raising.
The repository methods (index, load, unload) are served when the management API is on and has
no port of its own. Otherwise calls to them fail with UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc

from servekit.core.errors import InvalidInputError, NotFoundError, shorten
from servekit.core.manager import ModelManager
from servekit.core.servable import State
from servekit.protocols import v2, v2_grpc
from servekit.protocols.protos import kserve_v2_pb2 as pb
from servekit.server.grpc_server import PROTOCOL, CallRunner, GrpcCall
from servekit.server.routing import route_inference
from servekit.server.v2_routes import parse_version

SERVICE = "inference.GRPCInferenceService"


class V2GrpcService:
    def __init__(self, manager: ModelManager, management: bool) -> None:
        self._manager = manager
        self._management = management

    def services(self, runner: CallRunner) -> dict[str, dict[str, grpc.RpcMethodHandler[Any, Any]]]:
        """The service's methods, keyed by service and method name, for the gRPC server."""
        table: dict[str, tuple[Any, Any]] = {
            "ServerLive": (self.server_live, pb.ServerLiveRequest),
            "ServerReady": (self.server_ready, pb.ServerReadyRequest),
            "ModelReady": (self.model_ready, pb.ModelReadyRequest),
            "ServerMetadata": (self.server_metadata, pb.ServerMetadataRequest),
            "ModelMetadata": (self.model_metadata, pb.ModelMetadataRequest),
            "ModelInfer": (self.model_infer, pb.ModelInferRequest),
        }
        if self._management:
            table["RepositoryIndex"] = (self.repository_index, pb.RepositoryIndexRequest)
            table["RepositoryModelLoad"] = (self.repository_load, pb.RepositoryModelLoadRequest)
            table["RepositoryModelUnload"] = (
                self.repository_unload,
                pb.RepositoryModelUnloadRequest,
            )
        methods = {
            name: runner.unary(name, handler, request_type)
            for name, (handler, request_type) in table.items()
        }
        return {SERVICE: methods}

    async def server_live(self, request: pb.ServerLiveRequest, call: GrpcCall) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: pb.ServerReadyRequest, call: GrpcCall) -> Any:
        return pb.ServerReadyResponse(ready=self._manager.ready()[0])

    async def model_ready(self, request: pb.ModelReadyRequest, call: GrpcCall) -> Any:
        version, label = parse_version(request.version or None)
        try:
            servable = self._manager.lookup(request.name, version, label)
        except (NotFoundError, InvalidInputError):
            # An unknown model, version or label is simply not ready.
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=servable.state is State.AVAILABLE)

    async def server_metadata(self, request: pb.ServerMetadataRequest, call: GrpcCall) -> Any:
        return pb.ServerMetadataResponse(**v2.server_metadata())

    async def model_metadata(self, request: pb.ModelMetadataRequest, call: GrpcCall) -> Any:
        version, label = parse_version(request.version or None)
        servable = self._manager.lookup(request.name, version, label)
        return pb.ModelMetadataResponse(
            name=request.name,
            versions=[str(number) for number in self._manager.available_versions(request.name)],
            platform=servable.platform,
            inputs=v2_grpc.tensor_metadata(servable.signature.inputs),
            outputs=v2_grpc.tensor_metadata(servable.signature.outputs),
        )

    async def model_infer(self, request: pb.ModelInferRequest, call: GrpcCall) -> Any:
        version, label = parse_version(request.model_version or None)
        servable = route_inference(
            call, self._manager, PROTOCOL, request.model_name, version, label
        )
        with servable.lease():
            inference, raw = v2_grpc.decode_infer(request)
            timeout = v2.timeout_parameter(inference.parameters)
            if timeout is not None:
                call.deadline = min(call.deadline or float("inf"), time.monotonic() + timeout)
            inference.deadline = call.deadline
            response = await servable.infer(inference)
        return v2_grpc.encode_infer(response, inference.id, raw)

    async def repository_index(self, request: pb.RepositoryIndexRequest, call: GrpcCall) -> Any:
        _check_repository(request.repository_name)
        entries = self._manager.index(request.ready)
        return pb.RepositoryIndexResponse(
            models=[pb.RepositoryIndexResponse.ModelIndex(**entry) for entry in entries]
        )

    async def repository_load(self, request: pb.RepositoryModelLoadRequest, call: GrpcCall) -> Any:
        _check_repository(request.repository_name)
        parameters = v2_grpc.decode_parameters(request.parameters)
        files = sorted(key for key in parameters if key.startswith("file:"))
        if files:
            raise InvalidInputError(
                f"file overrides ({shorten(files[0])}) are not supported; copy the files into "
                "the model repository instead"
            )
        override = parameters.get("config")
        if override is not None and not isinstance(override, str):
            raise InvalidInputError("parameter 'config' must be a string of JSON settings")
        await _off_loop(self._manager.load_model, request.model_name, override)
        return pb.RepositoryModelLoadResponse()

    async def repository_unload(
        self, request: pb.RepositoryModelUnloadRequest, call: GrpcCall
    ) -> Any:
        _check_repository(request.repository_name)
        await _off_loop(self._manager.unload_model, request.model_name)
        return pb.RepositoryModelUnloadResponse()


def _check_repository(name: str) -> None:
    # servekit serves one repository, which has no name; Triton names its repositories.
    if name:
        raise NotFoundError(f"unknown repository {name!r}; leave repository_name empty")


async def _off_loop(function: Any, *args: Any) -> None:
    # Loading and unloading block on files and runtimes, so they run in the default executor.
    await asyncio.get_running_loop().run_in_executor(None, function, *args)

"""TF Serving's gRPC services: PredictionService and ModelService.

The model comes from the request's ModelSpec: a version number, a version label, or neither for
the highest available version. Classify and Regress run the same code as the REST `:classify`
and `:regress` verbs.
"""

from __future__ import annotations

from typing import Any

import grpc

from servekit.core.manager import ModelManager
from servekit.protocols import tfserving_grpc
from servekit.protocols.protos import tensorflow_serving_pb2 as pb
from servekit.protocols.tfserving import check_signature_name
from servekit.server.grpc_server import PROTOCOL, CallRunner, GrpcCall
from servekit.server.routing import route_inference, run_examples

PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"


class TFServingGrpcService:
    def __init__(self, manager: ModelManager, max_message_bytes: int) -> None:
        self._manager = manager
        self._max_message_bytes = max_message_bytes

    def services(self, runner: CallRunner) -> dict[str, dict[str, grpc.RpcMethodHandler[Any, Any]]]:
        """Both services' methods, keyed by service and method name, for the gRPC server."""
        return {
            PREDICTION_SERVICE: {
                "Predict": runner.unary("Predict", self.predict, pb.PredictRequest),
                "Classify": runner.unary("Classify", self.classify, pb.ClassificationRequest),
                "Regress": runner.unary("Regress", self.regress, pb.RegressionRequest),
                "GetModelMetadata": runner.unary(
                    "GetModelMetadata", self.get_model_metadata, pb.GetModelMetadataRequest
                ),
            },
            MODEL_SERVICE: {
                "GetModelStatus": runner.unary(
                    "GetModelStatus", self.get_model_status, pb.GetModelStatusRequest
                ),
            },
        }

    async def predict(self, request: pb.PredictRequest, call: GrpcCall) -> Any:
        name, version, label = tfserving_grpc.model_target(request.model_spec)
        servable = route_inference(call, self._manager, PROTOCOL, name, version, label)
        signature = tfserving_grpc.signature_name(request.model_spec)
        with servable.lease():
            check_signature_name(signature)
            inference = tfserving_grpc.decode_predict(request, self._max_message_bytes)
            inference.deadline = call.deadline
            response = await servable.infer(inference)
        return tfserving_grpc.encode_predict(response, signature)

    async def classify(self, request: pb.ClassificationRequest, call: GrpcCall) -> Any:
        results, spec = await self._examples(request, call, "classify")
        return tfserving_grpc.encode_classification(results, spec)

    async def regress(self, request: pb.RegressionRequest, call: GrpcCall) -> Any:
        results, spec = await self._examples(request, call, "regress")
        return tfserving_grpc.encode_regression(results, spec)

    async def _examples(
        self, request: pb.ClassificationRequest | pb.RegressionRequest, call: GrpcCall, method: str
    ) -> tuple[Any, pb.ModelSpec]:
        name, version, label = tfserving_grpc.model_target(request.model_spec)
        servable = route_inference(call, self._manager, PROTOCOL, name, version, label)
        signature = tfserving_grpc.signature_name(request.model_spec)
        with servable.lease():
            check_signature_name(signature)
            examples, context = tfserving_grpc.decode_examples(request.input)
            results = await run_examples(servable, examples, context, method, call.deadline)
        return results, tfserving_grpc.effective_spec(name, servable.version, signature)

    async def get_model_metadata(self, request: pb.GetModelMetadataRequest, call: GrpcCall) -> Any:
        name, version, label = tfserving_grpc.model_target(request.model_spec)
        servable = self._manager.lookup(name, version, label)
        tfserving_grpc.check_metadata_fields(list(request.metadata_field))
        return tfserving_grpc.encode_metadata(name, servable.version, servable.signature)

    async def get_model_status(self, request: pb.GetModelStatusRequest, call: GrpcCall) -> Any:
        name, version, label = tfserving_grpc.model_target(request.model_spec)
        if label is not None:
            # The status of a label is the status of the one version it points at.
            version = self._manager.resolve_label(name, label).version
        return tfserving_grpc.encode_status(self._manager.status(name, version))

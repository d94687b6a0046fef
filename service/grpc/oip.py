"""The Open Inference Protocol over gRPC: inference.GRPCInferenceService.

Each method converts its message and calls the data plane; the rules both OIP transports
share are in propserve.service.oip. ModelInfer takes its input in ``contents`` (typed) or
in ``raw_input_contents``, and always answers in ``raw_output_contents``, the form
tritonclient reads. Health and metadata are open (no token), as propserve's own health is;
the rest runs in the data plane's call context like propserve.v1's methods.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np
from numpy.typing import NDArray

from propserve import wire
from propserve.oip import open_inference_pb2 as pb
from propserve.service import oip, tensors
from propserve.service.dataplane import DataPlane
from propserve.service.errors import InvalidArgument, code_of
from propserve.service.grpc.server import Undecodable, tolerant
from propserve.service.grpc.servicer import Context, abort, unary

Request = TypeVar("Request")
Response = TypeVar("Response")
Method = Callable[[Any, Request, Context], Awaitable[Response]]

#: Typed contents' fields by input datatype.
_CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents"}


def _open(operation: str) -> Callable[[Method[Request, Response]], Method[Request, Response]]:
    """A method anyone may call (health, metadata): counted, not authorised."""

    def wrap(method: Method[Request, Response]) -> Method[Request, Response]:
        @functools.wraps(method)
        async def handler(self: InferenceService, request: Request, context: Context) -> Response:
            start = time.perf_counter()
            code = "ok"
            try:
                if isinstance(request, Undecodable):
                    raise InvalidArgument(request.reason)
                return await method(self, request, context)
            except Exception as exc:
                code = code_of(exc).name
                await abort(context, exc, None)
            finally:
                seconds = time.perf_counter() - start
                self.plane.metrics.observe(
                    operation, "grpc", code, seconds, protocol="oip", api=False
                )

        return handler

    return wrap


class InferenceService:
    """inference.GRPCInferenceService's methods (registered by :func:`add_inference_service`)."""

    def __init__(self, plane: DataPlane, *, ready: Callable[[], bool], version: str) -> None:
        self.plane = plane
        self.ready = ready
        self.version = version

    @_open("ServerLive")
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Context
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @_open("ServerReady")
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Context
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.ready())

    @_open("ModelReady")
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Context
    ) -> pb.ModelReadyResponse:
        ready = await oip.model_ready(self.plane, request.name, request.version)
        return pb.ModelReadyResponse(ready=self.ready() and ready)

    @_open("ServerMetadata")
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=oip.SERVER_NAME, version=self.version, extensions=oip.EXTENSIONS
        )

    @_open("ModelMetadata")
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        meta = await oip.model_metadata(self.plane, request.name, request.version)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]],
            properties=meta["properties"],
        )

    @unary("ModelInfer", protocol="oip")
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Context
    ) -> pb.ModelInferResponse:
        x = infer_input(request, self.plane.max_elements)
        result = await oip.infer(self.plane, request.model_name, request.model_version, x)
        outputs = result.outputs
        response = pb.ModelInferResponse(
            model_name=request.model_name,
            model_version=oip.answered_version(result),
            id=request.id,
            raw_output_contents=[outputs.astype(outputs.dtype.newbyteorder("<")).tobytes()],
        )
        response.parameters["step"].int64_param = result.step
        response.outputs.add(
            name=oip.OUTPUT, datatype=oip.datatype(outputs.dtype), shape=outputs.shape
        )
        return response

    @unary("RepositoryIndex", protocol="oip")
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Context
    ) -> pb.RepositoryIndexResponse:
        index = await oip.repository_index(self.plane, request.ready)
        entry = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(models=[entry(**e) for e in index])

    @unary("RepositoryModelLoad", protocol="oip")
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        await self.plane.load_model(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @unary("RepositoryModelUnload", protocol="oip")
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        await self.plane.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()


def infer_input(request: pb.ModelInferRequest, max_elements: int) -> NDArray[Any]:
    """The request's one input as an array, from ``raw_input_contents`` or ``contents``."""
    oip.check_inputs_count(len(request.inputs))
    oip.check_outputs([output.name for output in request.outputs])
    tensor = request.inputs[0]
    shape = list(tensor.shape)
    dtype = oip.check_input(tensor.name, tensor.datatype, shape)
    try:
        if request.raw_input_contents:
            if len(request.raw_input_contents) != 1:
                raise InvalidArgument(
                    f"{len(request.raw_input_contents)} raw input contents for one input"
                )
            if tensor.HasField("contents"):
                raise InvalidArgument("the input has both contents and raw_input_contents")
            return tensors.from_bytes(shape, dtype, request.raw_input_contents[0], max_elements)
        field = _CONTENTS[tensor.datatype]
        others = [f.name for f, _ in tensor.contents.ListFields() if f.name != field]
        if others:
            raise InvalidArgument(f"{tensor.datatype} data goes in {field}, not {others[0]}")
        values = getattr(tensor.contents, field)
        dims = tensors.check_shape(shape, max_elements)
        if len(values) != int(np.prod(dims)):
            raise InvalidArgument(
                f"{field} has {len(values)} values; shape {shape} needs {int(np.prod(dims))}"
            )
        return np.asarray(values, dtype=wire.DTYPES[dtype]).reshape(dims)
    except InvalidArgument as exc:
        raise InvalidArgument(f"input {tensor.name!r}: {exc.message}") from None


#: (method, request message, response message) of every method served.
_METHODS: tuple[tuple[str, Any, Any], ...] = (
    ("ServerLive", pb.ServerLiveRequest, pb.ServerLiveResponse),
    ("ServerReady", pb.ServerReadyRequest, pb.ServerReadyResponse),
    ("ModelReady", pb.ModelReadyRequest, pb.ModelReadyResponse),
    ("ServerMetadata", pb.ServerMetadataRequest, pb.ServerMetadataResponse),
    ("ModelMetadata", pb.ModelMetadataRequest, pb.ModelMetadataResponse),
    ("ModelInfer", pb.ModelInferRequest, pb.ModelInferResponse),
    ("RepositoryIndex", pb.RepositoryIndexRequest, pb.RepositoryIndexResponse),
    ("RepositoryModelLoad", pb.RepositoryModelLoadRequest, pb.RepositoryModelLoadResponse),
    ("RepositoryModelUnload", pb.RepositoryModelUnloadRequest, pb.RepositoryModelUnloadResponse),
)
METHODS = tuple(name for name, _, _ in _METHODS)


def add_inference_service(server: grpc.aio.Server, service: InferenceService) -> None:
    """Serve ``service`` as inference.GRPCInferenceService on ``server``."""
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(service, name),
            request_deserializer=tolerant(
                request.FromString, f"inference.{request.DESCRIPTOR.name}"
            ),
            response_serializer=response.SerializeToString,
        )
        for name, request, response in _METHODS
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(oip.GRPC_SERVICE, handlers),)
    )
    server.add_registered_method_handlers(oip.GRPC_SERVICE, handlers)

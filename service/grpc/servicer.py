"""propserve.v1.ModelService over gRPC: each method converts its message, calls the data
plane inside the call context, and converts the answer back. Errors abort the call with the
wire code's status and its trailers (error-code, x-request-id, retry-after-ms)."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, Protocol, TypeAlias, TypeVar

import grpc

from propserve import wire
from propserve.service.calls import Call, internal_message
from propserve.service.dataplane import Batch, DataPlane
from propserve.service.errors import (
    InvalidArgument,
    PropserveError,
    ResourceExhausted,
    code_of,
)
from propserve.service.grpc import convert
from propserve.service.grpc.server import Undecodable
from propserve.v1 import model_service_pb2 as pb
from propserve.v1 import model_service_pb2_grpc as pb_grpc

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Request = TypeVar("Request")
Response = TypeVar("Response")
Method = Callable[[Any, Request, Context], Awaitable[Response]]


def call_context(
    plane: DataPlane, operation: str, context: Context, *, protocol: str = "propserve"
) -> Call:
    """The data plane's call context for this call, from its metadata."""
    request_id = authorization = None
    for key, value in context.invocation_metadata() or ():
        if key == wire.REQUEST_ID_KEY and request_id is None and isinstance(value, str):
            request_id = value
        elif key == "authorization" and authorization is None and isinstance(value, str):
            authorization = value
    return plane.call(
        operation, "grpc", request_id=request_id, authorization=authorization, protocol=protocol
    )


async def abort(context: Context, exc: BaseException, call: Call | None) -> NoReturn:
    """End the call with ``exc``'s wire code (raises)."""
    code = code_of(exc)
    trailers: list[tuple[str, str]] = [(wire.ERROR_CODE_KEY, code.name)]
    if call is not None:
        trailers.append((wire.REQUEST_ID_KEY, call.request_id))
    if code is wire.TOO_BUSY:
        trailers.append((wire.RETRY_AFTER_MS_KEY, str(wire.RETRY_AFTER_MS)))
    context.set_trailing_metadata(tuple(trailers))
    message = (
        exc.message
        if isinstance(exc, PropserveError)
        else (internal_message(call) if call else "internal error")
    )
    await context.abort(grpc.StatusCode[code.grpc], message)
    raise AssertionError("unreachable")  # pragma: no cover - abort raises


class Served(Protocol):
    """A servicer: its methods call this data plane."""

    plane: DataPlane


def unary(
    operation: str, *, protocol: str = "propserve"
) -> Callable[[Method[Request, Response]], Method[Request, Response]]:
    """A unary method run in the data plane's call context."""

    def wrap(method: Method[Request, Response]) -> Method[Request, Response]:
        @functools.wraps(method)
        async def handler(self: Served, request: Request, context: Context) -> Response:
            call = None
            try:
                call = call_context(self.plane, operation, context, protocol=protocol)
                with call:
                    if isinstance(request, Undecodable):
                        raise InvalidArgument(request.reason)
                    return await method(self, request, context)
            except Exception as exc:
                await abort(context, exc, call)

        return handler

    return wrap


StreamMethod = Callable[[Any, Request, Context], AsyncIterator[Response]]


def server_stream(
    operation: str,
) -> Callable[[StreamMethod[Request, Response]], StreamMethod[Request, Response]]:
    """A server-streaming method run in the data plane's call context: a failure before or
    between its replies ends the stream with the wire code's status."""

    def wrap(method: StreamMethod[Request, Response]) -> StreamMethod[Request, Response]:
        @functools.wraps(method)
        async def handler(
            self: Served, request: Request, context: Context
        ) -> AsyncIterator[Response]:
            call = None
            try:
                call = call_context(self.plane, operation, context)
                with call:
                    if isinstance(request, Undecodable):
                        raise InvalidArgument(request.reason)
                    async for reply in method(self, request, context):
                        yield reply
            except Exception as exc:
                await abort(context, exc, call)

        return handler

    return wrap


#: The most bytes of a file in one WeightsChunk.
EXPORT_CHUNK = 1 << 20


class ModelService(pb_grpc.ModelServiceServicer):
    """propserve.v1.ModelService."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    @unary("CreateModel")
    async def CreateModel(self, request: pb.CreateModelRequest, context: Context) -> pb.Model:
        return await self._create(request, request.weights or None)

    async def UploadModel(
        self, request_iterator: AsyncIterator[pb.UploadModelRequest], context: Context
    ) -> pb.Model:
        """CreateModel with the weights sent in chunks after the request."""
        call = None
        try:
            call = call_context(self.plane, "CreateModel", context)
            with call:
                first: pb.CreateModelRequest | None = None
                chunks = bytearray()
                async for message in request_iterator:
                    if isinstance(message, Undecodable):
                        raise InvalidArgument(message.reason)
                    part = message.WhichOneof("part")
                    if first is None:
                        if part != "model" or message.model.weights:
                            raise InvalidArgument(
                                "the first message is the model (its weights empty); chunks follow"
                            )
                        first = message.model
                    elif part != "chunk":
                        raise InvalidArgument("after the first message, only chunks")
                    else:
                        chunks += message.chunk
                        if len(chunks) > self.plane.max_weights_bytes:
                            raise ResourceExhausted(
                                f"the weights exceed {self.plane.max_weights_bytes:,} bytes, "
                                "the most this server's parameter limit needs"
                            )
                if first is None:
                    raise InvalidArgument("an upload needs the model as its first message")
                if not chunks:
                    raise InvalidArgument("an upload needs the weights' bytes after the model")
                return await self._create(first, memoryview(chunks))
        except Exception as exc:
            await abort(context, exc, call)

    async def _create(
        self, request: pb.CreateModelRequest, weights: bytes | memoryview | None
    ) -> pb.Model:
        spec = convert.spec_in(request.spec_json)
        settings = convert.settings_in(request.settings)
        model = await self.plane.create_model(
            request.name, spec, settings, weights=weights, layout=request.layout or "propserve"
        )
        return convert.model_out(model)

    @server_stream("ExportWeights")
    async def ExportWeights(
        self, request: pb.ExportWeightsRequest, context: Context
    ) -> AsyncIterator[pb.WeightsChunk]:
        """The file in chunks of at most EXPORT_CHUNK bytes; the first says what it is."""
        exported = await self.plane.export_weights(
            request.model,
            request.version,
            layout=request.layout or "propserve",
            format=request.format or "safetensors",
        )
        data = memoryview(exported.data)
        info = convert.weights_info_out(exported)
        yield pb.WeightsChunk(info=info, data=data[:EXPORT_CHUNK].tobytes())
        for start in range(EXPORT_CHUNK, len(data), EXPORT_CHUNK):
            yield pb.WeightsChunk(data=data[start : start + EXPORT_CHUNK].tobytes())

    @unary("GetModel")
    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.Model:
        return convert.model_out(await self.plane.get_model(request.name))

    @unary("ListModels")
    async def ListModels(
        self, request: pb.ListModelsRequest, context: Context
    ) -> pb.ListModelsResponse:
        models = await self.plane.list_models()
        return pb.ListModelsResponse(models=[convert.model_out(m) for m in models])

    @unary("DeleteModel")
    async def DeleteModel(
        self, request: pb.DeleteModelRequest, context: Context
    ) -> pb.DeleteModelResponse:
        await self.plane.delete_model(request.name)
        return pb.DeleteModelResponse()

    @unary("UpdateModel")
    async def UpdateModel(self, request: pb.UpdateModelRequest, context: Context) -> pb.Model:
        settings = convert.settings_in(request.settings)
        return convert.model_out(await self.plane.update_model(request.name, settings))

    @unary("Predict")
    async def Predict(self, request: pb.PredictRequest, context: Context) -> pb.PredictResponse:
        inputs = convert.tensor_in(request.inputs, "inputs", self.plane.max_elements)
        source = convert.source_in(request, "source")
        return convert.prediction_out(await self.plane.predict(request.model, inputs, **source))

    @unary("Evaluate")
    async def Evaluate(self, request: pb.EvaluateRequest, context: Context) -> pb.EvaluateResponse:
        inputs = convert.tensor_in(request.inputs, "inputs", self.plane.max_elements)
        targets = convert.tensor_in(request.targets, "targets", self.plane.max_elements)
        source = convert.source_in(request, "source")
        result = await self.plane.evaluate(request.model, inputs, targets, **source)
        return convert.evaluation_out(result)

    @unary("TrainStep")
    async def TrainStep(
        self, request: pb.TrainStepRequest, context: Context
    ) -> pb.TrainStepResponse:
        batch = convert.batch_in(request, self.plane.max_elements)
        result = await self.plane.train_step(
            request.model, batch.inputs, batch.targets, learning_rate=batch.learning_rate
        )
        return convert.step_out(result)

    async def Train(
        self, request_iterator: AsyncIterator[pb.TrainStepRequest], context: Context
    ) -> AsyncIterator[pb.TrainStepResponse]:
        """One response per batch; a failing batch ends the stream with its index named."""
        call = None
        try:
            call = call_context(self.plane, "Train", context)
            with call:
                async for result in self.plane.train(self._batches(request_iterator)):
                    yield convert.step_out(result)
        except Exception as exc:
            await abort(context, exc, call)

    async def _batches(self, requests: AsyncIterator[pb.TrainStepRequest]) -> AsyncIterator[Batch]:
        async for request in requests:
            if isinstance(request, Undecodable):
                raise InvalidArgument(request.reason)
            yield convert.batch_in(request, self.plane.max_elements)

    @unary("GetHistory")
    async def GetHistory(self, request: pb.GetHistoryRequest, context: Context) -> pb.History:
        history = await self.plane.history(
            request.model,
            since=request.since if request.HasField("since") else None,
            until=request.until if request.HasField("until") else None,
            every=request.every or 1,
            limit=request.limit or None,
        )
        return convert.history_out(history)

    @server_stream("WatchHistory")
    async def WatchHistory(
        self, request: pb.WatchHistoryRequest, context: Context
    ) -> AsyncIterator[pb.History]:
        """The history from a step on, then each new part as it is trained."""
        since = request.since if request.HasField("since") else None
        parts = self.plane.watch_history(request.model, since=since, every=request.every or 1)
        async for part in parts:
            yield convert.history_out(part)

    @unary("SaveVersion")
    async def SaveVersion(self, request: pb.SaveVersionRequest, context: Context) -> pb.Version:
        return convert.version_out(await self.plane.save_version(request.model))

    @unary("ListVersions")
    async def ListVersions(
        self, request: pb.ListVersionsRequest, context: Context
    ) -> pb.ListVersionsResponse:
        versions = await self.plane.list_versions(request.model)
        return pb.ListVersionsResponse(versions=[convert.version_out(v) for v in versions])

    @unary("SetLabel")
    async def SetLabel(self, request: pb.SetLabelRequest, context: Context) -> pb.Model:
        model = await self.plane.set_label(request.model, request.label, request.version)
        return convert.model_out(model)

    @unary("RemoveLabel")
    async def RemoveLabel(self, request: pb.RemoveLabelRequest, context: Context) -> pb.Model:
        return convert.model_out(await self.plane.remove_label(request.model, request.label))

    @unary("Rollback")
    async def Rollback(self, request: pb.RollbackRequest, context: Context) -> pb.Model:
        target = convert.source_in(request, "target")
        return convert.model_out(await self.plane.rollback(request.model, **target))

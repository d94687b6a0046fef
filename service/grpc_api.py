"""The gRPC adapter: decode messages, call the core, encode answers. No business rules.

Errors map through ``STATUS`` (one table); authentication, metrics, request ids and the
mapping happen in one decorator around every method.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from asyncio import FIRST_COMPLETED
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from numpy.typing import NDArray

from propserve import wire
from propserve.service import errors, tensors
from propserve.service.auth import Authenticator
from propserve.service.core import Core, ModelInfo, StepOutcome, VersionInfo
from propserve.service.dispatch import Dispatcher
from propserve.service.logs import new_request_id
from propserve.service.metrics import Metrics
from propserve.v1 import model_service_pb2 as pb
from propserve.v1 import model_service_pb2_grpc as pb_grpc

log = logging.getLogger("propserve.grpc")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ModelService"].full_name

_WIRE_DTYPES = {
    pb.DTYPE_FLOAT32: "float32",
    pb.DTYPE_FLOAT64: "float64",
    pb.DTYPE_INT32: "int32",
    pb.DTYPE_INT64: "int64",
}
_DTYPE_ENUMS = {name: enum for enum, name in _WIRE_DTYPES.items()}

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[Any, Request, Context], Awaitable[Response]]


#: Steps of a Train stream that may be pending before its next batch is read: the running
#: one, one queued behind it, and the finished one whose result the worker hands over when
#: the next begins (see dispatch.Serial). Decoded batches waiting to run: at most 2.
READ_AHEAD = 3


def _status(exc: BaseException) -> grpc.StatusCode:
    return grpc.StatusCode[errors.code_of(exc).grpc]


def tensor_in(tensor: pb.Tensor, what: str, max_elements: int) -> NDArray[Any]:
    dtype = _WIRE_DTYPES.get(tensor.dtype)
    if dtype is None:
        raise errors.InvalidArgument(
            f"{what}: dtype must be set (DTYPE_FLOAT32, DTYPE_FLOAT64, DTYPE_INT32 or DTYPE_INT64)"
        )
    try:
        return tensors.from_bytes(list(tensor.shape), dtype, tensor.data, max_elements)
    except errors.PropserveError as exc:
        raise type(exc)(f"{what}: {exc.message}") from None


def tensor_out(array: NDArray[Any]) -> pb.Tensor:
    shape, dtype, data = tensors.to_bytes(array)
    return pb.Tensor(shape=shape, dtype=_DTYPE_ENUMS[dtype], data=data)


def model_out(info: ModelInfo) -> pb.Model:
    return pb.Model(
        name=info.name,
        spec_json=json.dumps(info.spec),
        settings=pb.ModelSettings(
            retain=info.settings.get("retain"), autosave_every=info.settings.get("autosave_every")
        ),
        labels=info.labels,
        head_step=info.head_step,
        latest_version=info.latest_version,
        unsaved_steps=info.unsaved_steps,
        parameter_count=info.parameter_count,
        created_at=info.created_at,
        last_loss=info.last_loss,
    )


def version_out(info: VersionInfo) -> pb.Version:
    return pb.Version(
        model=info.model,
        version=info.version,
        step=info.step,
        created_at=info.created_at,
        parent=info.parent,
        metrics=info.metrics,
        sha256=info.sha256,
        size_bytes=info.size_bytes,
        labels=info.labels,
    )


def _step_out(outcome: StepOutcome) -> pb.TrainStepResponse:
    response = pb.TrainStepResponse(
        step=outcome.step, loss=outcome.loss, batch_size=outcome.batch_size
    )
    if outcome.accuracy is not None:
        response.accuracy = outcome.accuracy
    if outcome.saved_version is not None:
        response.saved_version = outcome.saved_version
    return response


def _settings_in(settings: pb.ModelSettings) -> dict[str, int]:
    out = {}
    if settings.HasField("retain"):
        out["retain"] = settings.retain
    if settings.HasField("autosave_every"):
        out["autosave_every"] = settings.autosave_every
    return out


def _call_metadata(context: Context) -> tuple[str, str | None]:
    """The request id (the client's ``x-request-id`` or a new one) and the ``authorization``
    value, in one pass over the metadata."""
    rid = None
    authorization = None
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id":
            if rid is None and isinstance(value, str) and 0 < len(value) <= 128:
                rid = value
        elif key == "authorization" and authorization is None and isinstance(value, str):
            authorization = value
    return rid or new_request_id(), authorization


class ModelServiceAdapter(pb_grpc.ModelServiceServicer):
    """propserve.v1.ModelService over the core."""

    def __init__(
        self, dispatcher: Dispatcher, auth: Authenticator, metrics: Metrics, max_elements: int
    ) -> None:
        self.dispatch = dispatcher
        self.core: Core = dispatcher.core
        self.auth = auth
        self.metrics = metrics
        self.max_elements = max_elements
        # Draining: new calls are answered UNAVAILABLE while those in flight finish.
        self.draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def _enter(self) -> None:
        if self.draining:
            raise errors.Unavailable("the server is shutting down")
        self._in_flight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._in_flight -= 1
        if not self._in_flight:
            self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """Refuse new calls and wait up to ``timeout`` for those in flight; True if idle."""
        self.draining = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        return self._idle.is_set()

    async def _fail(
        self, context: Context, method: str, rid: str, exc: BaseException
    ) -> grpc.StatusCode:
        """Abort the call with the mapped status (raises); returns the code for metrics."""
        if isinstance(exc, errors.PropserveError):
            code = _status(exc)
            log.info(
                "request.failed transport=grpc method=%s code=%s request_id=%s message=%r",
                method,
                code.name,
                rid,
                exc.message,
            )
            trailers: tuple[tuple[str, str], ...] = (
                (wire.ERROR_CODE_KEY, exc.code.name),
                (wire.REQUEST_ID_KEY, rid),
            )
            if isinstance(exc, errors.TooBusy):
                trailers += ((wire.RETRY_AFTER_MS_KEY, str(wire.RETRY_AFTER_MS)),)
            context.set_trailing_metadata(trailers)
            await context.abort(code, exc.message)
        log.error(
            "request.internal_error transport=grpc method=%s request_id=%s",
            method,
            rid,
            exc_info=exc,
        )
        context.set_trailing_metadata(
            ((wire.ERROR_CODE_KEY, wire.INTERNAL.name), (wire.REQUEST_ID_KEY, rid))
        )
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {rid})")
        raise AssertionError("unreachable")  # pragma: no cover - abort raises

    @staticmethod
    def rpc(method: str) -> Callable[[Handler[Request, Response]], Handler[Request, Response]]:
        """Authorise, time, count and map errors for one unary method."""

        def wrap(fn: Handler[Request, Response]) -> Handler[Request, Response]:
            @functools.wraps(fn)
            async def handler(
                self: ModelServiceAdapter, request: Request, context: Context
            ) -> Response:
                start = time.perf_counter()
                rid, authorization = _call_metadata(context)
                code = "OK"
                entered = False
                try:
                    self._enter()
                    entered = True
                    self.auth.authorize(authorization, method)
                    if isinstance(request, Undecodable):
                        raise errors.InvalidArgument(request.reason)
                    return await fn(self, request, context)
                except Exception as exc:
                    code = _status(exc).name
                    await self._fail(context, method, rid, exc)
                    raise
                finally:
                    if entered:
                        self._leave()
                    self.metrics.observe(method, "grpc", code, time.perf_counter() - start)

            return handler

        return wrap

    # -- models ----------------------------------------------------------------------

    @rpc("CreateModel")
    async def CreateModel(self, request: pb.CreateModelRequest, context: Context) -> pb.Model:
        try:
            spec = json.loads(request.spec_json)
        except (ValueError, RecursionError) as exc:
            # NOTE: deeply nested JSON exhausts the parser's recursion, not its grammar.
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise errors.InvalidArgument(f"spec_json is not valid JSON: {reason}") from None
        info = await self.dispatch.offload(
            self.core.create_model, request.name, spec, _settings_in(request.settings)
        )
        return model_out(info)

    @rpc("GetModel")
    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.Model:
        return model_out(self.core.get_model(request.name))

    @rpc("ListModels")
    async def ListModels(
        self, request: pb.ListModelsRequest, context: Context
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[model_out(m) for m in self.core.list_models()])

    @rpc("DeleteModel")
    async def DeleteModel(
        self, request: pb.DeleteModelRequest, context: Context
    ) -> pb.DeleteModelResponse:
        await self.dispatch.offload(self.core.delete_model, request.name)
        return pb.DeleteModelResponse()

    @rpc("UpdateModel")
    async def UpdateModel(self, request: pb.UpdateModelRequest, context: Context) -> pb.Model:
        info = await self.dispatch.offload(
            self.core.update_settings, request.name, _settings_in(request.settings)
        )
        return model_out(info)

    # -- predicting and training -----------------------------------------------------

    @rpc("Predict")
    async def Predict(self, request: pb.PredictRequest, context: Context) -> pb.PredictResponse:
        inputs = tensor_in(request.inputs, "inputs", self.max_elements)
        source = request.WhichOneof("source")
        kwargs: dict[str, Any] = {}
        if source == "version":
            kwargs["version"] = request.version
        elif source == "label":
            kwargs["label"] = request.label
        result = await self.dispatch.predict(request.model, inputs, **kwargs)
        return pb.PredictResponse(
            outputs=tensor_out(result.outputs), version=result.version, step=result.step
        )

    def _decode_step(self, request: pb.TrainStepRequest) -> tuple[Any, Any, float | None]:
        inputs = tensor_in(request.inputs, "inputs", self.max_elements)
        targets = tensor_in(request.targets, "targets", self.max_elements)
        lr = request.learning_rate if request.HasField("learning_rate") else None
        return inputs, targets, lr

    async def _step(self, name: str, request: pb.TrainStepRequest) -> pb.TrainStepResponse:
        inputs, targets, lr = self._decode_step(request)
        outcome = await self.dispatch.offload(
            self.core.train_step, name, inputs, targets, learning_rate=lr
        )
        return _step_out(outcome)

    @staticmethod
    async def _finish_step(index: int, step: asyncio.Future[StepOutcome]) -> pb.TrainStepResponse:
        """The response of a queued step (batch ``index``), once it has run."""
        try:
            return _step_out(await step)
        except errors.PropserveError as exc:
            raise type(exc)(f"batch {index}: {exc.message}") from None

    @rpc("TrainStep")
    async def TrainStep(
        self, request: pb.TrainStepRequest, context: Context
    ) -> pb.TrainStepResponse:
        return await self._step(request.model, request)

    async def Train(
        self,
        request_iterator: AsyncIterator[pb.TrainStepRequest],
        context: Context,
    ) -> AsyncIterator[pb.TrainStepResponse]:
        """One response per batch; a failing batch ends the stream with its index named."""
        start = time.perf_counter()
        rid, authorization = _call_metadata(context)
        code = "OK"
        index = 0
        name = ""
        entered = False
        try:
            self._enter()
            entered = True
            self.auth.authorize(authorization, "Train")
            # NOTE: steps queue in the worker (Dispatcher.serial) while the next batches are
            # received and decoded, and each starts as soon as the previous one ends. A
            # step's result comes back from the worker when the next step begins its forward
            # pass (see dispatch.Serial), so besides the running step an answered one may be
            # pending, and one more batch is read ahead. A response never waits for the
            # client's next batch. After a failing step, the batches behind it are not
            # applied.
            failure: errors.PropserveError | None = None
            steps = self.dispatch.serial(started="on_start")
            pending: deque[tuple[int, asyncio.Future[StepOutcome]]] = deque()
            messages = request_iterator.__aiter__()
            arriving: asyncio.Future[pb.TrainStepRequest] | None = None
            try:
                while True:
                    if arriving is None and len(pending) < READ_AHEAD:
                        arriving = asyncio.ensure_future(messages.__anext__())
                    waiting = [f for f in (arriving, pending[0][1] if pending else None) if f]
                    await asyncio.wait(waiting, return_when=FIRST_COMPLETED)
                    if pending and pending[0][1].done():
                        yield await self._finish_step(*pending.popleft())
                        continue
                    assert arriving is not None
                    try:
                        request = arriving.result()
                    except StopAsyncIteration:
                        arriving = None
                        break
                    arriving = None
                    try:
                        if isinstance(request, Undecodable):
                            raise errors.InvalidArgument(request.reason)
                        if request.model and name and request.model != name:
                            raise errors.InvalidArgument(
                                f"model {request.model!r} differs from the stream's model {name!r}"
                            )
                        name = request.model or name
                        if not name:
                            raise errors.InvalidArgument("the first message must name the model")
                        inputs, targets, lr = self._decode_step(request)
                    except errors.PropserveError as exc:
                        failure = type(exc)(f"batch {index}: {exc.message}")
                        break
                    step = steps.submit(
                        self.core.train_step, name, inputs, targets, learning_rate=lr
                    )
                    pending.append((index, step))
                    index += 1
                while pending:
                    yield await self._finish_step(*pending.popleft())
            finally:
                if arriving is not None and not arriving.done():
                    arriving.cancel()
                    with contextlib.suppress(BaseException):
                        await arriving
                for _, step in pending:
                    # The call ended with steps queued (the client went away, or a step
                    # failed): they complete or are dropped in the worker, unheard.
                    step.add_done_callback(lambda done: done.cancelled() or done.exception())
            if failure is not None:
                raise failure
        except Exception as exc:
            code = _status(exc).name
            await self._fail(context, "Train", rid, exc)
        finally:
            if entered:
                self._leave()
            self.metrics.observe("Train", "grpc", code, time.perf_counter() - start)
            if index:
                log.debug("train.stream_closed model=%s batches=%d request_id=%s", name, index, rid)

    # -- versions and labels ---------------------------------------------------------

    @rpc("SaveVersion")
    async def SaveVersion(self, request: pb.SaveVersionRequest, context: Context) -> pb.Version:
        return version_out(await self.dispatch.offload(self.core.save_version, request.model))

    @rpc("ListVersions")
    async def ListVersions(
        self, request: pb.ListVersionsRequest, context: Context
    ) -> pb.ListVersionsResponse:
        versions = await self.dispatch.offload(self.core.list_versions, request.model)
        return pb.ListVersionsResponse(versions=[version_out(v) for v in versions])

    @rpc("SetLabel")
    async def SetLabel(self, request: pb.SetLabelRequest, context: Context) -> pb.Model:
        info = await self.dispatch.offload(
            self.core.set_label, request.model, request.label, request.version
        )
        return model_out(info)

    @rpc("RemoveLabel")
    async def RemoveLabel(self, request: pb.RemoveLabelRequest, context: Context) -> pb.Model:
        info = await self.dispatch.offload(self.core.remove_label, request.model, request.label)
        return model_out(info)

    @rpc("Rollback")
    async def Rollback(self, request: pb.RollbackRequest, context: Context) -> pb.Model:
        target = request.WhichOneof("target")
        if target is None:
            raise errors.InvalidArgument("rollback needs a version or a label")
        kwargs: dict[str, Any] = {target: getattr(request, target)}
        return model_out(await self.dispatch.offload(self.core.rollback, request.model, **kwargs))


@dataclass(frozen=True)
class Undecodable:
    """What a request deserializer gives for bytes that are not its message: the handler
    answers INVALID_ARGUMENT with ``reason`` (gRPC's own answer would be UNKNOWN, naming
    the parser's exception class)."""

    reason: str


def _tolerant(decode: Callable[[bytes], Any], message: str) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return decode(data)
        except DecodeError:
            return Undecodable(f"the request is not a valid {message}")

    return deserialize


class _Registrar:
    """Takes the generated registration's handlers and registers them on ``server`` with
    their request deserializers wrapped by :func:`_tolerant`."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server
        self.services: list[str] = []

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same handlers come to add_registered_method_handlers

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.services.append(service)
        wrapped = {}
        for name, handler in handlers.items():
            decode = handler.request_deserializer  # the generated Message.FromString
            message = decode.__self__.DESCRIPTOR.full_name
            wrapped[name] = handler._replace(request_deserializer=_tolerant(decode, message))
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, wrapped),)
        )
        self._server.add_registered_method_handlers(service, wrapped)


def new_server(*, max_message_bytes: int) -> grpc.aio.Server:
    """A grpc.aio server with no services yet: ports may be bound before they are added."""
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    return grpc.aio.server(options=options)


def add_services(
    server: grpc.aio.Server, adapter: ModelServiceAdapter
) -> health.aio.HealthServicer:
    """The model service, the standard health service and reflection, on ``server``."""
    # The generated function only calls the two add_* methods _Registrar has.
    registrar = _Registrar(server)
    pb_grpc.add_ModelServiceServicer_to_server(adapter, registrar)  # type: ignore[arg-type]
    if registrar.services != [SERVICE_NAME]:  # generated by another grpcio-tools?
        raise RuntimeError(f"{SERVICE_NAME} was not registered: {registrar.services}")
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    return health_servicer


def build_server(
    adapter: ModelServiceAdapter, *, max_message_bytes: int
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """:func:`new_server` with :func:`add_services`; ports are added by the caller."""
    server = new_server(max_message_bytes=max_message_bytes)
    return server, add_services(server, adapter)

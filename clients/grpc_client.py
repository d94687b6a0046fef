"""gRPC clients: :class:`GrpcClient` (blocking) and :class:`AsyncGrpcClient` (asyncio).

Tensors travel as shape + dtype + little-endian bytes. ``train`` streams batches over the
bidirectional ``Train`` call and returns one result per batch.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np
from numpy.typing import NDArray

from propserve import wire
from propserve.clients import errors
from propserve.clients._progress import Progress
from propserve.clients._retry import NO_RETRY, RetryPolicy
from propserve.clients.types import Model, Prediction, StepResult, Version, as_array
from propserve.v1 import model_service_pb2 as pb
from propserve.v1 import model_service_pb2_grpc as pb_grpc

#: Statuses the server never answers with, mapped to what they mean to a caller.
_STATUS_CODES = {
    "OUT_OF_RANGE": wire.INVALID_ARGUMENT,
    # NOTE: these clients never cancel a call themselves, so CANCELLED comes from the server
    # aborting it: a server that stops while the call is queued. Retrying it is safe for
    # idempotent calls, like UNAVAILABLE.
    "CANCELLED": wire.UNAVAILABLE,
}
_DTYPES: dict[np.dtype[Any], pb.DType] = {
    np.dtype("<f4"): pb.DTYPE_FLOAT32,
    np.dtype("<f8"): pb.DTYPE_FLOAT64,
    np.dtype("<i4"): pb.DTYPE_INT32,
    np.dtype("<i8"): pb.DTYPE_INT64,
}
_NUMPY: dict[int, np.dtype[Any]] = {enum: dtype for dtype, enum in _DTYPES.items()}
DEFAULT_MAX_MESSAGE = 64 << 20


def translate(exc: grpc.RpcError) -> errors.ClientError:
    """The client's own exception for a failed call: by the code the server named in its
    trailers, else by the status."""
    if not isinstance(exc, grpc.Call | grpc.aio.AioRpcError):
        return errors.Unavailable(str(exc))
    status = exc.code()
    details = exc.details() or status.name
    name = _trailer(exc, wire.ERROR_CODE_KEY)
    if name is None or name not in wire.BY_NAME:
        code = _STATUS_CODES.get(status.name) or wire.code_for_status(grpc=status.name)
        name = code.name
        if status.name == "RESOURCE_EXHAUSTED" and _trailer(exc, wire.RETRY_AFTER_MS_KEY):
            name = wire.TOO_BUSY.name
    return errors.from_code(
        name,
        details,
        status=status.name,
        request_id=_trailer(exc, wire.REQUEST_ID_KEY),
        retry_after=_milliseconds(_trailer(exc, wire.RETRY_AFTER_MS_KEY)),
    )


def _trailer(exc: grpc.Call | grpc.aio.AioRpcError, key: str) -> str | None:
    for name, value in exc.trailing_metadata() or ():
        if name == key:
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


def _milliseconds(value: str | None) -> float | None:
    try:
        return max(0.0, int(value) / 1000) if value is not None else None
    except ValueError:
        return None


def encode_tensor(value: Any) -> pb.Tensor:
    array = as_array(value)
    if array.dtype.kind == "b":
        array = array.astype(np.float32)
    little = array.dtype.newbyteorder("<")
    enum = _DTYPES.get(little)
    if enum is None:
        if array.dtype.kind in "iu":
            array, enum = array.astype("<i8"), pb.DTYPE_INT64
        elif array.dtype.kind == "f":
            array, enum = array.astype("<f8"), pb.DTYPE_FLOAT64
        else:
            raise errors.InvalidArgument(f"cannot send an array of dtype {array.dtype}")
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return pb.Tensor(shape=array.shape, dtype=enum, data=data)


def decode_tensor(tensor: pb.Tensor) -> NDArray[Any]:
    dtype = _NUMPY.get(tensor.dtype)
    if dtype is None:
        raise errors.ClientError(f"the server sent an unknown dtype {tensor.dtype}")
    array: NDArray[Any] = np.frombuffer(tensor.data, dtype=dtype)
    return array.reshape(tuple(tensor.shape))


def _settings(retain: int | None, autosave_every: int | None) -> pb.ModelSettings:
    settings = pb.ModelSettings()
    if retain is not None:
        settings.retain = retain
    if autosave_every is not None:
        settings.autosave_every = autosave_every
    return settings


def model_from(message: pb.Model) -> Model:
    return Model(
        name=message.name,
        spec=json.loads(message.spec_json),
        settings={
            "retain": message.settings.retain,
            "autosave_every": message.settings.autosave_every,
        },
        labels=dict(message.labels),
        head_step=message.head_step,
        latest_version=_optional(message, "latest_version"),
        unsaved_steps=message.unsaved_steps,
        parameter_count=message.parameter_count,
        created_at=message.created_at,
        last_loss=_optional(message, "last_loss"),
    )


def _optional(message: Any, field: str) -> Any:
    """An optional field's value, None when unset."""
    return getattr(message, field) if message.HasField(field) else None


def version_from(message: pb.Version) -> Version:
    return Version(
        model=message.model,
        version=message.version,
        step=message.step,
        created_at=message.created_at,
        parent=_optional(message, "parent"),
        metrics=dict(message.metrics),
        sha256=message.sha256,
        size_bytes=message.size_bytes,
        labels=tuple(message.labels),
    )


def step_from(message: pb.TrainStepResponse) -> StepResult:
    return StepResult(
        step=message.step,
        loss=message.loss,
        accuracy=message.accuracy if message.HasField("accuracy") else None,
        batch_size=message.batch_size,
        saved_version=message.saved_version if message.HasField("saved_version") else None,
    )


def predict_request(
    name: str, inputs: Any, version: int | None, label: str | None
) -> pb.PredictRequest:
    if version is not None and label is not None:
        raise errors.InvalidArgument("give a version or a label, not both")
    request = pb.PredictRequest(model=name, inputs=encode_tensor(inputs))
    if version is not None:
        request.version = version
    elif label is not None:
        request.label = label
    return request


def step_request(
    name: str, inputs: Any, targets: Any, learning_rate: float | None
) -> pb.TrainStepRequest:
    request = pb.TrainStepRequest(
        model=name, inputs=encode_tensor(inputs), targets=encode_tensor(targets)
    )
    if learning_rate is not None:
        request.learning_rate = learning_rate
    return request


def rollback_request(name: str, version: int | None, label: str | None) -> pb.RollbackRequest:
    if (version is None) == (label is None):
        raise errors.InvalidArgument("rollback needs exactly one of version or label")
    if version is not None:
        return pb.RollbackRequest(model=name, version=version)
    return pb.RollbackRequest(model=name, label=label)


def _channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def _credentials(tls: bool, root_certificates: Path | None) -> grpc.ChannelCredentials | None:
    if not tls and root_certificates is None:
        return None
    roots = root_certificates.read_bytes() if root_certificates else None
    return grpc.ssl_channel_credentials(root_certificates=roots)


class _Base:
    def __init__(self, token: str | None, timeout: float | None, retry: RetryPolicy | None) -> None:
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()


class GrpcClient(_Base):
    """A blocking client for propserve's gRPC API.

    ``target`` is ``host:port``; ``token`` a bearer token; ``tls=True`` (or
    ``root_certificates``, a PEM file) uses TLS; ``timeout`` is each call's deadline in
    seconds. Idempotent calls (predict, get, list) retry on UNAVAILABLE per ``retry``.
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: Path | None = None,
        timeout: float | None = 30.0,
        retry: RetryPolicy | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE,
    ) -> None:
        super().__init__(token, timeout, retry)
        credentials = _credentials(tls, root_certificates)
        options = _channel_options(max_message_bytes)
        self._channel = (
            grpc.secure_channel(target, credentials, options)
            if credentials
            else grpc.insecure_channel(target, options)
        )
        self._stub = pb_grpc.ModelServiceStub(self._channel)

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(
        self, method: str, request: Any, *, retry: bool = False, timeout: float | None = None
    ) -> Any:
        rpc = getattr(self._stub, method)

        def once() -> Any:
            try:
                return rpc(request, timeout=timeout or self.timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                raise translate(exc) from None

        return (self.retry if retry else NO_RETRY).call(once)

    def create_model(
        self,
        name: str,
        spec: dict[str, Any],
        *,
        retain: int | None = None,
        autosave_every: int | None = None,
    ) -> Model:
        request = pb.CreateModelRequest(
            name=name, spec_json=json.dumps(spec), settings=_settings(retain, autosave_every)
        )
        return model_from(self._call("CreateModel", request))

    def get_model(self, name: str) -> Model:
        return model_from(self._call("GetModel", pb.GetModelRequest(name=name), retry=True))

    def list_models(self) -> list[Model]:
        response = self._call("ListModels", pb.ListModelsRequest(), retry=True)
        return [model_from(m) for m in response.models]

    def delete_model(self, name: str) -> None:
        self._call("DeleteModel", pb.DeleteModelRequest(name=name))

    def update_model(
        self, name: str, *, retain: int | None = None, autosave_every: int | None = None
    ) -> Model:
        request = pb.UpdateModelRequest(name=name, settings=_settings(retain, autosave_every))
        return model_from(self._call("UpdateModel", request))

    def predict(
        self, name: str, inputs: Any, *, version: int | None = None, label: str | None = None
    ) -> Prediction:
        response = self._call("Predict", predict_request(name, inputs, version, label), retry=True)
        return Prediction(
            decode_tensor(response.outputs), _optional(response, "version"), response.step
        )

    def train_step(
        self, name: str, inputs: Any, targets: Any, *, learning_rate: float | None = None
    ) -> StepResult:
        return step_from(
            self._call("TrainStep", step_request(name, inputs, targets, learning_rate))
        )

    def train(
        self,
        name: str,
        batches: Iterable[tuple[Any, Any]],
        *,
        learning_rate: float | None = None,
        progress: bool | Progress = False,
        total: int | None = None,
    ) -> list[StepResult]:
        """Stream (inputs, targets) batches over one Train call; one result per batch.

        Never retried: a failure raises, and the steps before it stay applied on the server.
        """
        display = (
            progress if isinstance(progress, Progress) else (Progress(total) if progress else None)
        )
        requests = (step_request(name, x, y, learning_rate) for x, y in batches)
        results: list[StepResult] = []
        try:
            for response in self._stub.Train(requests, metadata=self._metadata):
                results.append(step_from(response))
                if display:
                    display.update(results[-1])
        except grpc.RpcError as exc:
            raise translate(exc) from None
        finally:
            if display and not isinstance(progress, Progress):
                display.close()
        return results

    def save_version(self, name: str) -> Version:
        return version_from(self._call("SaveVersion", pb.SaveVersionRequest(model=name)))

    def list_versions(self, name: str) -> list[Version]:
        response = self._call("ListVersions", pb.ListVersionsRequest(model=name), retry=True)
        return [version_from(v) for v in response.versions]

    def set_label(self, name: str, label: str, version: int) -> Model:
        request = pb.SetLabelRequest(model=name, label=label, version=version)
        return model_from(self._call("SetLabel", request))

    def remove_label(self, name: str, label: str) -> Model:
        return model_from(self._call("RemoveLabel", pb.RemoveLabelRequest(model=name, label=label)))

    def rollback(self, name: str, *, version: int | None = None, label: str | None = None) -> Model:
        return model_from(self._call("Rollback", rollback_request(name, version, label)))


class AsyncGrpcClient(_Base):
    """The asyncio twin of :class:`GrpcClient`: the same methods, awaited."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: Path | None = None,
        timeout: float | None = 30.0,
        retry: RetryPolicy | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE,
    ) -> None:
        super().__init__(token, timeout, retry)
        credentials = _credentials(tls, root_certificates)
        options = _channel_options(max_message_bytes)
        self._channel = (
            grpc.aio.secure_channel(target, credentials, options)
            if credentials
            else grpc.aio.insecure_channel(target, options)
        )
        self._stub = pb_grpc.ModelServiceStub(self._channel)

    async def __aenter__(self) -> AsyncGrpcClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: str, request: Any, *, retry: bool = False) -> Any:
        rpc = getattr(self._stub, method)

        async def once() -> Any:
            try:
                return await rpc(request, timeout=self.timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                raise translate(exc) from None

        return await (self.retry if retry else NO_RETRY).acall(once)

    async def create_model(
        self,
        name: str,
        spec: dict[str, Any],
        *,
        retain: int | None = None,
        autosave_every: int | None = None,
    ) -> Model:
        request = pb.CreateModelRequest(
            name=name, spec_json=json.dumps(spec), settings=_settings(retain, autosave_every)
        )
        return model_from(await self._call("CreateModel", request))

    async def get_model(self, name: str) -> Model:
        return model_from(await self._call("GetModel", pb.GetModelRequest(name=name), retry=True))

    async def list_models(self) -> list[Model]:
        response = await self._call("ListModels", pb.ListModelsRequest(), retry=True)
        return [model_from(m) for m in response.models]

    async def delete_model(self, name: str) -> None:
        await self._call("DeleteModel", pb.DeleteModelRequest(name=name))

    async def update_model(
        self, name: str, *, retain: int | None = None, autosave_every: int | None = None
    ) -> Model:
        request = pb.UpdateModelRequest(name=name, settings=_settings(retain, autosave_every))
        return model_from(await self._call("UpdateModel", request))

    async def predict(
        self, name: str, inputs: Any, *, version: int | None = None, label: str | None = None
    ) -> Prediction:
        response = await self._call(
            "Predict", predict_request(name, inputs, version, label), retry=True
        )
        return Prediction(
            decode_tensor(response.outputs), _optional(response, "version"), response.step
        )

    async def train_step(
        self, name: str, inputs: Any, targets: Any, *, learning_rate: float | None = None
    ) -> StepResult:
        return step_from(
            await self._call("TrainStep", step_request(name, inputs, targets, learning_rate))
        )

    async def train(
        self,
        name: str,
        batches: Iterable[tuple[Any, Any]] | AsyncIterable[tuple[Any, Any]],
        *,
        learning_rate: float | None = None,
        progress: bool = False,
        total: int | None = None,
    ) -> list[StepResult]:
        """Stream batches over one Train call; never retried (see GrpcClient.train)."""

        async def requests() -> AsyncIterator[pb.TrainStepRequest]:
            if isinstance(batches, AsyncIterable):
                async for x, y in batches:
                    yield step_request(name, x, y, learning_rate)
            else:
                for x, y in batches:
                    yield step_request(name, x, y, learning_rate)

        display = Progress(total) if progress else None
        results: list[StepResult] = []
        try:
            async for response in self._stub.Train(requests(), metadata=self._metadata):
                results.append(step_from(response))
                if display:
                    display.update(results[-1])
        except grpc.RpcError as exc:
            raise translate(exc) from None
        finally:
            if display:
                display.close()
        return results

    async def save_version(self, name: str) -> Version:
        return version_from(await self._call("SaveVersion", pb.SaveVersionRequest(model=name)))

    async def list_versions(self, name: str) -> list[Version]:
        response = await self._call("ListVersions", pb.ListVersionsRequest(model=name), retry=True)
        return [version_from(v) for v in response.versions]

    async def set_label(self, name: str, label: str, version: int) -> Model:
        request = pb.SetLabelRequest(model=name, label=label, version=version)
        return model_from(await self._call("SetLabel", request))

    async def remove_label(self, name: str, label: str) -> Model:
        return model_from(
            await self._call("RemoveLabel", pb.RemoveLabelRequest(model=name, label=label))
        )

    async def rollback(
        self, name: str, *, version: int | None = None, label: str | None = None
    ) -> Model:
        return model_from(await self._call("Rollback", rollback_request(name, version, label)))

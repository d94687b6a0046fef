"""The Open Inference Protocol over REST: ``/v2``.

``POST /v2/models/{name}[/versions/{version}]/infer`` is a plain ASGI endpoint, like
propserve's own predict (see propserve.service.rest.predict), taking JSON tensors and the
binary tensor data extension (a JSON header of ``Inference-Header-Content-Length`` bytes,
then the tensors' raw little-endian bytes). Health, metadata and the model-repository
extension are framework routes (:func:`router`). The rules both OIP transports share are in
propserve.service.oip; errors are the protocol's ``{"error": "..."}`` with the wire code's
status.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, Body, Path, Response
from numpy.typing import NDArray
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from propserve import wire
from propserve.service import oip, tensors
from propserve.service.calls import Call
from propserve.service.dataplane import DataPlane
from propserve.service.errors import InvalidArgument, PropserveError
from propserve.service.models import Prediction
from propserve.service.rest import jsonnumbers
from propserve.service.rest.admission import Admission
from propserve.service.rest.errors import JSON, error_answer
from propserve.service.rest.predict import call_headers, read_body

INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")

#: The binary tensor data extension's header: the length of the body's JSON part.
HEADER_LENGTH = b"inference-header-content-length"
OCTETS = (b"content-type", b"application/octet-stream")

#: Operations of /v2 anyone may call, also while the server drains.
OPEN_OPERATIONS = frozenset(
    {
        "ServerLive",
        "ServerReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelVersionMetadata",
        "ModelReady",
        "ModelVersionReady",
    }
)

_TENSOR_SHAPE = {"type": "array", "items": {"type": "integer", "minimum": 0}, "maxItems": 2}
_PARAMETERS = {"type": "object", "additionalProperties": True}

#: The infer body's schema, for /openapi.json (the endpoint checks the same by hand).
INFER_REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "model_name": {"type": "string"},
        "model_version": {"type": "string"},
        "parameters": _PARAMETERS,
        "inputs": {
            "type": "array",
            "minItems": 1,
            "maxItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "shape", "datatype"],
                "properties": {
                    "name": {"type": "string", "enum": [oip.INPUT]},
                    "shape": _TENSOR_SHAPE,
                    "datatype": {"type": "string", "enum": list(oip.DATATYPES)},
                    "parameters": _PARAMETERS,
                    "data": {"type": "array", "items": {}},
                },
            },
        },
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "enum": [oip.OUTPUT]},
                    "parameters": _PARAMETERS,
                },
            },
        },
    },
}
INFER_RESPONSE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["model_name", "outputs"],
    "properties": {
        "model_name": {"type": "string"},
        "model_version": {"type": "string"},
        "id": {"type": "string"},
        "parameters": _PARAMETERS,
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "shape", "datatype"],
                "properties": {
                    "name": {"type": "string"},
                    "shape": {"type": "array", "items": {"type": "integer"}},
                    "datatype": {"type": "string"},
                    "parameters": _PARAMETERS,
                    "data": {"type": "array", "items": {"type": "number"}},
                },
            },
        },
    },
}
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}},
}


_INFER_FIELDS = frozenset({"id", "model_name", "model_version", "parameters", "inputs", "outputs"})


@dataclass(frozen=True)
class InferRequest:
    """An infer body, decoded."""

    id: str | None
    x: NDArray[Any]
    binary_output: bool
    #: The version the path names, else the body (``""``: the server's policy).
    model_version: str


class InferEndpoint:
    """The infer route; ``scope["path_params"]`` holds ``name`` and ``version``."""

    def __init__(self, plane: DataPlane, admission: Admission) -> None:
        self.plane = plane
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        name: str = scope["path_params"]["name"]
        model_version: str = scope["path_params"]["version"]
        call: Call | None = None
        request_id, authorization, header_length = call_headers(scope, HEADER_LENGTH)
        try:
            call = self.plane.call(
                "ModelInfer",
                "rest",
                request_id=request_id,
                authorization=authorization,
                protocol="oip",
            )
            with call:
                if self.admission.is_large(scope):
                    async with self.admission.slot(scope):
                        request, result = await self._infer(
                            name, model_version, header_length, receive
                        )
                else:
                    request, result = await self._infer(name, model_version, header_length, receive)
            status, payload, headers = 200, *infer_answer(name, request, result)
        except Exception as exc:
            status, payload, headers = oip_error_answer(exc, call)
        rid = call.request_id if call is not None else ""
        headers.append((wire.REQUEST_ID_KEY.encode(), rid.encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    async def _infer(
        self, name: str, model_version: str, header_length: str | None, receive: Receive
    ) -> tuple[InferRequest, Prediction]:
        raw = await read_body(receive)
        request = infer_request(raw, header_length, self.plane.max_elements, name, model_version)
        return request, await oip.infer(self.plane, name, request.model_version, request.x)


def infer_request(
    raw: bytes, header_length: str | None, max_elements: int, name: str, model_version: str
) -> InferRequest:
    """An infer body for model ``name`` (and ``model_version``, from the path): JSON, or with
    ``header_length`` a JSON header then binary tensors. The body may name the model and its
    version too (KServe's client does): the same as the path's, or the version alone."""
    binary = b""
    if header_length is not None:
        if not header_length.isascii() or not header_length.isdigit():
            raise InvalidArgument("Inference-Header-Content-Length must be a number of bytes")
        length = int(header_length)
        if length > len(raw):
            raise InvalidArgument(
                f"Inference-Header-Content-Length is {length}; the body has {len(raw)} bytes"
            )
        raw, binary = raw[:length], raw[length:]
    # Only data written as JSON numbers is worth simdjson's reader; a binary request's header
    # (and the rare body without data) is small, and orjson reads it faster.
    body = jsonnumbers.infer_body(raw) if b'"data"' in raw else None
    if body is None:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidArgument(f"the body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise InvalidArgument("the body must be a JSON object")
    unknown = body.keys() - _INFER_FIELDS
    if unknown:
        raise InvalidArgument(f"unknown field(s) {sorted(unknown)}")
    named = body.get("model_name", name)
    if named != name:
        raise InvalidArgument(f"the body names the model {named!r}; the path names {name!r}")
    in_body = body.get("model_version", model_version)
    if not isinstance(in_body, str) or (model_version and in_body != model_version):
        raise InvalidArgument(
            f"the body names the version {in_body!r}; the path names {model_version!r}"
        )
    request_id = body.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidArgument("id must be a string")
    parameters = _object(body.get("parameters"), "parameters")
    inputs = body.get("inputs")
    if not isinstance(inputs, list):
        raise InvalidArgument("inputs must be a list of tensors")
    oip.check_inputs_count(len(inputs))
    x, used = _input(inputs[0], binary, max_elements)
    if used != len(binary):
        raise InvalidArgument(
            f"the body has {len(binary)} bytes of binary data; the inputs name {used}"
        )
    outputs = body.get("outputs") or []
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise InvalidArgument("outputs must be a list of objects")
    oip.check_outputs([o.get("name") for o in outputs])
    binary_output = parameters.get("binary_data_output") is True or any(
        _object(o.get("parameters"), "outputs' parameters").get("binary_data") is True
        for o in outputs
    )
    return InferRequest(request_id, x, binary_output, in_body)


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be an object")
    return value


def _input(tensor: Any, binary: bytes, max_elements: int) -> tuple[NDArray[Any], int]:
    """One input tensor as an array, and the binary bytes it took."""
    if not isinstance(tensor, dict):
        raise InvalidArgument("an input tensor is an object {name, shape, datatype, data}")
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not isinstance(name, str) or not isinstance(datatype, str):
        raise InvalidArgument("an input tensor needs a name and a datatype (strings)")
    if not isinstance(shape, list):
        raise InvalidArgument(f"input {name!r} needs a shape (a list of dimensions)")
    dtype = oip.check_input(name, datatype, shape)
    size = _object(tensor.get("parameters"), "an input's parameters").get("binary_data_size")
    try:
        if size is not None:
            if "data" in tensor:
                raise InvalidArgument(f"input {name!r} has both data and binary_data_size")
            if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= len(binary):
                raise InvalidArgument(
                    f"binary_data_size {size!r} of input {name!r} is not within the "
                    f"{len(binary)} bytes of binary data"
                )
            return tensors.from_bytes(shape, dtype, binary[:size], max_elements), size
        data = tensor.get("data")
        if not isinstance(data, jsonnumbers.Numbers | list):
            raise InvalidArgument(f"input {name!r} needs data (a list) or binary_data_size")
        numbers = data if isinstance(data, jsonnumbers.Numbers) else _numbers(data, max_elements)
        values = numbers.values
        dims = tensors.check_shape(shape, max_elements)
        if numbers.rows is not None and list(numbers.rows) != shape:
            raise InvalidArgument(
                f"data nested as {numbers.rows[0]} rows of {numbers.rows[1]} is not the "
                f"shape {shape}"
            )
        if values.size != math.prod(dims):
            raise InvalidArgument(
                f"data holds {values.size} numbers; shape {shape} needs {math.prod(dims)}"
            )
        # JSON numbers stay float64 (exact as written); the core casts them to the model's
        # dtype and refuses a value beyond it, as for /v1's JSON.
        return values.reshape(dims), 0
    except PropserveError as exc:
        if f"input {name!r}" in exc.message:
            raise
        raise type(exc)(f"input {name!r}: {exc.message}") from None


def _numbers(data: list[Any], max_elements: int) -> jsonnumbers.Numbers:
    """JSON data the fast reader declined, read by the same rules (or refused, saying why):
    numbers only, flat or as rows of one length."""
    rows = None
    if data and isinstance(data[0], list):
        lengths = {len(row) if isinstance(row, list) else -1 for row in data}
        if len(lengths) != 1 or -1 in lengths:
            raise InvalidArgument("nested data must be rows of one length")
        rows = (len(data), lengths.pop())
    flat: list[Any] = []
    pending = [iter(data)]
    while pending:  # every number, row-major, however deep (as the fast reader flattens)
        value = next(pending[-1], pending)
        if value is pending:
            pending.pop()
        elif isinstance(value, list):
            pending.append(iter(value))
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidArgument(f"data must hold numbers only, not {value!r}"[:120])
        else:
            flat.append(value)
            if len(flat) > max_elements:
                raise tensors.too_many(len(flat), max_elements)
    if rows is not None and len(flat) != rows[0] * rows[1]:
        raise InvalidArgument("nested data must be rows of numbers")
    try:
        return jsonnumbers.Numbers(np.asarray(flat, dtype=np.float64), rows)
    except OverflowError:  # an integer beyond float64
        raise InvalidArgument("data holds a number beyond FP64's range") from None


def infer_answer(
    name: str, request: InferRequest, result: Prediction
) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The body and headers of an infer answer, the outputs as JSON or as binary."""
    outputs = result.outputs
    tensor: dict[str, Any] = {
        "name": oip.OUTPUT,
        "datatype": oip.datatype(outputs.dtype),
        "shape": list(outputs.shape),
    }
    answer: dict[str, Any] = {
        "model_name": name,
        "model_version": oip.answered_version(result),
        "parameters": {"step": result.step},
        "outputs": [tensor],
    }
    if request.id is not None:
        answer["id"] = request.id
    if not request.binary_output:
        tensor["data"] = outputs.ravel()
        return orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY), [JSON]
    data = outputs.astype(outputs.dtype.newbyteorder("<"), copy=False).tobytes()
    tensor["parameters"] = {"binary_data_size": len(data)}
    head = orjson.dumps(answer)
    return head + data, [OCTETS, (HEADER_LENGTH, str(len(head)).encode())]


def oip_error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


def oip_error_answer(exc: BaseException, call: Call | None) -> tuple[int, bytes, list[Any]]:
    """(status, body, headers) answering ``exc`` in the protocol's envelope, with the same
    status, code and retry hint as propserve's own API."""
    status, body, headers = error_answer(exc, call)
    error = orjson.loads(body)["error"]
    headers.append((wire.ERROR_CODE_KEY.encode(), str(error["code"]).encode()))
    return status, oip_error_body(str(error["message"])), headers


# -- health, metadata, repository: framework routes -----------------------------------------

ModelName = Annotated[str, Path(json_schema_extra={"pattern": f"^{wire.NAME_PATTERN}$"})]
VersionName = Annotated[str, Path(json_schema_extra={"pattern": r"^([0-9]+|[A-Za-z0-9._-]+)$"})]


class OipError(BaseModel):
    error: str


class LiveOut(BaseModel):
    live: bool


class ReadyOut(BaseModel):
    ready: bool


class ModelReadyOut(BaseModel):
    name: str
    ready: bool


class ServerMetadataOut(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadataOut(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadataOut(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadataOut]
    outputs: list[TensorMetadataOut]
    properties: dict[str, str]


class RepositoryModelOut(BaseModel):
    name: str
    version: str
    state: str
    reason: str = ""


class RepositoryIndexBody(BaseModel):
    model_config = {"extra": "forbid"}
    repository_name: str = ""
    ready: bool = False


def _json(value: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(value), status, media_type="application/json")


def router(plane: DataPlane, *, ready: Callable[[], bool], version: str) -> APIRouter:
    """The protocol's routes other than infer."""
    errors: dict[int | str, dict[str, Any]] = {
        code.http: {"model": OipError} for code in wire.CODES if code.http not in (422, 504)
    }
    not_ready: dict[int | str, dict[str, Any]] = {503: {"model": ReadyOut}}
    v2 = APIRouter(prefix="/v2", tags=["open inference protocol"], responses=errors)

    @v2.get("/health/live", operation_id="ServerLive", responses={200: {"model": LiveOut}})
    async def live() -> Response:
        return _json({"live": True})

    @v2.get(
        "/health/ready",
        operation_id="ServerReady",
        responses={200: {"model": ReadyOut}, **not_ready},
    )
    async def server_ready() -> Response:
        is_ready = ready()
        return _json({"ready": is_ready}, 200 if is_ready else 503)

    @v2.get("", operation_id="ServerMetadata", responses={200: {"model": ServerMetadataOut}})
    async def server_metadata() -> Response:
        return _json(
            {"name": oip.SERVER_NAME, "version": version, "extensions": list(oip.EXTENSIONS)}
        )

    @v2.get(
        "/models/{name}", operation_id="ModelMetadata", responses={200: {"model": ModelMetadataOut}}
    )
    async def model_metadata(name: ModelName) -> Response:
        return _json(await oip.model_metadata(plane, name, ""))

    @v2.get(
        "/models/{name}/versions/{model_version}",
        operation_id="ModelVersionMetadata",
        responses={200: {"model": ModelMetadataOut}},
    )
    async def model_version_metadata(name: ModelName, model_version: VersionName) -> Response:
        return _json(await oip.model_metadata(plane, name, model_version))

    ready_responses: dict[int | str, dict[str, Any]] = {
        200: {"model": ModelReadyOut},
        503: {"model": ModelReadyOut},
    }

    @v2.get("/models/{name}/ready", operation_id="ModelReady", responses=ready_responses)
    async def model_ready(name: ModelName) -> Response:
        return _ready_answer(name, ready() and await oip.model_ready(plane, name, ""))

    @v2.get(
        "/models/{name}/versions/{model_version}/ready",
        operation_id="ModelVersionReady",
        responses=ready_responses,
    )
    async def model_version_ready(name: ModelName, model_version: VersionName) -> Response:
        is_ready = ready() and await oip.model_ready(plane, name, model_version)
        return _ready_answer(name, is_ready)

    @v2.post(
        "/repository/index",
        operation_id="RepositoryIndex",
        responses={200: {"model": list[RepositoryModelOut]}},
    )
    async def repository_index(
        body: Annotated[RepositoryIndexBody | None, Body()] = None,
    ) -> Response:
        return _json(await oip.repository_index(plane, body is not None and body.ready))

    loaded: dict[int | str, dict[str, Any]] = {200: {"description": "Done (no body)"}}

    @v2.post(
        "/repository/models/{name}/load",
        operation_id="RepositoryModelLoad",
        response_class=Response,
        responses=loaded,
    )
    async def load(name: ModelName) -> Response:
        await plane.load_model(name)
        return Response(status_code=200)

    @v2.post(
        "/repository/models/{name}/unload",
        operation_id="RepositoryModelUnload",
        response_class=Response,
        responses=loaded,
    )
    async def unload(name: ModelName) -> Response:
        await plane.unload_model(name)
        return Response(status_code=200)

    return v2


def _ready_answer(name: str, is_ready: bool) -> Response:
    return _json({"name": name, "ready": is_ready}, 200 if is_ready else 503)

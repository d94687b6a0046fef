"""The REST adapter (FastAPI): decode JSON, call the core, encode answers. No business rules.

Tensor-carrying bodies (predict, train_step) are parsed with orjson and turned into numpy
arrays directly: validating a 256 x 784 list element by element through pydantic costs
~100 ms, numpy ~1 ms. Their schemas are still declared, so /openapi.json documents them.
Errors map through ``HTTP_STATUS`` (one table) to ``{"error": {"code", "message"}}``.
"""

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from propserve import wire
from propserve.service import errors, jsonnumbers, tensors
from propserve.service.auth import Authenticator, Principal
from propserve.service.core import Core, ModelInfo, Prediction, VersionInfo
from propserve.service.dispatch import Dispatcher
from propserve.service.logs import new_request_id
from propserve.service.metrics import Metrics
from propserve.service.rest_schemas import (
    CreateModelBody,
    ErrorOut,
    LabelBody,
    ModelList,
    ModelOut,
    PredictBody,
    PredictOut,
    RollbackBody,
    TrainStepBody,
    TrainStepOut,
    UpdateModelBody,
    VersionList,
    VersionOut,
)

log = logging.getLogger("propserve.rest")


def model_out(info: ModelInfo) -> ModelOut:
    """The wire form of the core's ModelInfo (the same fields)."""
    return ModelOut.model_validate(info, from_attributes=True)


def version_out(info: VersionInfo) -> VersionOut:
    """The wire form of the core's VersionInfo (the same fields)."""
    return VersionOut.model_validate(info, from_attributes=True)


def tensor_json(value: Any, what: str, max_elements: int, dtype: str | None = None) -> Any:
    """A JSON tensor (nested lists, {data, shape[, dtype]} or {b64, shape, dtype}) as a numpy
    array.

    ``dtype`` is the default when the body names none: inputs are features, so JSON integers
    there are floats; targets keep JSON's kind (integers are class labels)."""
    try:
        if dtype is not None and isinstance(value, np.ndarray):  # from service.jsonnumbers
            return tensors.from_matrix(value, dtype, max_elements)
        if isinstance(value, dict):
            if "b64" in value:
                if set(value) != {"b64", "shape", "dtype"}:
                    raise errors.InvalidArgument("a base64 tensor is {b64, shape, dtype}")
                return tensors.from_base64(
                    value["shape"], value["dtype"], value["b64"], max_elements
                )
            unknown = set(value) - {"data", "shape", "dtype"}
            if unknown or "data" not in value or "shape" not in value:
                raise errors.InvalidArgument(
                    "a flat tensor is {data, shape[, dtype]}, a base64 one {b64, shape, dtype}"
                )
            return tensors.from_json(
                value["data"],
                shape=value["shape"],
                dtype=value.get("dtype") or dtype,
                max_elements=max_elements,
            )
        return tensors.from_json(value, dtype=dtype, max_elements=max_elements)
    except errors.PropserveError as exc:
        raise type(exc)(f"{what}: {exc.message}") from None


def json_object(raw: bytes, matrix: str | None = None) -> dict[str, Any]:
    """The JSON object of a body. A ``matrix`` member that is a rectangular rank-2 array of
    numbers comes back as a float64 numpy array (see service.jsonnumbers)."""
    if matrix is not None:
        fast = jsonnumbers.object_with_matrix(raw, matrix)
        if fast is not None:
            return fast
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise errors.InvalidArgument(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise errors.InvalidArgument("the body must be a JSON object")
    return body


def _optional_int(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise errors.InvalidArgument(f"{key} must be an integer")
    return value


def _only(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise errors.InvalidArgument(f"unknown field(s) {unknown}; allowed: {sorted(allowed)}")


def orjson_response(content: Any, status: int = 200) -> Response:
    return Response(
        orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY),
        status,
        media_type="application/json",
    )


#: Codes for the HTTP errors the framework answers by itself.
FRAMEWORK_CODES = {404: "not_found", 405: "invalid_argument", 413: "resource_exhausted"}


def failure_response(exc: BaseException, path: str, rid: str) -> Response:
    """The one mapping of an exception to an error response (and its log line): core errors
    through HTTP_STATUS, anything else as an internal error without internals."""
    if isinstance(exc, errors.PropserveError):
        log.info(
            "request.failed transport=rest path=%s code=%s request_id=%s message=%r",
            path,
            exc.code.name,
            rid,
            exc.message,
        )
        response = error_response(exc.code.name, exc.message, exc.code.http)
        if isinstance(exc, errors.TooBusy):
            # Retry-After counts whole seconds; our clients read the milliseconds.
            response.headers["retry-after"] = str(max(1, math.ceil(wire.RETRY_AFTER_MS / 1000)))
            response.headers[wire.RETRY_AFTER_MS_KEY] = str(wire.RETRY_AFTER_MS)
        return response
    log.error(
        "request.internal_error transport=rest path=%s request_id=%s", path, rid, exc_info=exc
    )
    return error_response("internal", f"internal error (request id {rid})", 500)


def error_response(code: str, message: str, status: int, rid: str | None = None) -> Response:
    headers = {"x-request-id": rid} if rid else None
    return Response(
        orjson.dumps({"error": {"code": code, "message": message}}),
        status,
        headers=headers,
        media_type="application/json",
    )


def predict_request(raw: bytes, max_elements: int) -> tuple[Any, int | None, str | None]:
    """(inputs, version, label) of a predict body."""
    body = json_object(raw, matrix="inputs")
    _only(body, {"inputs", "version", "label"})
    if "inputs" not in body:
        raise errors.InvalidArgument("predict needs 'inputs'")
    label = body.get("label")
    if label is not None and not isinstance(label, str):
        raise errors.InvalidArgument("label must be a string")
    inputs = tensor_json(body["inputs"], "inputs", max_elements, "float64")
    return inputs, _optional_int(body, "version"), label


#: dtype.name costs microseconds per call (numpy builds it); these are the ones answered.
_DTYPE_NAMES = {np.dtype(name): name for name in ("float32", "float64")}


def predict_answer(name: str, result: Prediction) -> bytes:
    """The JSON of a prediction."""
    return orjson.dumps(
        {
            "model": name,
            "outputs": result.outputs,
            "dtype": _DTYPE_NAMES.get(result.outputs.dtype) or str(result.outputs.dtype),
            "version": result.version,
            "step": result.step,
        },
        option=orjson.OPT_SERIALIZE_NUMPY,
    )


class PredictHotPath:
    """``POST /v1/models/{name}/predict`` for service.http_fast: the predict route's
    authorisation, parsing, core call, error mapping, logs and metrics, without the framework
    around them. The answer goes to ``reply(status, body, request_id, headers)``, headers
    being those of the answer besides content type and length."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        auth: Authenticator,
        metrics: Metrics,
        *,
        max_body: int,
        max_elements: int,
    ) -> None:
        self.max_body = max_body
        self.dispatcher = dispatcher
        self.auth = auth
        self.metrics = metrics
        self.max_elements = max_elements

    def handle(
        self,
        model: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        reply: Callable[[int, bytes, str, list[tuple[bytes, bytes]]], None],
        *,
        alone: bool = False,
    ) -> None:
        start = time.perf_counter()
        rid = authorization = None
        for key, value in headers:
            if key == b"x-request-id" and rid is None:
                rid = value.decode("latin-1")
            elif key == b"authorization" and authorization is None:
                authorization = value.decode("latin-1")
        rid = rid or new_request_id()
        path = f"/v1/models/{model}/predict"

        def answer(result: Prediction | Exception) -> None:
            extra: list[tuple[bytes, bytes]] = []
            if isinstance(result, Exception):
                failed = failure_response(result, path, rid)
                status, payload = failed.status_code, bytes(failed.body)
                extra = [(k, v) for k, v in failed.raw_headers if k in _PASSED_HEADERS]
            else:
                status, payload = 200, predict_answer(model, result)
            reply(status, payload, rid, extra)
            self.metrics.observe(
                "Predict", "rest", _STATUS_TEXT[status], time.perf_counter() - start
            )

        try:
            self.auth.authorize(authorization, "Predict")
            inputs, version, label = predict_request(body, self.max_elements)
            self.dispatcher.submit_predict(
                model, inputs, answer, version=version, label=label, alone=alone
            )
        except Exception as exc:
            answer(exc)


_STATUS_TEXT = {status: str(status) for status in range(100, 600)}
#: Headers of an error response that the hot path passes on.
_PASSED_HEADERS = frozenset({b"retry-after", wire.RETRY_AFTER_MS_KEY.encode()})


# -- authentication ----------------------------------------------------------------------


def _require(operation: str) -> Callable[[Request], Awaitable[Principal | None]]:
    """A dependency that authorises ``operation`` and names it for metrics."""

    async def dependency(request: Request) -> Principal | None:
        request.scope["state"]["operation"] = operation
        auth: Authenticator = request.app.state.auth
        return auth.authorize(request.headers.get("authorization"), operation)

    dependency.__name__ = f"authorize_{operation}"
    return dependency


CallerCreateModel = Annotated[Principal | None, Depends(_require("CreateModel"))]
CallerListModels = Annotated[Principal | None, Depends(_require("ListModels"))]
CallerGetModel = Annotated[Principal | None, Depends(_require("GetModel"))]
CallerUpdateModel = Annotated[Principal | None, Depends(_require("UpdateModel"))]
CallerDeleteModel = Annotated[Principal | None, Depends(_require("DeleteModel"))]
CallerPredict = Annotated[Principal | None, Depends(_require("Predict"))]
CallerTrainStep = Annotated[Principal | None, Depends(_require("TrainStep"))]
CallerSaveVersion = Annotated[Principal | None, Depends(_require("SaveVersion"))]
CallerListVersions = Annotated[Principal | None, Depends(_require("ListVersions"))]
CallerSetLabel = Annotated[Principal | None, Depends(_require("SetLabel"))]
CallerRemoveLabel = Annotated[Principal | None, Depends(_require("RemoveLabel"))]
CallerRollback = Annotated[Principal | None, Depends(_require("Rollback"))]


# -- middleware --------------------------------------------------------------------------


#: Bodies over this many bytes go through admission control (see RequestContext).
LARGE_BODY = 256 << 10


class RequestContext:
    """Pure ASGI middleware: request ids, body-size limit, latency and code metrics."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        max_body: int,
        *,
        large_body_slots: int = 4,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body
        # NOTE: admission control for large bodies. A request whose body is over
        # LARGE_BODY bytes (or of unknown length) waits for a slot before its body is read;
        # meanwhile the server stops reading that socket, so the bytes wait in the kernel,
        # not in Python. Without it, 64 concurrent 256-row JSON predictions held ~600 MiB
        # of parsed bodies queued for 2 workers.
        self._large_body_slots = asyncio.Semaphore(large_body_slots)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        rid = (
            next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), None)
            or new_request_id()
        )
        scope.setdefault("state", {})["request_id"] = rid
        status = 500
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > self.max_body:
            response = error_response(
                "resource_exhausted",
                f"request body of {int(length):,} bytes exceeds the limit of {self.max_body:,}",
                413,
                rid,
            )
            await response(scope, receive, send)
            self._observe(scope, 413, start)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise errors.ResourceExhausted(
                        f"request body exceeds the limit of {self.max_body:,} bytes"
                    )
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                scope["state"]["started"] = True
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", rid.encode("latin-1")),
                ]
            await send(message)

        large = scope["method"] in ("POST", "PUT", "PATCH") and (
            length is None or not length.isdigit() or int(length) > LARGE_BODY
        )
        try:
            if large:
                await self._large_body_slots.acquire()
            await self.app(scope, limited_receive, send_with_id)
        except Exception as exc:
            # NOTE: Starlette re-raises an unexpected exception after its handler (ours,
            # ``unexpected``) has answered and logged it, so that servers can log it again;
            # once is enough. One raised before any answer is answered here.
            if scope["state"].get("answered"):
                return
            if scope["state"].get("started"):
                raise
            await failure_response(exc, scope["path"], rid)(scope, receive, send_with_id)
        finally:
            if large:
                self._large_body_slots.release()
            self._observe(scope, status, start)

    def _observe(self, scope: Scope, status: int, start: float) -> None:
        operation = scope.get("state", {}).get("operation") or "other"
        self.metrics.observe(operation, "rest", str(status), time.perf_counter() - start)


# -- the application ---------------------------------------------------------------------


def create_app(
    dispatcher: Dispatcher,
    auth: Authenticator,
    metrics: Metrics,
    *,
    max_body: int,
    max_elements: int,
    ready: Callable[[], bool],
) -> ASGIApp:
    """The REST API, wrapped in its request-context middleware."""
    core: Core = dispatcher.core

    async def predict_raw(name: str, raw: bytes) -> Response:
        """Predict from a raw JSON body (the requests the hot path leaves to the route)."""
        inputs, version, label = predict_request(raw, max_elements)
        result = await dispatcher.predict(name, inputs, version=version, label=label)
        return Response(predict_answer(name, result), media_type="application/json")

    errors_doc: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorOut} for code in (400, 401, 403, 404, 409, 413, 429, 503)
    }
    v1 = APIRouter(prefix="/v1", tags=["models"], responses=errors_doc)

    @v1.post("/models", status_code=201, response_model=ModelOut, operation_id="CreateModel")
    async def create_model(body: CreateModelBody, _: CallerCreateModel) -> ModelOut:
        info = await dispatcher.offload(
            core.create_model, body.name, body.spec, body.settings.given()
        )
        return model_out(info)

    @v1.get("/models", response_model=ModelList, operation_id="ListModels")
    async def list_models(_: CallerListModels) -> ModelList:
        return ModelList(models=[model_out(m) for m in core.list_models()])

    @v1.get("/models/{name}", response_model=ModelOut, operation_id="GetModel")
    async def get_model(name: str, _: CallerGetModel) -> ModelOut:
        return model_out(core.get_model(name))

    @v1.patch("/models/{name}", response_model=ModelOut, operation_id="UpdateModel")
    async def update_model(name: str, body: UpdateModelBody, _: CallerUpdateModel) -> ModelOut:
        return model_out(
            await dispatcher.offload(core.update_settings, name, body.settings.given())
        )

    @v1.delete("/models/{name}", status_code=204, operation_id="DeleteModel")
    async def delete_model(name: str, _: CallerDeleteModel) -> Response:
        await dispatcher.offload(core.delete_model, name)
        return Response(status_code=204)

    @v1.post(
        "/models/{name}/predict",
        response_model=PredictOut,
        operation_id="Predict",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/PredictBody"}}
                },
            }
        },
    )
    async def predict(name: str, request: Request, _: CallerPredict) -> Response:
        return await predict_raw(name, await request.body())

    @v1.post(
        "/models/{name}/train_step",
        response_model=TrainStepOut,
        operation_id="TrainStep",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/TrainStepBody"}}
                },
            }
        },
    )
    async def train_step(name: str, request: Request, _: CallerTrainStep) -> Response:
        body = json_object(await request.body(), matrix="inputs")
        _only(body, {"inputs", "targets", "learning_rate"})
        if "inputs" not in body or "targets" not in body:
            raise errors.InvalidArgument("train_step needs 'inputs' and 'targets'")
        lr = body.get("learning_rate")
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, int | float)):
            raise errors.InvalidArgument("learning_rate must be a number")
        inputs = tensor_json(body["inputs"], "inputs", max_elements, "float64")
        targets = tensor_json(body["targets"], "targets", max_elements)
        outcome = await dispatcher.offload(core.train_step, name, inputs, targets, learning_rate=lr)
        return orjson_response(
            {
                "step": outcome.step,
                "loss": outcome.loss,
                "accuracy": outcome.accuracy,
                "batch_size": outcome.batch_size,
                "saved_version": outcome.saved_version,
            }
        )

    @v1.post(
        "/models/{name}/versions",
        status_code=201,
        response_model=VersionOut,
        operation_id="SaveVersion",
    )
    async def save_version(name: str, _: CallerSaveVersion) -> VersionOut:
        return version_out(await dispatcher.offload(core.save_version, name))

    @v1.get("/models/{name}/versions", response_model=VersionList, operation_id="ListVersions")
    async def list_versions(name: str, _: CallerListVersions) -> VersionList:
        versions = await dispatcher.offload(core.list_versions, name)
        return VersionList(versions=[version_out(v) for v in versions])

    @v1.put("/models/{name}/labels/{label}", response_model=ModelOut, operation_id="SetLabel")
    async def set_label(name: str, label: str, body: LabelBody, _: CallerSetLabel) -> ModelOut:
        return model_out(await dispatcher.offload(core.set_label, name, label, body.version))

    @v1.delete("/models/{name}/labels/{label}", response_model=ModelOut, operation_id="RemoveLabel")
    async def remove_label(name: str, label: str, _: CallerRemoveLabel) -> ModelOut:
        return model_out(await dispatcher.offload(core.remove_label, name, label))

    @v1.post("/models/{name}/rollback", response_model=ModelOut, operation_id="Rollback")
    async def rollback(name: str, body: RollbackBody, _: CallerRollback) -> ModelOut:
        return model_out(
            await dispatcher.offload(core.rollback, name, version=body.version, label=body.label)
        )

    ops = APIRouter(tags=["operations"])

    @ops.get("/healthz", operation_id="Live")
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @ops.get("/readyz", operation_id="Ready", responses={503: {"model": ErrorOut}})
    async def readyz() -> Response:
        """Readiness: the store is open and the server is not draining."""
        if ready():
            return orjson_response({"status": "ready"})
        return error_response("unavailable", "not ready", 503)

    @ops.get("/metrics", operation_id="Metrics", response_class=Response)
    async def metrics_text() -> Response:
        """Prometheus metrics (text exposition format)."""
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    app = FastAPI(
        title="propserve",
        version="0.1.0",
        description="Models served and trained over REST; see also the gRPC API.",
    )
    app.state.auth = auth
    app.include_router(v1)
    app.include_router(ops)

    def request_id(request: Request) -> str:
        return str(request.scope.get("state", {}).get("request_id", "-"))

    @app.exception_handler(errors.PropserveError)
    async def core_error(request: Request, exc: errors.PropserveError) -> Response:
        return failure_response(exc, request.url.path, request_id(request))

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> Response:
        # NOTE: FastAPI validates a declared body before the route's dependencies run; a
        # caller without the right token must hear that first, not what was wrong with the body.
        operation = getattr(request.scope.get("route"), "operation_id", None)
        if operation is not None:
            try:
                auth.authorize(request.headers.get("authorization"), operation)
            except errors.PropserveError as denied:
                return failure_response(denied, request.url.path, request_id(request))
        problems = exc.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            return error_response("invalid_argument", "the body is not valid JSON", 400)
        message = "; ".join(
            f"{'.'.join(str(part) for part in p.get('loc', ()))}: {p.get('msg')}"
            for p in problems[:5]
        )
        return error_response("invalid_argument", message, 422)

    @app.exception_handler(StarletteHTTPException)
    async def framework_error(request: Request, exc: StarletteHTTPException) -> Response:
        """Errors the framework raises itself (unknown path, wrong method, a body that could
        not be read) in the same envelope; one caused by a core error maps as that error."""
        if isinstance(exc.__cause__, errors.PropserveError):
            return failure_response(exc.__cause__, request.url.path, request_id(request))
        code = FRAMEWORK_CODES.get(exc.status_code, "invalid_argument")
        return error_response(code, str(exc.detail), exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        request.scope["state"]["answered"] = True
        return failure_response(exc, request.url.path, request_id(request))

    _declare_schemas(app, PredictBody, TrainStepBody)
    return RequestContext(app, metrics, max_body, large_body_slots=2 * dispatcher.threads)


def _declare_schemas(app: FastAPI, *models: type[BaseModel]) -> None:
    """Add request schemas that routes parse by hand to the OpenAPI components."""
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = default_openapi()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in models:
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, definition in model_schema.pop("$defs", {}).items():
                components.setdefault(name, definition)
            components[model.__name__] = model_schema
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


__all__ = ["PredictHotPath", "create_app"]

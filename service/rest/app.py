"""The REST API as one ASGI app: the predict endpoint ahead of the framework's routes.

Every route only converts between JSON and the data plane's calls. Around the framework's
routes, :class:`RequestContext` opens the data plane's call context (draining, the request
id, authorisation, metrics and logs), holds admission for large bodies, and answers errors
in the API's envelope; the predict endpoint does the same for itself.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message, Receive, Scope, Send

from propserve import wire
from propserve.service import errors
from propserve.service.calls import Call
from propserve.service.dataplane import DataPlane
from propserve.service.metrics import Metrics
from propserve.service.rest import bodies, oip, schemas, ui
from propserve.service.rest.admission import Admission
from propserve.service.rest.errors import JSON, error_answer, error_body
from propserve.service.rest.predict import PredictEndpoint, header, read_body

#: Routes anyone may call, also while the server drains.
OPEN_OPERATIONS = frozenset({"Live", "Ready", "Metrics"}) | oip.OPEN_OPERATIONS

_PREDICT = re.compile(r"/v1/models/([^/]+)/predict")

#: A model or label name in a path: the pattern is documented, and enforced by the core (400).
NameParam = Annotated[str, Path(json_schema_extra={"pattern": f"^{wire.NAME_PATTERN}$"})]
#: A saved version's number in a path.
VersionParam = Annotated[int, Path(ge=1, le=wire.MAX_VERSION)]


def _oip(scope: Scope) -> bool:
    """Whether a request is of the Open Inference Protocol (answered in its envelope)."""
    path: str = scope["path"]
    return path.startswith("/v2/") or path == "/v2"


class RestApp:
    """``POST /v1/models/{name}/predict`` to the predict endpoint, the Open Inference
    Protocol's infer to its endpoint, the rest to the framework."""

    def __init__(
        self, plane: DataPlane, metrics: Metrics, *, ready: Callable[[], bool], version: str
    ) -> None:
        admission = Admission(2 * plane.workers.threads)
        self.predict = PredictEndpoint(plane, admission)
        self.infer = oip.InferEndpoint(plane, admission)
        self.framework = RequestContext(
            create_app(plane, metrics, ready=ready, version=version), plane, admission, metrics
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            match = _PREDICT.fullmatch(path)
            if match is not None:
                scope["path_params"] = {"name": match.group(1)}
                await self.predict(scope, receive, send)
                return
            match = oip.INFER_PATH.fullmatch(path)
            if match is not None:
                scope["path_params"] = {"name": match.group(1), "version": match.group(2) or ""}
                await self.infer(scope, receive, send)
                return
        await self.framework(scope, receive, send)


class RequestContext:
    """Pure ASGI middleware around the framework's routes (see the module's docstring)."""

    def __init__(
        self, app: FastAPI, plane: DataPlane, admission: Admission, metrics: Metrics
    ) -> None:
        self.app = app
        self.plane = plane
        self.admission = admission
        self.metrics = metrics
        self._operations: list[tuple[re.Pattern[str], dict[str, str]]] | None = None

    def operation(self, scope: Scope) -> str | None:
        """The operation the request's route names (its OpenAPI operation id), if any."""
        if self._operations is None:
            self._operations = _operations(self.app.openapi())
        method, path = scope["method"], scope["path"]
        for pattern, methods in self._operations:
            if pattern.fullmatch(path):
                return methods.get(method)
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        operation = self.operation(scope)
        if operation is None or operation in OPEN_OPERATIONS:
            await self._open(operation or "other", scope, receive, send)
            return
        call: Call | None = None
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                assert call is not None
                message["headers"] = [
                    *message.get("headers", []),
                    (wire.REQUEST_ID_KEY.encode(), call.request_id.encode()),
                ]
            await send(message)

        try:
            call = self.plane.call(
                operation,
                "rest",
                request_id=header(scope, b"x-request-id"),
                authorization=header(scope, b"authorization"),
                protocol="oip" if _oip(scope) else "propserve",
            )
            scope.setdefault("state", {})["call"] = call
            with call:
                async with self.admission.slot(scope):
                    await self.app(scope, receive, send_with_id)
        except Exception as exc:
            # A core error answered by a handler is recorded by it (Call.fail); what reaches
            # here is a refusal before the route (draining, authorisation) or a bug, which
            # the framework may have answered already.
            if started:
                return
            status, body, headers = (oip.oip_error_answer if _oip(scope) else error_answer)(
                exc, call
            )
            if call is not None:
                headers.append((wire.REQUEST_ID_KEY.encode(), call.request_id.encode()))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})

    async def _open(self, operation: str, scope: Scope, receive: Receive, send: Send) -> None:
        """A route without the call context (health, metrics, documentation, unknown paths):
        counted by its status."""
        start = time.perf_counter()
        status = 500

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            code = "ok" if status < 400 else wire.code_for_status(http=status).name
            seconds = time.perf_counter() - start
            protocol = "oip" if _oip(scope) else "propserve"
            self.metrics.observe(operation, "rest", code, seconds, protocol=protocol, api=False)


def _operations(openapi: dict[str, Any]) -> list[tuple[re.Pattern[str], dict[str, str]]]:
    """(path pattern, {method: operation id}) of every documented route."""
    table = []
    for template, methods in openapi["paths"].items():
        pattern = re.sub(r"\\{[^/]+\\}", "[^/]+", re.escape(template))
        operations = {
            method.upper(): str(spec["operationId"])
            for method, spec in methods.items()
            if isinstance(spec, dict) and "operationId" in spec
        }
        table.append((re.compile(pattern), operations))
    return table


def _failed(request: Request, exc: errors.PropserveError) -> Response:
    """The answer to a core error raised in a route, recorded in the request's call."""
    call: Call | None = request.scope.get("state", {}).get("call")
    if call is not None:
        call.fail(exc)
    answer = oip.oip_error_answer if _oip(request.scope) else error_answer
    status, body, headers = answer(exc, call)
    extra = {k.decode(): v.decode() for k, v in headers if (k, v) != JSON}
    return Response(body, status, headers=extra, media_type="application/json")


def create_app(
    plane: DataPlane, metrics: Metrics, *, ready: Callable[[], bool], version: str
) -> FastAPI:
    """The framework's routes: models, training, versions, labels, health and metrics."""
    error_responses: dict[int | str, dict[str, Any]] = {
        code.http: {"model": schemas.ErrorOut} for code in wire.CODES if code.http != 504
    }
    v1 = APIRouter(prefix="/v1", tags=["models"], responses=error_responses)

    @v1.post(
        "/models",
        status_code=201,
        response_model=wire.Model,
        operation_id="CreateModel",
        openapi_extra=_create_body_schema(),
        # The body is read by hand (JSON or multipart), so the framework does not add this.
        responses={422: {"model": schemas.ErrorOut, "description": "Validation Error"}},
    )
    async def create_model(request: Request) -> wire.Model:
        body, weights = await bodies.create_model_request(request, plane.max_weights_bytes)
        return await plane.create_model(
            body.name,
            body.spec,
            body.settings.given(),
            weights=weights,
            layout=body.layout or "propserve",
        )

    @v1.get("/models", response_model=schemas.ModelList, operation_id="ListModels")
    async def list_models() -> dict[str, list[wire.Model]]:
        return {"models": await plane.list_models()}

    @v1.get("/models/{name}", response_model=wire.Model, operation_id="GetModel")
    async def get_model(name: NameParam) -> wire.Model:
        return await plane.get_model(name)

    @v1.patch("/models/{name}", response_model=wire.Model, operation_id="UpdateModel")
    async def update_model(name: NameParam, body: schemas.UpdateModelBody) -> wire.Model:
        return await plane.update_model(name, body.settings.given())

    @v1.delete("/models/{name}", status_code=204, operation_id="DeleteModel")
    async def delete_model(name: NameParam) -> Response:
        await plane.delete_model(name)
        return Response(status_code=204)

    @v1.post(
        "/models/{name}/train_step",
        response_model=wire.StepResult,
        operation_id="TrainStep",
        openapi_extra=_body_schema("TrainStepBody"),
    )
    async def train_step(name: NameParam, request: Request) -> wire.StepResult:
        raw = await read_body(request.receive)
        inputs, targets, lr = bodies.train_step_request(raw, plane.max_elements)
        return await plane.train_step(name, inputs, targets, learning_rate=lr)

    @v1.post(
        "/models/{name}/evaluate",
        response_model=wire.Evaluation,
        operation_id="Evaluate",
        openapi_extra=_body_schema("EvaluateBody"),
    )
    async def evaluate(name: NameParam, request: Request) -> wire.Evaluation:
        raw = await read_body(request.receive)
        inputs, targets, version, label = bodies.evaluate_request(raw, plane.max_elements)
        return await plane.evaluate(name, inputs, targets, version=version, label=label)

    @v1.post(
        "/models/{name}/versions",
        status_code=201,
        response_model=wire.Version,
        operation_id="SaveVersion",
    )
    async def save_version(name: NameParam) -> wire.Version:
        return await plane.save_version(name)

    @v1.get(
        "/models/{name}/versions", response_model=schemas.VersionList, operation_id="ListVersions"
    )
    async def list_versions(name: NameParam) -> dict[str, list[wire.Version]]:
        return {"versions": await plane.list_versions(name)}

    @v1.get(
        "/models/{name}/versions/{version}/weights",
        operation_id="ExportWeights",
        response_class=Response,
        responses={
            200: {
                "description": "The file; x-version-sha256 is the stored version's sha256.",
                "content": {media: {} for media in wire.WEIGHT_FORMATS.values()},
            }
        },
    )
    async def export_weights(
        name: NameParam,
        version: VersionParam,
        layout: Annotated[str, Query(json_schema_extra={"enum": list(wire.WEIGHT_LAYOUTS)})] = (
            "propserve"
        ),
        format: Annotated[str, Query(json_schema_extra={"enum": list(wire.WEIGHT_FORMATS)})] = (
            "safetensors"
        ),
    ) -> Response:
        exported = await plane.export_weights(name, version, layout=layout, format=format)
        suffix = "onnx" if exported.format == "onnx" else "safetensors"
        layout_part = "" if exported.layout == "propserve" else f"-{exported.layout}"
        filename = f"{exported.model}-v{exported.version}{layout_part}.{suffix}"
        return Response(
            exported.data,
            media_type=wire.WEIGHT_FORMATS[exported.format],
            headers={
                "x-version-sha256": exported.sha256,
                "x-version-step": str(exported.step),
                "content-disposition": f'attachment; filename="{filename}"',
            },
        )

    @v1.get("/models/{name}/history", response_model=wire.History, operation_id="GetHistory")
    async def history(
        name: NameParam,
        since: Annotated[
            int | None, Query(ge=0, description="First step (default: the first)")
        ] = None,
        until: Annotated[
            int | None, Query(ge=0, description="Last step (default: the last)")
        ] = None,
        every: Annotated[int, Query(ge=1, description="One point per bucket of N steps")] = 1,
        limit: Annotated[
            int | None,
            Query(
                ge=1,
                le=wire.MAX_HISTORY_POINTS,
                description="Most points (default: 10000); next_since continues",
            ),
        ] = None,
    ) -> wire.History:
        return await plane.history(name, since=since, until=until, every=every, limit=limit)

    @v1.put("/models/{name}/labels/{label}", response_model=wire.Model, operation_id="SetLabel")
    async def set_label(name: NameParam, label: NameParam, body: schemas.LabelBody) -> wire.Model:
        return await plane.set_label(name, label, body.version)

    @v1.delete(
        "/models/{name}/labels/{label}",
        response_model=wire.Model,
        operation_id="RemoveLabel",
    )
    async def remove_label(name: NameParam, label: NameParam) -> wire.Model:
        return await plane.remove_label(name, label)

    @v1.post("/models/{name}/rollback", response_model=wire.Model, operation_id="Rollback")
    async def rollback(name: NameParam, body: schemas.RollbackBody) -> wire.Model:
        return await plane.rollback(name, version=body.version, label=body.label)

    ops = APIRouter(tags=["operations"])

    @ops.get("/healthz", operation_id="Live")
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @ops.get("/readyz", operation_id="Ready", responses={503: {"model": schemas.ErrorOut}})
    async def readyz() -> Response:
        """Readiness: the store is open and the server is not draining."""
        if ready():
            return Response(b'{"status":"ready"}', media_type="application/json")
        return Response(error_body("unavailable", "not ready"), 503, media_type="application/json")

    @ops.get("/metrics", operation_id="Metrics", response_class=Response)
    async def metrics_text() -> Response:
        """Prometheus metrics (text exposition format)."""
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    app = FastAPI(
        title="propserve",
        version=version,
        description="Models served and trained over REST; see also the gRPC API.",
    )
    app.include_router(v1)
    app.include_router(oip.router(plane, ready=ready, version=version))
    app.include_router(ops)
    app.include_router(ui.router)
    app.add_exception_handler(errors.PropserveError, _failed)  # type: ignore[arg-type]

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        """A bug in a route: the API's envelope, no internals (the call logs it)."""
        call: Call | None = request.scope.get("state", {}).get("call")
        answer = oip.oip_error_answer if _oip(request.scope) else error_answer
        status, body, _ = answer(exc, call)
        return Response(body, status, media_type="application/json")

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> Response:
        problems = exc.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            failure = errors.InvalidArgument("the body is not valid JSON")
            return _failed(request, failure)
        message = "; ".join(
            f"{'.'.join(str(part) for part in p.get('loc', ()))}: {p.get('msg')}"
            for p in problems[:5]
        )
        response = _failed(request, errors.InvalidArgument(message))
        if not _oip(request.scope):  # the protocol answers a bad request 400
            response.status_code = 422
        return response

    @app.exception_handler(StarletteHTTPException)
    async def framework_error(request: Request, exc: StarletteHTTPException) -> Response:
        """Errors the framework raises itself (unknown path, wrong method), in the API's
        envelope, with the framework's headers (Allow on a 405)."""
        code = wire.code_for_status(http=exc.status_code)
        extra = dict(exc.headers or {})
        if exc.status_code == 405:
            code = wire.INVALID_ARGUMENT
            # Every method the path takes (the framework names only its first route's).
            methods = {
                method
                for pattern, operations in _operations(app.openapi())
                if pattern.fullmatch(request.url.path)
                for method in operations
            }
            if methods:
                extra["allow"] = ", ".join(sorted(methods))
        return Response(
            oip.oip_error_body(str(exc.detail))
            if _oip(request.scope)
            else error_body(code.name, str(exc.detail)),
            exc.status_code,
            headers=extra,
            media_type="application/json",
        )

    _declare_predict(app)
    return app


def _create_body_schema() -> dict[str, Any]:
    body = "#/components/schemas/CreateModelBody"
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": body}},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["model", "weights"],
                        "properties": {
                            "model": {
                                "type": "string",
                                "description": "The JSON body, without weights.",
                            },
                            "weights": {"type": "string", "format": "binary"},
                        },
                    }
                },
            },
        }
    }


def _body_schema(model: str) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model}"}}},
        }
    }


def _declare_predict(app: FastAPI) -> None:
    """Document the predict endpoint (served ahead of the framework) and the hand-parsed
    bodies in /openapi.json."""
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = default_openapi()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (
            schemas.CreateModelBody,
            schemas.PredictBody,
            schemas.PredictOut,
            schemas.TrainStepBody,
            schemas.EvaluateBody,
        ):
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, definition in model_schema.pop("$defs", {}).items():
                components.setdefault(name, definition)
            components[model.__name__] = model_schema
        train_step = schema["paths"]["/v1/models/{name}/train_step"]["post"]
        NameParameter = train_step["parameters"][0]
        schema["paths"]["/v1/models/{name}/predict"] = {
            "post": {
                "tags": ["models"],
                "summary": "Predict",
                "operationId": "Predict",
                "parameters": [NameParameter],
                **_body_schema("PredictBody"),
                "responses": {
                    "200": {
                        "description": "Successful Response",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/PredictOut"}
                            }
                        },
                    },
                    **{
                        str(status): value
                        for status, value in train_step["responses"].items()
                        if status not in ("200", "422")
                    },
                },
            }
        }
        _declare_infer(schema, NameParameter)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _declare_infer(schema: dict[str, Any], name_parameter: dict[str, Any]) -> None:
    """The Open Inference Protocol's infer endpoint (served ahead of the framework)."""
    components = schema["components"]["schemas"]
    components["OipInferRequest"] = oip.INFER_REQUEST_SCHEMA
    components["OipInferResponse"] = oip.INFER_RESPONSE_SCHEMA
    components["OipError"] = oip.ERROR_SCHEMA
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/OipError"}}}}
    responses = {
        "200": {
            "description": "The outputs (JSON, or binary after a JSON header)",
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/OipInferResponse"}}
            },
        },
        **{
            str(code.http): {"description": code.meaning, **error}
            for code in wire.CODES
            if code.http != 504
        },
    }
    version_parameter = {
        "name": "model_version",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": r"^([0-9]+|[A-Za-z0-9._-]+)$"},
    }
    for path, parameters in (
        ("/v2/models/{name}/infer", [name_parameter]),
        ("/v2/models/{name}/versions/{model_version}/infer", [name_parameter, version_parameter]),
    ):
        schema["paths"][path] = {
            "post": {
                "tags": ["open inference protocol"],
                "summary": "Infer",
                "operationId": "ModelInfer" if len(parameters) == 1 else "ModelVersionInfer",
                "parameters": parameters,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/OipInferRequest"}
                        }
                    },
                },
                "responses": responses,
            }
        }


__all__ = ["RestApp", "create_app"]

"""``POST /v1/models/{name}/predict`` as a plain ASGI endpoint, ahead of the framework.

A single-row prediction costs less than the framework's routing, dependency and response
machinery around it (see docs/performance.md#rest-predict), so this route is served here on
ASGI alone, through the same data plane, body rules, error mapping and admission control as
every other route; its schema is still declared in /openapi.json.
"""

from __future__ import annotations

from starlette.types import Receive, Scope, Send

from propserve import wire
from propserve.service.calls import Call
from propserve.service.dataplane import DataPlane
from propserve.service.models import Prediction
from propserve.service.rest import bodies
from propserve.service.rest.admission import Admission
from propserve.service.rest.errors import JSON, error_answer


async def read_body(receive: Receive) -> bytes:
    """The whole request body (the HTTP server bounds its size)."""
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body"):
        return body
    parts = [body]
    while message.get("more_body"):
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        parts.append(message.get("body", b""))
    return b"".join(parts)


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of header ``name`` (lower case), decoded as latin-1."""
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def call_headers(scope: Scope, extra: bytes = b"") -> tuple[str | None, str | None, str | None]:
    """The first request id, authorization and ``extra`` header values (latin-1), read in
    one pass over the headers."""
    request_id = authorization = other = None
    for key, value in scope["headers"]:
        if key == b"x-request-id":
            request_id = request_id or value.decode("latin-1")
        elif key == b"authorization":
            authorization = authorization or value.decode("latin-1")
        elif key == extra:
            other = other or value.decode("latin-1")
    return request_id, authorization, other


class PredictEndpoint:
    """The predict route; ``scope["path_params"]["name"]`` names the model."""

    def __init__(self, plane: DataPlane, admission: Admission) -> None:
        self.plane = plane
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        name: str = scope["path_params"]["name"]
        plane = self.plane
        call: Call | None = None
        request_id, authorization, _ = call_headers(scope)
        try:
            call = plane.call("Predict", "rest", request_id=request_id, authorization=authorization)
            with call:
                if self.admission.is_large(scope):
                    async with self.admission.slot(scope):
                        result = await self._predict(name, receive)
                else:
                    result = await self._predict(name, receive)
            status, payload, headers = 200, bodies.predict_answer(name, result), [JSON]
        except Exception as exc:
            status, payload, headers = error_answer(exc, call)
        rid = call.request_id if call is not None else ""
        headers.append((wire.REQUEST_ID_KEY.encode(), rid.encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    async def _predict(self, name: str, receive: Receive) -> Prediction:
        raw = await read_body(receive)
        inputs, version, label = bodies.predict_request(raw, self.plane.max_elements)
        return await self.plane.predict(name, inputs, version=version, label=label)

"""REST clients: :class:`RestClient` (blocking) and :class:`AsyncRestClient` (asyncio), over
httpx, with the same methods and return types as the gRPC clients.

``train`` sends one ``train_step`` request per batch (REST has no streams). The methods are
propserve.clients.client's; this module holds the codec (paths and JSON bodies) and each
flavour's I/O.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import secrets
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlencode, urlsplit

import httpx
import numpy as np
from numpy.typing import NDArray

from propserve import wire
from propserve.clients import errors
from propserve.clients._retry import RetryPolicy
from propserve.clients.arguments import DTYPE_NAMES, to_json
from propserve.clients.calls import Call
from propserve.clients.client import AsyncClient, Client
from propserve.clients.types import (
    Evaluation,
    History,
    HistoryPoint,
    Model,
    Prediction,
    StepResult,
    Version,
    WeightsFile,
)

T = TypeVar("T")


def translate(response: httpx.Response) -> errors.ClientError:
    """The client's own exception for an error response: by the code in its body, else (a
    proxy's answer, say) by the status; the request id from its header."""
    try:
        detail = json.loads(response.content)["error"]
        name, message = str(detail["code"]), str(detail["message"])
    except (ValueError, KeyError, TypeError):
        name = wire.code_for_status(http=response.status_code).name
        message = response.text[:500] or response.reason_phrase
    if name not in wire.BY_NAME:
        name = wire.code_for_status(http=response.status_code).name
    retry_after = _milliseconds(response.headers.get(wire.RETRY_AFTER_MS_KEY))
    if retry_after is None:
        retry_after = _seconds(response.headers.get("retry-after"))
    return errors.from_code(
        name,
        message,
        status=response.status_code,
        request_id=response.headers.get(wire.REQUEST_ID_KEY),
        retry_after=retry_after,
    )


def _milliseconds(value: str | None) -> float | None:
    try:
        return max(0.0, int(value) / 1000) if value is not None else None
    except ValueError:
        return None


def _seconds(value: str | None) -> float | None:
    """A Retry-After header's delay in seconds (the HTTP-date form is not used here)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def transport_error(exc: httpx.HTTPError) -> errors.ClientError:
    if isinstance(exc, httpx.TimeoutException):
        return errors.DeadlineExceeded(f"no answer in time: {exc}")
    return errors.Unavailable(f"cannot reach the server: {exc}")


# -- the codec ----------------------------------------------------------------------------

#: How tensors travel in JSON bodies: "base64" (the bytes, base64-encoded, with shape and
#: dtype: exact, and far cheaper to encode and decode) or "json" (numbers written out).
TENSOR_ENCODINGS = ("base64", "json")


@dataclass(frozen=True)
class RestRequest:
    """An HTTP request: method, path under the base URL, and body (JSON unless
    ``content_type`` says otherwise)."""

    method: str
    path: str
    body: str | bytes | None = None
    content_type: str | None = None


def tensor_json(array: NDArray[Any], encoding: str) -> dict[str, Any]:
    """A wire array (propserve.clients.arguments.tensor) for a JSON body: {b64, shape,
    dtype} or {data, shape, dtype}, which keep the dtype across JSON."""
    dtype = DTYPE_NAMES[array.dtype]
    if encoding == "base64":
        return {
            "b64": base64.b64encode(array.data).decode("ascii"),
            "shape": list(array.shape),
            "dtype": dtype,
        }
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        # NOTE: JSON has no NaN or Infinity; they would arrive as null and read as garbage.
        raise errors.InvalidArgument(
            "the tensor contains a non-finite value (NaN or Inf), "
            "which JSON cannot carry and the model would refuse"
        )
    return {"data": array.reshape(-1).tolist(), "shape": list(array.shape), "dtype": dtype}


def _fields(cls: Any, data: dict[str, Any]) -> dict[str, Any]:
    """The members of a JSON object that ``cls`` (a dataclass with the same names) takes."""
    return {field.name: data[field.name] for field in dataclasses.fields(cls)}


def model_from(data: dict[str, Any]) -> Model:
    return Model(**_fields(Model, data))


def version_from(data: dict[str, Any]) -> Version:
    return Version(**_fields(Version, data) | {"labels": tuple(data["labels"])})


def step_from(data: dict[str, Any]) -> StepResult:
    return StepResult(**_fields(StepResult, data))


def evaluation_from(data: dict[str, Any]) -> Evaluation:
    return Evaluation(**_fields(Evaluation, data))


def prediction_from(data: dict[str, Any]) -> Prediction:
    outputs = np.asarray(data["outputs"], dtype=wire.DTYPES[data["dtype"]])
    return Prediction(outputs, data["version"], data["step"])


def _reading(read: Callable[[Any], T]) -> Callable[[httpx.Response], T]:
    """A reader of a response's JSON; one it cannot read raises a ClientError carrying the
    response's status and request id (not a raw exception)."""

    def checked(response: httpx.Response) -> T:
        try:
            return read(json.loads(response.content) if response.content else None)
        except (ValueError, TypeError, KeyError) as exc:
            raise errors.ClientError(
                f"the server's answer could not be read: {exc!r}",
                status=response.status_code,
                request_id=response.headers.get(wire.REQUEST_ID_KEY),
            ) from None

    return checked


_read_model = _reading(model_from)
_read_step = _reading(step_from)


def history_from(data: dict[str, Any]) -> History:
    points = tuple(HistoryPoint(**_fields(HistoryPoint, p)) for p in data["points"])
    return History(data["model"], points, data["next_since"])


def _weights_reader(
    name: str, version: int, layout: str, format: str
) -> Callable[[httpx.Response], WeightsFile]:
    """A reader of an export's answer: the file, with the step and sha256 its headers give."""

    def read(response: httpx.Response) -> WeightsFile:
        headers = response.headers
        try:
            step, sha256 = int(headers["x-version-step"]), headers["x-version-sha256"]
        except (ValueError, KeyError) as exc:
            raise errors.ClientError(
                f"the server's answer could not be read: {exc!r}",
                status=response.status_code,
                request_id=headers.get(wire.REQUEST_ID_KEY),
            ) from None
        return WeightsFile(name, version, step, format, layout, sha256, response.content)

    return read


def multipart(parts: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body of (name, content type, bytes) parts, and its content
    type; a part whose type is not JSON is sent as a file."""
    boundary = f"propserve-{secrets.token_hex(16)}"
    chunks = []
    for name, kind, data in parts:
        filename = "" if kind == "application/json" else f'; filename="{name}"'
        chunks.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{filename}\r\n'
            f"Content-Type: {kind}\r\n\r\n".encode()
        )
        chunks.extend((data, b"\r\n"))
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def _segment(value: str) -> str:
    """A path segment, percent-encoded so that no name can change the path."""
    return quote(str(value), safe="")


class RestCodec:
    """The REST API's paths and bodies for each operation, and how to read its answers."""

    def __init__(self, tensor_encoding: str) -> None:
        if tensor_encoding not in TENSOR_ENCODINGS:
            raise ValueError(
                f"tensor_encoding must be one of {', '.join(TENSOR_ENCODINGS)}, "
                f"got {tensor_encoding!r}"
            )
        self.tensor_encoding = tensor_encoding

    def create_model(
        self,
        name: str,
        spec: dict[str, Any],
        settings: dict[str, int],
        weights: bytes | None,
        layout: str,
    ) -> Call[Model]:
        fields: dict[str, Any] = {"name": name, "spec": spec, "settings": settings}
        if weights is None:
            return Call(RestRequest("POST", "/v1/models", to_json(fields)), _read_model)
        # The weights travel as a file part: base64 in JSON would add a third.
        model = to_json(fields | {"layout": layout}).encode()
        body, kind = multipart(
            [("model", "application/json", model), ("weights", "application/octet-stream", weights)]
        )
        return Call(RestRequest("POST", "/v1/models", body, kind), _read_model)

    def get_model(self, name: str) -> Call[Model]:
        return Call(RestRequest("GET", f"/v1/models/{_segment(name)}"), _read_model)

    def list_models(self) -> Call[list[Model]]:
        return Call(
            RestRequest("GET", "/v1/models"),
            _reading(lambda data: [model_from(m) for m in data["models"]]),
        )

    def delete_model(self, name: str) -> Call[None]:
        return Call(RestRequest("DELETE", f"/v1/models/{_segment(name)}"), lambda _: None)

    def update_model(self, name: str, settings: dict[str, int]) -> Call[Model]:
        body = to_json({"settings": settings})
        return Call(RestRequest("PATCH", f"/v1/models/{_segment(name)}", body), _read_model)

    def predict(
        self, name: str, inputs: NDArray[Any], version: int | None, label: str | None
    ) -> Call[Prediction]:
        body: dict[str, Any] = {"inputs": tensor_json(inputs, self.tensor_encoding)}
        if version is not None:
            body["version"] = version
        if label is not None:
            body["label"] = label
        path = f"/v1/models/{_segment(name)}/predict"
        return Call(RestRequest("POST", path, to_json(body)), _reading(prediction_from))

    def evaluate(
        self,
        name: str,
        inputs: NDArray[Any],
        targets: NDArray[Any],
        version: int | None,
        label: str | None,
    ) -> Call[Evaluation]:
        body: dict[str, Any] = {
            "inputs": tensor_json(inputs, self.tensor_encoding),
            "targets": tensor_json(targets, self.tensor_encoding),
        }
        if version is not None:
            body["version"] = version
        if label is not None:
            body["label"] = label
        path = f"/v1/models/{_segment(name)}/evaluate"
        return Call(RestRequest("POST", path, to_json(body)), _reading(evaluation_from))

    def train_step(
        self,
        name: str,
        inputs: NDArray[Any],
        targets: NDArray[Any],
        learning_rate: float | None,
    ) -> Call[StepResult]:
        body: dict[str, Any] = {
            "inputs": tensor_json(inputs, self.tensor_encoding),
            "targets": tensor_json(targets, self.tensor_encoding),
        }
        if learning_rate is not None:
            body["learning_rate"] = learning_rate
        path = f"/v1/models/{_segment(name)}/train_step"
        return Call(RestRequest("POST", path, to_json(body)), _read_step)

    def save_version(self, name: str) -> Call[Version]:
        path = f"/v1/models/{_segment(name)}/versions"
        return Call(RestRequest("POST", path), _reading(version_from))

    def list_versions(self, name: str) -> Call[list[Version]]:
        return Call(
            RestRequest("GET", f"/v1/models/{_segment(name)}/versions"),
            _reading(lambda data: [version_from(v) for v in data["versions"]]),
        )

    def set_label(self, name: str, label: str, version: int) -> Call[Model]:
        path = f"/v1/models/{_segment(name)}/labels/{_segment(label)}"
        return Call(RestRequest("PUT", path, to_json({"version": version})), _read_model)

    def remove_label(self, name: str, label: str) -> Call[Model]:
        path = f"/v1/models/{_segment(name)}/labels/{_segment(label)}"
        return Call(RestRequest("DELETE", path), _read_model)

    def rollback(self, name: str, version: int | None, label: str | None) -> Call[Model]:
        body = to_json({"version": version} if version is not None else {"label": label})
        path = f"/v1/models/{_segment(name)}/rollback"
        return Call(RestRequest("POST", path, body), _read_model)

    def export_weights(
        self, name: str, version: int, layout: str, format: str
    ) -> Call[WeightsFile]:
        query = urlencode({"layout": layout, "format": format})
        path = f"/v1/models/{_segment(name)}/versions/{version}/weights?{query}"
        return Call(RestRequest("GET", path), _weights_reader(name, version, layout, format))

    def history(
        self, name: str, since: int | None, until: int | None, every: int, limit: int | None
    ) -> Call[History]:
        given = {"since": since, "until": until, "every": every, "limit": limit}
        query = urlencode({k: v for k, v in given.items() if v is not None})
        path = f"/v1/models/{_segment(name)}/history?{query}"
        return Call(RestRequest("GET", path), _reading(history_from))


# -- the two flavours' I/O -----------------------------------------------------------------


def base_url(url: str) -> str:
    """``url`` without a trailing slash; it must be http:// or https://."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(
            f"the REST URL must start with http:// or https://, got {url!r} "
            f"(for a server at {url}, give http://{url})"
        )
    return url.rstrip("/")


class _Headers:
    """The headers of each request: the client's, and the body's own content type."""

    _headers: dict[str, str]

    def _request_headers(self, request: RestRequest) -> dict[str, str]:
        if request.content_type is None:
            return self._headers
        return self._headers | {"content-type": request.content_type}


def _headers(token: str | None) -> dict[str, str]:
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    return headers


def _verify(root_certificates: Path | None, http_client: object) -> ssl.SSLContext | bool:
    if http_client is not None:
        if root_certificates is not None:
            raise ValueError(
                "root_certificates sets up the HTTP client the client makes; with "
                "http_client= given, set up that client instead"
            )
        return True
    # A context that trusts exactly the given roots (httpx no longer takes a file path).
    return ssl.create_default_context(cafile=str(root_certificates)) if root_certificates else True


class RestClient(_Headers, Client):
    """A blocking client for propserve's REST API at ``url`` (e.g. http://127.0.0.1:8000).

    ``token`` is a bearer token; ``root_certificates`` a PEM file to trust for https;
    ``timeout`` each request's limit in seconds. Idempotent calls (predict, get, list) retry
    on Unavailable and TooBusy per ``retry``. Tensors travel as base64 of their bytes unless
    ``tensor_encoding`` is "json" (numbers written out: readable, slower to decode).

    ``http_client``: an ``httpx.Client`` of your own (proxies, limits, event hooks,
    transports), used instead of one the client makes. Requests go to ``url`` (its base URL
    is not used) with the token and ``timeout`` of this client. You keep it: :meth:`close`
    closes only an HTTP client the client made.
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        token: str | None = None,
        root_certificates: Path | None = None,
        timeout: float | None = 30.0,
        retry: RetryPolicy | None = None,
        tensor_encoding: str = "base64",
        http_client: httpx.Client | None = None,
    ) -> None:
        super().__init__(RestCodec(tensor_encoding), timeout=timeout, retry=retry)
        self.url = base_url(url)
        verify = _verify(root_certificates, http_client)
        self._headers = _headers(token)
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.Client(verify=verify)

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def _send(self, request: RestRequest) -> httpx.Response:
        try:
            response = self._http.request(
                request.method,
                self.url + request.path,
                content=request.body,
                headers=self._request_headers(request),
                timeout=self.timeout,
            )
        except httpx.HTTPError as exc:
            raise transport_error(exc) from None
        if response.status_code >= 400:
            raise translate(response)
        return response

    def _stream(self, requests: Iterator[RestRequest]) -> Generator[httpx.Response, None, None]:
        for request in requests:
            yield self._send(request)


class AsyncRestClient(_Headers, AsyncClient):
    """The asyncio twin of :class:`RestClient`: the same arguments (``http_client``: an
    ``httpx.AsyncClient``) and methods, awaited."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        token: str | None = None,
        root_certificates: Path | None = None,
        timeout: float | None = 30.0,
        retry: RetryPolicy | None = None,
        tensor_encoding: str = "base64",
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(RestCodec(tensor_encoding), timeout=timeout, retry=retry)
        self.url = base_url(url)
        verify = _verify(root_certificates, http_client)
        self._headers = _headers(token)
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.AsyncClient(verify=verify)

    async def close(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def _send(self, request: RestRequest) -> httpx.Response:
        try:
            response = await self._http.request(
                request.method,
                self.url + request.path,
                content=request.body,
                headers=self._request_headers(request),
                timeout=self.timeout,
            )
        except httpx.HTTPError as exc:
            raise transport_error(exc) from None
        if response.status_code >= 400:
            raise translate(response)
        return response

    async def _stream(
        self, requests: AsyncIterator[RestRequest]
    ) -> AsyncGenerator[httpx.Response, None]:
        async for request in requests:
            yield await self._send(request)

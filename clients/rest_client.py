"""REST clients: :class:`RestClient` (blocking) and :class:`AsyncRestClient` (asyncio), over
httpx, with the same methods and return types as the gRPC clients.

``train`` sends one ``train_step`` request per batch (REST has no streams).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import ssl
from collections.abc import AsyncIterable, Iterable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from propserve import wire
from propserve.clients import errors
from propserve.clients._progress import Progress
from propserve.clients._retry import NO_RETRY, RetryPolicy
from propserve.clients.types import Model, Prediction, StepResult, Version, as_array


def translate(response: httpx.Response) -> errors.ClientError:
    """The client's own exception for an error response: by the code in its body, else (a
    proxy's answer, say) by the status."""
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


#: How tensors travel in JSON bodies: "base64" (the bytes, base64-encoded, with shape and
#: dtype: exact, and far cheaper to encode and decode) or "json" (numbers written out).
TENSOR_ENCODINGS = ("base64", "json")


def tensor_json(value: Any, encoding: str = "base64") -> Any:
    """A tensor for a JSON body: {b64, shape, dtype} or {data, shape, dtype}, which keep the
    dtype across JSON."""
    array = as_array(value)
    if array.dtype.kind not in "biuf":
        raise errors.InvalidArgument(f"cannot send an array of dtype {array.dtype}")
    if array.dtype.kind == "b":
        array = array.astype(np.float32)
    dtype = {
        "f": "float64" if array.dtype.itemsize > 4 else "float32",
        "i": "int64" if array.dtype.itemsize > 4 else "int32",
        "u": "int64",
    }[array.dtype.kind]
    if encoding == "base64":
        if array.dtype.kind == "u" and array.size and array.max() > np.iinfo(np.int64).max:
            raise errors.InvalidArgument("values out of the range of int64")
        data = np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<"))
        return {
            "b64": base64.b64encode(data.data).decode("ascii"),
            "shape": list(array.shape),
            "dtype": dtype,
        }
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        # NOTE: JSON has no NaN or Infinity; they would arrive as null and read as garbage.
        raise errors.InvalidArgument(
            "the tensor contains a non-finite value (NaN or Inf), "
            "which JSON cannot carry and the model would refuse"
        )
    return {"data": array.reshape(-1), "shape": list(array.shape), "dtype": dtype}


def _encoding(tensor_encoding: str) -> str:
    if tensor_encoding not in TENSOR_ENCODINGS:
        raise ValueError(
            f"tensor_encoding must be one of {', '.join(TENSOR_ENCODINGS)}, got {tensor_encoding!r}"
        )
    return tensor_encoding


def dumps(body: Any) -> bytes:
    """A JSON body; numbers that JSON cannot carry (NaN, infinities) are refused."""
    try:
        return json.dumps(body, default=_plain, allow_nan=False, separators=(",", ":")).encode()
    except ValueError:
        raise errors.InvalidArgument(
            "a number in the request is not finite (NaN or infinite), which JSON cannot carry"
        ) from None


def _plain(value: Any) -> Any:
    """numpy values as JSON's lists and numbers."""
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def _fields(cls: Any, data: dict[str, Any]) -> dict[str, Any]:
    """The members of a JSON object that ``cls`` (a dataclass with the same names) takes."""
    return {field.name: data[field.name] for field in dataclasses.fields(cls)}


def model_from(data: dict[str, Any]) -> Model:
    return Model(**_fields(Model, data))


def version_from(data: dict[str, Any]) -> Version:
    return Version(**_fields(Version, data) | {"labels": tuple(data["labels"])})


def step_from(data: dict[str, Any]) -> StepResult:
    return StepResult(**_fields(StepResult, data))


def prediction_from(data: dict[str, Any]) -> Prediction:
    outputs = np.asarray(data["outputs"], dtype=data.get("dtype", "float64"))
    return Prediction(outputs, data["version"], data["step"])


def _settings(retain: int | None, autosave_every: int | None) -> dict[str, int]:
    settings = {"retain": retain, "autosave_every": autosave_every}
    return {k: v for k, v in settings.items() if v is not None}


def _predict_body(
    inputs: Any, version: int | None, label: str | None, encoding: str
) -> dict[str, Any]:
    if version is not None and label is not None:
        raise errors.InvalidArgument("give a version or a label, not both")
    body: dict[str, Any] = {"inputs": tensor_json(inputs, encoding)}
    if version is not None:
        body["version"] = version
    if label is not None:
        body["label"] = label
    return body


def _step_body(
    inputs: Any, targets: Any, learning_rate: float | None, encoding: str
) -> dict[str, Any]:
    body = {"inputs": tensor_json(inputs, encoding), "targets": tensor_json(targets, encoding)}
    if learning_rate is not None:
        body["learning_rate"] = learning_rate
    return body


def _rollback_body(version: int | None, label: str | None) -> dict[str, Any]:
    if (version is None) == (label is None):
        raise errors.InvalidArgument("rollback needs exactly one of version or label")
    return {"version": version} if version is not None else {"label": label}


def _client_options(
    url: str, token: str | None, timeout: float | None, root_certificates: Path | None
) -> dict[str, Any]:
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    # A context that trusts exactly the given roots (httpx no longer takes a file path).
    verify: Any = (
        ssl.create_default_context(cafile=str(root_certificates)) if root_certificates else True
    )
    return {"base_url": url.rstrip("/"), "headers": headers, "timeout": timeout, "verify": verify}


class RestClient:
    """A blocking client for propserve's REST API at ``url`` (e.g. http://127.0.0.1:8000).

    ``token`` is a bearer token; ``root_certificates`` a PEM file to trust for https;
    ``timeout`` each request's limit in seconds. Idempotent calls (predict, get, list) retry
    on Unavailable per ``retry``. Tensors travel as base64 of their bytes unless
    ``tensor_encoding`` is "json" (numbers written out, readable, ~6x slower to decode).
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
    ) -> None:
        self.retry = retry or RetryPolicy()
        self.tensor_encoding = _encoding(tensor_encoding)
        self._http = httpx.Client(**_client_options(url, token, timeout, root_certificates))

    def __enter__(self) -> RestClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, body: Any = None, *, retry: bool = False) -> Any:
        content = None if body is None else dumps(body)

        def once() -> Any:
            try:
                response = self._http.request(method, path, content=content)
            except httpx.HTTPError as exc:
                raise transport_error(exc) from None
            if response.status_code >= 400:
                raise translate(response)
            return json.loads(response.content) if response.content else None

        return (self.retry if retry else NO_RETRY).call(once)

    def create_model(
        self,
        name: str,
        spec: dict[str, Any],
        *,
        retain: int | None = None,
        autosave_every: int | None = None,
    ) -> Model:
        body = {"name": name, "spec": spec, "settings": _settings(retain, autosave_every)}
        return model_from(self._call("POST", "/v1/models", body))

    def get_model(self, name: str) -> Model:
        return model_from(self._call("GET", f"/v1/models/{_segment(name)}", retry=True))

    def list_models(self) -> list[Model]:
        return [model_from(m) for m in self._call("GET", "/v1/models", retry=True)["models"]]

    def delete_model(self, name: str) -> None:
        self._call("DELETE", f"/v1/models/{_segment(name)}")

    def update_model(
        self, name: str, *, retain: int | None = None, autosave_every: int | None = None
    ) -> Model:
        body = {"settings": _settings(retain, autosave_every)}
        return model_from(self._call("PATCH", f"/v1/models/{_segment(name)}", body))

    def predict(
        self, name: str, inputs: Any, *, version: int | None = None, label: str | None = None
    ) -> Prediction:
        return prediction_from(
            self._call(
                "POST",
                f"/v1/models/{_segment(name)}/predict",
                _predict_body(inputs, version, label, self.tensor_encoding),
                retry=True,
            )
        )

    def train_step(
        self, name: str, inputs: Any, targets: Any, *, learning_rate: float | None = None
    ) -> StepResult:
        return step_from(
            self._call(
                "POST",
                f"/v1/models/{_segment(name)}/train_step",
                _step_body(inputs, targets, learning_rate, self.tensor_encoding),
            )
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
        """One train_step request per batch, in order; never retried (a failure raises and
        the steps before it stay applied)."""
        display = (
            progress if isinstance(progress, Progress) else (Progress(total) if progress else None)
        )
        results: list[StepResult] = []
        try:
            for x, y in batches:
                results.append(self.train_step(name, x, y, learning_rate=learning_rate))
                if display:
                    display.update(results[-1])
        finally:
            if display and not isinstance(progress, Progress):
                display.close()
        return results

    def save_version(self, name: str) -> Version:
        return version_from(self._call("POST", f"/v1/models/{_segment(name)}/versions"))

    def list_versions(self, name: str) -> list[Version]:
        data = self._call("GET", f"/v1/models/{_segment(name)}/versions", retry=True)
        return [version_from(v) for v in data["versions"]]

    def set_label(self, name: str, label: str, version: int) -> Model:
        path = f"/v1/models/{_segment(name)}/labels/{_segment(label)}"
        return model_from(self._call("PUT", path, {"version": version}))

    def remove_label(self, name: str, label: str) -> Model:
        path = f"/v1/models/{_segment(name)}/labels/{_segment(label)}"
        return model_from(self._call("DELETE", path))

    def rollback(self, name: str, *, version: int | None = None, label: str | None = None) -> Model:
        return model_from(
            self._call(
                "POST", f"/v1/models/{_segment(name)}/rollback", _rollback_body(version, label)
            )
        )


class AsyncRestClient:
    """The asyncio twin of :class:`RestClient`: the same methods, awaited."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        token: str | None = None,
        root_certificates: Path | None = None,
        timeout: float | None = 30.0,
        retry: RetryPolicy | None = None,
        tensor_encoding: str = "base64",
    ) -> None:
        self.retry = retry or RetryPolicy()
        self.tensor_encoding = _encoding(tensor_encoding)
        self._http = httpx.AsyncClient(**_client_options(url, token, timeout, root_certificates))

    async def __aenter__(self) -> AsyncRestClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, body: Any = None, *, retry: bool = False) -> Any:
        content = None if body is None else dumps(body)

        async def once() -> Any:
            try:
                response = await self._http.request(method, path, content=content)
            except httpx.HTTPError as exc:
                raise transport_error(exc) from None
            if response.status_code >= 400:
                raise translate(response)
            return json.loads(response.content) if response.content else None

        return await (self.retry if retry else NO_RETRY).acall(once)

    async def create_model(
        self,
        name: str,
        spec: dict[str, Any],
        *,
        retain: int | None = None,
        autosave_every: int | None = None,
    ) -> Model:
        body = {"name": name, "spec": spec, "settings": _settings(retain, autosave_every)}
        return model_from(await self._call("POST", "/v1/models", body))

    async def get_model(self, name: str) -> Model:
        return model_from(await self._call("GET", f"/v1/models/{_segment(name)}", retry=True))

    async def list_models(self) -> list[Model]:
        data = await self._call("GET", "/v1/models", retry=True)
        return [model_from(m) for m in data["models"]]

    async def delete_model(self, name: str) -> None:
        await self._call("DELETE", f"/v1/models/{_segment(name)}")

    async def update_model(
        self, name: str, *, retain: int | None = None, autosave_every: int | None = None
    ) -> Model:
        body = {"settings": _settings(retain, autosave_every)}
        return model_from(await self._call("PATCH", f"/v1/models/{_segment(name)}", body))

    async def predict(
        self, name: str, inputs: Any, *, version: int | None = None, label: str | None = None
    ) -> Prediction:
        data = await self._call(
            "POST",
            f"/v1/models/{_segment(name)}/predict",
            _predict_body(inputs, version, label, self.tensor_encoding),
            retry=True,
        )
        return prediction_from(data)

    async def train_step(
        self, name: str, inputs: Any, targets: Any, *, learning_rate: float | None = None
    ) -> StepResult:
        return step_from(
            await self._call(
                "POST",
                f"/v1/models/{_segment(name)}/train_step",
                _step_body(inputs, targets, learning_rate, self.tensor_encoding),
            )
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
        display = Progress(total) if progress else None
        results: list[StepResult] = []

        async def step(x: Any, y: Any) -> None:
            results.append(await self.train_step(name, x, y, learning_rate=learning_rate))
            if display:
                display.update(results[-1])

        try:
            if isinstance(batches, AsyncIterable):
                async for x, y in batches:
                    await step(x, y)
            else:
                for x, y in batches:
                    await step(x, y)
        finally:
            if display:
                display.close()
        return results

    async def save_version(self, name: str) -> Version:
        return version_from(await self._call("POST", f"/v1/models/{_segment(name)}/versions"))

    async def list_versions(self, name: str) -> list[Version]:
        data = await self._call("GET", f"/v1/models/{_segment(name)}/versions", retry=True)
        return [version_from(v) for v in data["versions"]]

    async def set_label(self, name: str, label: str, version: int) -> Model:
        path = f"/v1/models/{_segment(name)}/labels/{_segment(label)}"
        return model_from(await self._call("PUT", path, {"version": version}))

    async def remove_label(self, name: str, label: str) -> Model:
        path = f"/v1/models/{_segment(name)}/labels/{_segment(label)}"
        return model_from(await self._call("DELETE", path))

    async def rollback(
        self, name: str, *, version: int | None = None, label: str | None = None
    ) -> Model:
        return model_from(
            await self._call(
                "POST", f"/v1/models/{_segment(name)}/rollback", _rollback_body(version, label)
            )
        )


def _segment(value: str) -> str:
    """A path segment, percent-encoded so that no name can change the path."""
    from urllib.parse import quote  # noqa: PLC0415 - small and only here

    return quote(str(value), safe="")

"""REST bodies that carry tensors (predict, train_step), parsed by hand into numpy arrays.

Validating a large list of numbers element by element through pydantic costs far more than
numpy does (see docs/performance.md#json-numbers), so these bodies are read with orjson (or
simdjson for a matrix of numbers, see jsonnumbers) and checked here, against the same rules
their schemas (propserve.service.rest.schemas) state for /openapi.json: known fields only,
a field either absent or of its type (an explicit null is refused), strict integers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson
import pybase64
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from numpy.typing import NDArray
from pydantic import ValidationError
from starlette.datastructures import UploadFile as StarletteUpload
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from propserve import wire
from propserve.service import tensors
from propserve.service.errors import InvalidArgument, PropserveError, ResourceExhausted
from propserve.service.models import Prediction
from propserve.service.rest import jsonnumbers, schemas


def json_object(raw: bytes, matrix: str | None = None) -> dict[str, Any]:
    """The JSON object of a body. A ``matrix`` member that is a rectangular rank-2 array of
    numbers comes back as a float64 numpy array (see jsonnumbers)."""
    if matrix is not None:
        fast = jsonnumbers.object_with_matrix(raw, matrix)
        if fast is not None:
            return fast
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidArgument("the body must be a JSON object")
    return body


def tensor(value: Any, what: str, max_elements: int, dtype: str | None = None) -> NDArray[Any]:
    """A JSON tensor (nested lists, {data, shape[, dtype]} or {b64, shape, dtype}) as a numpy
    array.

    ``dtype`` is the default when the body names none: inputs are features, so JSON integers
    there are floats; targets keep JSON's kind (integers are class labels)."""
    try:
        if dtype is not None and isinstance(value, np.ndarray):  # from jsonnumbers
            return tensors.from_matrix(value, dtype, max_elements)
        if isinstance(value, dict):
            if "b64" in value:
                if set(value) != {"b64", "shape", "dtype"}:
                    raise InvalidArgument("a base64 tensor is {b64, shape, dtype}")
                return tensors.from_base64(
                    value["shape"], value["dtype"], value["b64"], max_elements
                )
            unknown = set(value) - {"data", "shape", "dtype"}
            if unknown or "data" not in value or "shape" not in value:
                raise InvalidArgument(
                    "a flat tensor is {data, shape[, dtype]}, a base64 one {b64, shape, dtype}"
                )
            given = value.get("dtype", dtype)
            if "dtype" in value and not isinstance(given, str):
                raise InvalidArgument(f"dtype must be one of {', '.join(wire.DTYPES)}")
            return tensors.from_json(
                value["data"], shape=value["shape"], dtype=given, max_elements=max_elements
            )
        return tensors.from_json(value, dtype=dtype, max_elements=max_elements)
    except PropserveError as exc:
        raise type(exc)(f"{what}: {exc.message}") from None


def _only(body: dict[str, Any], allowed: set[str], required: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidArgument(f"unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    missing = sorted(required - set(body))
    if missing:
        raise InvalidArgument(f"missing field(s) {missing}")
    for key, value in body.items():
        if value is None:
            raise InvalidArgument(f"{key} must not be null (leave it out instead)")


def predict_request(raw: bytes, max_elements: int) -> tuple[NDArray[Any], int | None, str | None]:
    """(inputs, version, label) of a predict body."""
    body = json_object(raw, matrix="inputs")
    _only(body, {"inputs", "version", "label"}, {"inputs"})
    version, label = body.get("version"), body.get("label")
    problem = wire.source_problem(version, label)
    if problem:
        raise InvalidArgument(problem)
    inputs = tensor(body["inputs"], "inputs", max_elements, "float64")
    return inputs, version, label


def train_step_request(
    raw: bytes, max_elements: int
) -> tuple[NDArray[Any], NDArray[Any], float | None]:
    """(inputs, targets, learning rate) of a train_step body."""
    body = json_object(raw, matrix="inputs")
    _only(body, {"inputs", "targets", "learning_rate"}, {"inputs", "targets"})
    lr = body.get("learning_rate")
    if lr is not None and (
        isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr)
    ):
        raise InvalidArgument(f"learning_rate must be a finite number, got {lr!r}")
    inputs = tensor(body["inputs"], "inputs", max_elements, "float64")
    targets = tensor(body["targets"], "targets", max_elements)
    return inputs, targets, None if lr is None else float(lr)


def evaluate_request(
    raw: bytes, max_elements: int
) -> tuple[NDArray[Any], NDArray[Any], int | None, str | None]:
    """(inputs, targets, version, label) of an evaluate body."""
    body = json_object(raw, matrix="inputs")
    _only(body, {"inputs", "targets", "version", "label"}, {"inputs", "targets"})
    version, label = body.get("version"), body.get("label")
    problem = wire.source_problem(version, label)
    if problem:
        raise InvalidArgument(problem)
    inputs = tensor(body["inputs"], "inputs", max_elements, "float64")
    targets = tensor(body["targets"], "targets", max_elements)
    return inputs, targets, version, label


async def create_model_request(
    request: Request, max_weights_bytes: int
) -> tuple[schemas.CreateModelBody, bytes | None]:
    """(the body, the weights' bytes if any) of a create request: JSON (weights in base64),
    or multipart/form-data with a ``model`` part (that JSON, without weights) and a
    ``weights`` file part."""
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind != "multipart/form-data":
        body = _validated(await request.body())
        if body.weights is None:
            return body, None
        return body, pybase64.b64decode(body.weights, validate=True)
    try:
        form = await request.form(max_files=1, max_fields=1, max_part_size=1 << 20)
    except (MultiPartException, HTTPException) as exc:
        raise InvalidArgument(f"the multipart body is invalid: {exc}") from None
    try:
        unknown = sorted(set(form) - {"model", "weights"})
        if unknown:
            raise InvalidArgument(f"unknown part(s) {unknown}; parts are model and weights")
        model, weights = form.get("model"), form.get("weights")
        if not isinstance(model, str):
            raise InvalidArgument("a multipart create needs a 'model' part: the JSON body")
        if not isinstance(weights, StarletteUpload):
            raise InvalidArgument("a multipart create needs a 'weights' file part")
        body = _validated(model.encode())
        if body.weights is not None:
            raise InvalidArgument("the weights come as the 'weights' part, not in 'model'")
        if weights.size is not None and weights.size > max_weights_bytes:
            raise ResourceExhausted(f"the weights exceed {max_weights_bytes:,} bytes")
        return body, await weights.read()
    finally:
        await form.close()


def _validated(raw: bytes) -> schemas.CreateModelBody:
    try:
        return schemas.CreateModelBody.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


#: dtype.name is rebuilt by numpy on each call; these are the ones answered.
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

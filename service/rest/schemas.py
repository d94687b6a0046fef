"""The REST API's wire schemas (pydantic): what /openapi.json documents.

Small bodies (create, settings, labels, rollback) are parsed through these; tensor-carrying
bodies (predict, train_step) are parsed by hand in propserve.service.rest.bodies and
declared here for the OpenAPI document, with the same rules. The rules come from
propserve.wire: the name pattern, strict integers and their bounds, no unknown fields, no
explicit nulls (a field that may be left out is not nullable in the document either).

What JSON Schema cannot say is left to the text: an "integer" there admits 1.0, which the
server refuses (integers are strict); limits each server sets (max_message_bytes, max_rows,
max_params) are named in descriptions; which of a spec's fields go together (a loss and its
output activation, nesterov and momentum) is the engine's to say, in its 400.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    WithJsonSchema,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from propserve import wire
from propserve.engine.initializers import INITIALIZERS
from propserve.engine.spec import DTYPES as SPEC_DTYPES
from propserve.engine.spec import (
    HIDDEN_ACTIVATIONS,
    LOSS_OUTPUTS,
    MAX_LAYERS,
    MAX_UNITS,
    OPTIMIZER_DEFAULTS,
    OUTPUT_ACTIVATIONS,
)

#: In a union, a field's absence: the field may be left out, but null is refused, so the
#: document shows neither null nor a default.
Absent = SkipJsonSchema[None]


def _leave_out(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


def _optional(description: str) -> Any:
    """A field that may be left out (and is never null)."""
    return Field(None, description=description, json_schema_extra=_leave_out)


#: A model or label name: the pattern is documented, and enforced by the core (a 400 that
#: says what a name may hold).
NAME_SCHEMA: dict[str, Any] = {"type": "string", "pattern": f"^{wire.NAME_PATTERN}$"}
Name = Annotated[str, WithJsonSchema(NAME_SCHEMA)]

#: 1 to 2**63-1. NOTE: FastAPI writes every bound of its routes' schemas as a float, and
#: 2**63-1 as a float is 2**63: OpenAPI's int64 format states the upper bound exactly.
VERSION_SCHEMA: dict[str, Any] = {"type": "integer", "format": "int64", "minimum": 1}
VersionNumber = Annotated[
    StrictInt, Field(ge=1, le=wire.MAX_VERSION), WithJsonSchema(VERSION_SCHEMA)
]

# -- tensors: documented here, parsed by bodies and service.tensors -------------------------

#: A value: a number, or a boolean (1 or 0; all-boolean targets stay binary labels).
VALUE_SCHEMA: dict[str, Any] = {"type": ["number", "boolean"]}
_ELEMENTS = "at most max_message_bytes / 4 elements and max_rows rows (the server's settings)"
Values = Annotated[list[float], WithJsonSchema({"type": "array", "items": VALUE_SCHEMA})]
Rows = Annotated[
    list[list[float]],
    WithJsonSchema({"type": "array", "items": {"type": "array", "items": VALUE_SCHEMA}}),
]
Dims = Annotated[
    list[StrictInt],
    WithJsonSchema(
        {
            "type": "array",
            "maxItems": wire.MAX_RANK,
            "items": {"type": "integer", "minimum": 0},
            "description": f"At most {wire.MAX_RANK} dimensions, each at most "
            "max_message_bytes / 4 (the server's setting).",
        }
    ),
]
DType = Annotated[str, WithJsonSchema({"enum": list(wire.DTYPES)})]
#: Base64 as the server reads it: the standard alphabet, padded, nothing else.
B64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"


class Body(BaseModel):
    """A request body: unknown fields and explicit nulls are refused (leave a field out to
    take its default)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, value in data.items():
                if value is None:
                    raise ValueError(f"{key} must not be null (leave it out instead)")
        return data


class FlatTensor(Body):
    """A tensor as flat row-major data plus its shape (an alternative to nested lists)."""

    data: Values = Field(description="prod(shape) values, row-major.")
    shape: Dims
    dtype: DType | Absent = _optional("The data's dtype (default: as nested lists).")


class Base64Tensor(Body):
    """A tensor as base64 of its little-endian, row-major bytes, with shape and dtype: what
    gRPC carries raw, for large tensors over JSON (far cheaper than numbers written out)."""

    b64: str = Field(
        description="base64 (RFC 4648: standard alphabet, padded, no line breaks) of the "
        "tensor's bytes",
        json_schema_extra={"pattern": B64_PATTERN},
    )
    shape: Dims
    dtype: DType


Inputs = Annotated[
    Rows | FlatTensor | Base64Tensor,
    Field(
        description="(batch, features), rank 2: nested lists, {data, shape[, dtype]} or "
        f"{{b64, shape, dtype}}; {_ELEMENTS}."
    ),
]
Targets = Annotated[
    Values | Rows | FlatTensor | Base64Tensor,
    Field(
        description="(batch, outputs), or (batch,) for class labels or one output: nested "
        f"lists, a flat list, {{data, shape[, dtype]}} or {{b64, shape, dtype}}; {_ELEMENTS}."
    ),
]


#: The settings: strict integers within wire.SETTINGS' bounds.
Retain = Annotated[StrictInt, Field(ge=wire.SETTINGS["retain"][0], le=wire.SETTINGS["retain"][1])]
AutosaveEvery = Annotated[
    StrictInt,
    Field(ge=wire.SETTINGS["autosave_every"][0], le=wire.SETTINGS["autosave_every"][1]),
]


class ModelSettings(Body):
    """Per-model settings; a setting left out keeps its value (or the server's default)."""

    retain: Retain | Absent = _optional("Versions kept besides labelled ones.")
    autosave_every: AutosaveEvery | Absent = _optional(
        "Save a version every N training steps (0: off)."
    )

    def given(self) -> dict[str, int]:
        return self.model_dump(exclude_none=True)


# -- the model spec: documented here, validated by the engine --------------------------------

_NON_NEGATIVE = {"type": "number", "minimum": 0}


def _optimizer_field(value: Any) -> dict[str, Any]:
    """The schema of an optimizer field with default ``value`` (engine.spec.OptimizerSpec)."""
    if isinstance(value, bool):
        return {"type": "boolean"}
    if isinstance(value, tuple):  # betas: two numbers in [0, 1)
        beta = {"type": "number", "minimum": 0, "exclusiveMaximum": 1}
        return {"type": "array", "minItems": len(value), "maxItems": len(value), "items": beta}
    return dict(_NON_NEGATIVE)


def _optimizer(names: list[str]) -> dict[str, Any]:
    fields = OPTIMIZER_DEFAULTS[names[0]]
    assert all(OPTIMIZER_DEFAULTS[name].keys() == fields.keys() for name in names)
    return {
        "type": "object",
        "required": ["name"],
        "additionalProperties": False,
        "properties": {
            "name": {"enum": names},
            **{field: _optimizer_field(value) for field, value in fields.items()},
        },
    }


#: The model spec's schema, for the documentation: the engine validates a spec (with the
#: precise messages of a 400), so this states its shape without enforcing it twice.
SPEC_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["input_dim", "layers", "loss"],
    "additionalProperties": False,
    "description": "Parameters: at most max_params (the server's setting).",
    "properties": {
        "input_dim": {"type": "integer", "minimum": 1, "maximum": MAX_UNITS},
        "layers": {
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_LAYERS,
            "description": "Every layer but the last names its activation, one of "
            f"{', '.join(HIDDEN_ACTIVATIONS)}; the last one's defaults to the loss's "
            "(softmax_cross_entropy: softmax, binary_cross_entropy: sigmoid, mse: identity).",
            "items": {
                "type": "object",
                "required": ["units"],
                "additionalProperties": False,
                "properties": {
                    "units": {"type": "integer", "minimum": 1, "maximum": MAX_UNITS},
                    "activation": {"enum": list(OUTPUT_ACTIVATIONS)},
                },
            },
        },
        "loss": {"enum": list(LOSS_OUTPUTS)},
        "optimizer": {
            "description": "A name, or an object with a name and torch.optim's "
            "hyper-parameters for it (default: sgd).",
            "anyOf": [
                {"enum": list(OPTIMIZER_DEFAULTS)},
                _optimizer(["sgd"]),
                _optimizer(["adam", "adamw"]),
            ],
        },
        "dtype": {"enum": list(SPEC_DTYPES)},
        "init": {"enum": list(INITIALIZERS)},
        "seed": {"type": "integer", "format": "int64", "minimum": 0},
        "grad_clip_norm": {
            "anyOf": [{"type": "number", "exclusiveMinimum": 0}, {"type": "null"}],
            "description": "Clip the gradient's norm to this (null: no clipping).",
        },
    },
}


Layout = Annotated[str, WithJsonSchema({"enum": list(wire.WEIGHT_LAYOUTS)})]


class CreateModelBody(Body):
    """A new model. With ``weights`` (or, in a multipart body, a ``weights`` file) its head
    starts from them and is saved as version 1; without, from the spec's seed."""

    name: Name
    spec: Annotated[dict[str, Any], WithJsonSchema(SPEC_SCHEMA)]
    settings: ModelSettings = Field(default_factory=ModelSettings)
    weights: Annotated[str, Field(pattern=B64_PATTERN)] | Absent = _optional(
        "Base64 of a safetensors file of the parameters (and optionally the optimizer "
        "state), see docs/weights.md."
    )
    layout: Layout | Absent = _optional(
        "How the weights name and shape dense layers: propserve (default) or torch."
    )

    @model_validator(mode="after")
    def _layout(self) -> CreateModelBody:
        if self.layout is not None and self.layout not in wire.WEIGHT_LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(wire.WEIGHT_LAYOUTS)}")
        return self


class UpdateModelBody(Body):
    settings: ModelSettings


# The records answered are the wire's (propserve.wire): FastAPI documents the dataclasses
# themselves, so their fields are stated once.


class ModelList(BaseModel):
    models: list[wire.Model]


class VersionList(BaseModel):
    versions: list[wire.Version]


#: A version or a label names saved weights, never both (wire.source_problem).
_NOT_BOTH: dict[str, Any] = {"not": {"required": ["version", "label"]}}


class PredictBody(Body):
    model_config = ConfigDict(json_schema_extra=_NOT_BOTH)

    inputs: Inputs
    version: VersionNumber | Absent = _optional("A saved version (default: the head).")
    label: Name | Absent = _optional("A label naming a saved version.")


class PredictOut(BaseModel):
    model: str
    outputs: list[list[float]]
    dtype: str = Field(description="The outputs' dtype (the model's): float32 or float64.")
    version: int | None = Field(description="The version that answered (null: the head).")
    step: int


LearningRate = Annotated[StrictFloat | StrictInt, WithJsonSchema({"type": "number", "minimum": 0})]


class TrainStepBody(Body):
    inputs: Inputs
    targets: Targets
    learning_rate: LearningRate | Absent = _optional(
        "Overrides the spec's learning rate for this step (finite)."
    )


class EvaluateBody(Body):
    model_config = ConfigDict(json_schema_extra=_NOT_BOTH)

    inputs: Inputs
    targets: Targets
    version: VersionNumber | Absent = _optional("A saved version (default: the head).")
    label: Name | Absent = _optional("A label naming a saved version.")


class LabelBody(Body):
    version: VersionNumber


class RollbackBody(Body):
    """Exactly one of a version and a label (the core's 400 otherwise)."""

    model_config = ConfigDict(
        json_schema_extra={"oneOf": [{"required": ["version"]}, {"required": ["label"]}]}
    )

    version: VersionNumber | Absent = _optional("A saved version.")
    label: Name | Absent = _optional("A label naming a saved version.")


class ErrorDetail(BaseModel):
    code: str = Field(description="The wire code, e.g. not_found (see docs/api.md).")
    message: str


class ErrorOut(BaseModel):
    error: ErrorDetail

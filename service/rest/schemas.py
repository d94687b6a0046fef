"""The REST API's wire schemas (pydantic): what /openapi.json documents.

Small bodies (create, settings, labels, rollback) are parsed through these; tensor-carrying
bodies (predict, train_step) are parsed by hand in propserve.service.rest.bodies and
declared here for the OpenAPI document, with the same rules. The rules come from
propserve.wire: the name pattern, strict integers and their bounds, no unknown fields, no
explicit nulls.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, model_validator

from propserve import wire
from propserve.engine.spec import DTYPES as SPEC_DTYPES
from propserve.engine.spec import (
    LOSS_OUTPUTS,
    MAX_LAYERS,
    MAX_UNITS,
    OPTIMIZERS,
    OUTPUT_ACTIVATIONS,
)

#: A model or label name: the pattern is documented, and enforced by the core (a 400 that
#: says what a name may hold).
Name = Annotated[str, Field(json_schema_extra={"pattern": f"^{wire.NAME_PATTERN}$"})]
VersionNumber = Annotated[StrictInt, Field(ge=1, le=wire.MAX_VERSION)]
Dims = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(max_length=wire.MAX_RANK)]
DType = Annotated[str, Field(pattern="^(" + "|".join(wire.DTYPES) + ")$")]


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

    data: list[float]
    shape: Dims
    dtype: DType | None = None


class Base64Tensor(Body):
    """A tensor as base64 of its little-endian, row-major bytes, with shape and dtype: what
    gRPC carries raw, for large tensors over JSON (far cheaper than numbers written out)."""

    b64: str = Field(
        description="base64 (RFC 4648: standard alphabet, padded, no line breaks) of the "
        "tensor's bytes"
    )
    shape: Dims
    dtype: DType


TensorJSON = Annotated[
    list[list[float]] | list[int] | list[float] | FlatTensor | Base64Tensor,
    Field(
        description="Nested lists (batch, features), a flat list of labels or values, "
        "{data, shape[, dtype]}, or {b64, shape, dtype}. At most max_message_bytes / 4 "
        "elements."
    ),
]


def _setting(name: str, description: str) -> Any:
    low, high = wire.SETTINGS[name]
    return Field(None, ge=low, le=high, description=description)


class ModelSettings(Body):
    """Per-model settings; a setting left out keeps its value (or the server's default)."""

    retain: StrictInt | None = _setting("retain", "Versions kept besides labelled ones.")
    autosave_every: StrictInt | None = _setting(
        "autosave_every", "Save a version every N training steps (0: off)."
    )

    def given(self) -> dict[str, int]:
        return self.model_dump(exclude_none=True)


#: The model spec's schema, for the documentation: the engine validates a spec (with the
#: precise messages of a 400), so this states its shape without enforcing it twice.
SPEC_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["input_dim", "layers"],
    "additionalProperties": False,
    "properties": {
        "input_dim": {"type": "integer", "minimum": 1, "maximum": MAX_UNITS},
        "layers": {
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_LAYERS,
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
            "anyOf": [
                {"enum": list(OPTIMIZERS)},
                {
                    "type": "object",
                    "required": ["name"],
                    "properties": {"name": {"enum": list(OPTIMIZERS)}},
                },
            ]
        },
        "dtype": {"enum": list(SPEC_DTYPES)},
        "init": {"type": "string"},
        "seed": {"type": "integer", "minimum": 0},
        "grad_clip_norm": {"type": "number", "exclusiveMinimum": 0},
    },
}


class CreateModelBody(Body):
    name: Name
    spec: dict[str, Any] = Field(json_schema_extra=SPEC_SCHEMA)
    settings: ModelSettings = Field(default_factory=ModelSettings)


class UpdateModelBody(Body):
    settings: ModelSettings


class ModelOut(BaseModel):
    name: str
    spec: dict[str, Any]
    settings: dict[str, int]
    labels: dict[str, int]
    head_step: int
    latest_version: int | None
    unsaved_steps: int
    parameter_count: int
    created_at: float = Field(description="Seconds since the Unix epoch.")
    last_loss: float | None


class ModelList(BaseModel):
    models: list[ModelOut]


class VersionOut(BaseModel):
    model: str
    version: int
    step: int
    created_at: float = Field(description="Seconds since the Unix epoch.")
    parent: int | None
    metrics: dict[str, float]
    sha256: str
    size_bytes: int
    labels: list[str]


class VersionList(BaseModel):
    versions: list[VersionOut]


class PredictBody(Body):
    inputs: TensorJSON
    version: VersionNumber | None = Field(None, description="A saved version (default: head).")
    label: Name | None = Field(None, description="A label naming a saved version.")


class PredictOut(BaseModel):
    model: str
    outputs: list[list[float]]
    dtype: str = Field(description="The outputs' dtype (the model's): float32 or float64.")
    version: int | None = Field(description="The version that answered (null: the head).")
    step: int


class TrainStepBody(Body):
    inputs: TensorJSON
    targets: TensorJSON
    learning_rate: StrictFloat | StrictInt | None = Field(
        None, ge=0, description="Overrides the spec's learning rate for this step (finite)."
    )


class TrainStepOut(BaseModel):
    step: int
    loss: float
    accuracy: float | None
    batch_size: int
    saved_version: int | None


class LabelBody(Body):
    version: VersionNumber


class RollbackBody(Body):
    version: VersionNumber | None = None
    label: Name | None = None


class ErrorDetail(BaseModel):
    code: str = Field(description="The wire code, e.g. not_found (see docs/api.md).")
    message: str


class ErrorOut(BaseModel):
    error: ErrorDetail

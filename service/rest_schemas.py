"""The REST API's wire schemas (pydantic): what /openapi.json documents.

Small bodies (create, settings, labels, rollback) are parsed through these; tensor-carrying
bodies (predict, train_step) are parsed by hand in service.rest_api and declared here only
for the OpenAPI document.
"""

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field


class FlatTensor(BaseModel):
    """A tensor as flat row-major data plus its shape (an alternative to nested lists)."""

    data: list[float]
    shape: list[int]
    dtype: str | None = Field(None, description="float32, float64, int32 or int64")


class Base64Tensor(BaseModel):
    """A tensor as base64 of its little-endian, row-major bytes, with shape and dtype: what
    gRPC carries raw, for large tensors over JSON (decoding it is ~6x cheaper than parsing
    the numbers written out)."""

    b64: str = Field(
        description="base64 (RFC 4648: standard alphabet, padded, no line breaks) of the "
        "tensor's bytes"
    )
    shape: list[int]
    dtype: str = Field(description="float32, float64, int32 or int64")


TensorJSON = Annotated[
    list[list[float]] | list[int] | FlatTensor | Base64Tensor,
    Field(
        description="Nested lists (batch, features), a flat list of integer labels, "
        "{data, shape}, or {b64, shape, dtype}."
    ),
]


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    retain: int | None = Field(None, ge=1, description="Versions kept besides labelled ones.")
    autosave_every: int | None = Field(None, ge=0, description="Save every N steps (0: off).")

    def given(self) -> dict[str, int]:
        return self.model_dump(exclude_none=True)


class CreateModelBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="[a-z0-9][a-z0-9._-]{0,63}")
    spec: dict[str, Any] = Field(
        description="input_dim, layers, loss, optimizer, dtype, init, seed, grad_clip_norm"
    )
    settings: Settings = Field(default_factory=Settings)


class UpdateModelBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    settings: Settings


class ModelOut(BaseModel):
    name: str
    spec: dict[str, Any]
    settings: dict[str, int]
    labels: dict[str, int]
    head_step: int
    latest_version: int | None
    unsaved_steps: int
    parameter_count: int
    created_at: float
    last_loss: float | None


class ModelList(BaseModel):
    models: list[ModelOut]


class VersionOut(BaseModel):
    model: str
    version: int
    step: int
    created_at: float
    parent: int | None
    metrics: dict[str, float]
    sha256: str
    size_bytes: int
    labels: list[str]


class VersionList(BaseModel):
    versions: list[VersionOut]


class PredictBody(BaseModel):
    inputs: TensorJSON
    version: int | None = Field(None, ge=1, description="A saved version (default: head).")
    label: str | None = Field(None, description="A label naming a saved version.")


class PredictOut(BaseModel):
    model: str
    outputs: list[list[float]]
    dtype: str = Field(description="The outputs' dtype (the model's): float32 or float64.")
    version: int | None = Field(description="The version that answered (null: the head).")
    step: int


class TrainStepBody(BaseModel):
    inputs: TensorJSON
    targets: TensorJSON
    learning_rate: float | None = None


class TrainStepOut(BaseModel):
    step: int
    loss: float
    accuracy: float | None
    batch_size: int
    saved_version: int | None


class LabelBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1)


class RollbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int | None = Field(None, ge=1)
    label: str | None = None


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorOut(BaseModel):
    error: ErrorDetail

"""What the clients return: plain frozen dataclasses and numpy arrays, the same on both
transports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class Model:
    name: str
    spec: dict[str, Any]
    settings: dict[str, int]
    labels: dict[str, int]
    head_step: int
    latest_version: int | None
    unsaved_steps: int
    parameter_count: int
    last_loss: float | None


@dataclass(frozen=True)
class Version:
    model: str
    version: int
    step: int
    parent: int | None
    metrics: dict[str, float]
    sha256: str
    size_bytes: int
    labels: tuple[str, ...]


@dataclass(frozen=True)
class Prediction:
    """outputs: (batch, outputs); version: the saved version that answered (None: the live
    head); step: the training step of the weights that answered."""

    outputs: NDArray[Any]
    version: int | None
    step: int


@dataclass(frozen=True)
class StepResult:
    step: int
    loss: float
    accuracy: float | None
    batch_size: int
    saved_version: int | None


def as_array(value: Any) -> NDArray[Any]:
    """Accept numpy arrays and nested lists; keep float32/float64/int32/int64 as they are."""
    array = np.asarray(value)
    if array.dtype == np.float16:
        array = array.astype(np.float32)
    return array

"""What the clients return: the wire's records (Model, Version, StepResult) and numpy
arrays, the same on both transports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from numpy.typing import NDArray

from propserve.wire import (
    Evaluation,
    History,
    HistoryPoint,
    Model,
    StepResult,
    Version,
    WeightsFile,
)

__all__ = [
    "Evaluation",
    "History",
    "HistoryPoint",
    "Model",
    "Prediction",
    "StepResult",
    "Version",
    "WeightsFile",
]


@dataclass(frozen=True)
class Prediction:
    """outputs: (batch, outputs); version: the saved version that answered (None: the live
    head); step: the training step of the weights that answered."""

    outputs: NDArray[Any]
    version: int | None
    step: int

"""The Open Inference Protocol ("KServe v2"), the part both of its transports share.

The OIP adapters (propserve.service.rest.oip, propserve.service.grpc.oip) serve predictions,
health, metadata and the model-repository extension through the same data plane as
propserve's own API; training stays on propserve's API, as OIP has no verbs for it. What
the two transports agree on is here: the names, the datatypes, how a ``model_version``
string picks the weights, one input tensor's checks, and the metadata a model answers.

Versions: ``""`` is the server's policy (the ``stable`` label if the model has it, else the
live head), digits a saved version, any other string a label (see docs/api.md#versions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from propserve import wire
from propserve.service.dataplane import DataPlane
from propserve.service.errors import InvalidArgument, NotFound
from propserve.service.models import Prediction

#: The gRPC service's name in the protocol (its methods are /inference.GRPCInferenceService/*).
GRPC_SERVICE = "inference.GRPCInferenceService"
SERVER_NAME = "propserve"
EXTENSIONS = ("binary_tensor_data", "model_repository")
PLATFORM = "propserve_numpy"
#: A model's one input and one output tensor.
INPUT = "inputs"
OUTPUT = "outputs"

#: The protocol's datatypes propserve takes and answers, and their wire dtypes.
DATATYPES: dict[str, str] = {"FP32": "float32", "FP64": "float64"}
_OIP_NAMES = {np.dtype(wire.DTYPES[dtype]): name for name, dtype in DATATYPES.items()}

#: A repository's models' states (the model-repository extension's words).
READY = "READY"
UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True)
class Source:
    """The weights a ``model_version`` names: a saved version, a label, or (both None)
    the server's policy."""

    version: int | None = None
    label: str | None = None

    @property
    def default(self) -> bool:
        return self.version is None and self.label is None


def source(model_version: str) -> Source:
    """``model_version`` as the weights it names (InvalidArgument for a malformed one)."""
    if not model_version:
        return Source()
    if model_version.isascii() and model_version.isdigit():
        version = int(model_version)
        problem = wire.source_problem(version, None)
        if problem:
            raise InvalidArgument(f"model version {model_version!r}: {problem}")
        return Source(version=version)
    problem = wire.source_problem(None, model_version)
    if problem:
        raise InvalidArgument(f"model version {model_version!r}: {problem}")
    return Source(label=model_version)


def resolve(plane: DataPlane, name: str, wanted: Source) -> Source:
    """``wanted`` with the server's policy applied: the model's serving label, else the head."""
    if not wanted.default:
        return wanted
    return Source(label=plane.serving_label(name))


async def infer(plane: DataPlane, name: str, model_version: str, x: NDArray[Any]) -> Prediction:
    """A prediction by a ``model_version`` string, batched with every other on the same
    weights (propserve's own predictions included)."""
    chosen = resolve(plane, name, source(model_version))
    return await plane.predict(name, x, version=chosen.version, label=chosen.label)


def answered_version(prediction: Prediction) -> str:
    """The ``model_version`` of an answer: the saved version that answered; the live head,
    which no saved version holds, answers ``""`` (its step is in the parameters)."""
    return "" if prediction.version is None else str(prediction.version)


def check_input(name: str, datatype: str, shape: list[int]) -> str:
    """One input tensor's name, datatype and shape checked; its wire dtype."""
    if name != INPUT:
        raise InvalidArgument(f"unknown input {name!r}; the model's input is {INPUT!r}")
    dtype = DATATYPES.get(datatype)
    if dtype is None:
        raise InvalidArgument(
            f"input datatype {datatype!r} is not supported; use {' or '.join(DATATYPES)}"
        )
    if len(shape) != 2:
        raise InvalidArgument(f"input shape {shape} must be [rows, features]")
    return dtype


def check_inputs_count(count: int) -> None:
    if count != 1:
        raise InvalidArgument(f"{count} input tensors; the model takes one, {INPUT!r}")


def check_outputs(names: list[str]) -> None:
    """The outputs a request asks for: none (all), or the model's one."""
    unknown = [name for name in names if name != OUTPUT]
    if unknown:
        raise InvalidArgument(f"unknown output(s) {unknown}; the model's output is {OUTPUT!r}")


def datatype(dtype: np.dtype[Any]) -> str:
    """The protocol's name of an output's dtype."""
    return _OIP_NAMES[dtype]


def metadata(model: wire.Model, versions: list[int]) -> dict[str, Any]:
    """A model's metadata: its tensors, saved versions, and as properties its labels (each
    ``label.<name>``), step and newest version, all strings as the gRPC message has them."""
    spec = model.spec
    dtype = datatype(np.dtype(wire.DTYPES[spec.get("dtype", "float32")]))
    outputs = int(spec["layers"][-1]["units"])
    properties = {f"label.{label}": str(version) for label, version in model.labels.items()}
    properties["step"] = str(model.head_step)
    if model.latest_version is not None:
        properties["latest_version"] = str(model.latest_version)
    return {
        "name": model.name,
        "versions": [str(v) for v in versions],
        "platform": PLATFORM,
        "inputs": [{"name": INPUT, "datatype": dtype, "shape": [-1, int(spec["input_dim"])]}],
        "outputs": [{"name": OUTPUT, "datatype": dtype, "shape": [-1, outputs]}],
        "properties": properties,
    }


async def model_metadata(plane: DataPlane, name: str, model_version: str) -> dict[str, Any]:
    """Metadata of a model, or of one of its versions (NotFound for an unknown one)."""
    model = await plane.get_model(name)
    versions = [v.version for v in await plane.list_versions(name)]
    wanted = source(model_version)
    if wanted.version is not None and wanted.version not in versions:
        raise _no_version(name, model_version)
    if wanted.label is not None and wanted.label not in model.labels:
        raise _no_version(name, model_version)
    return metadata(model, versions)


async def model_ready(plane: DataPlane, name: str, model_version: str) -> bool:
    """Whether predictions by ``model_version`` can be answered now (NotFound for an unknown
    model or version)."""
    if not await plane.is_loaded(name):  # NotFound for an unknown model
        return False
    wanted = source(model_version)
    if not wanted.default and not await plane.has_source(
        name, version=wanted.version, label=wanted.label
    ):
        raise _no_version(name, model_version)
    return True


async def repository_index(plane: DataPlane, ready_only: bool) -> list[dict[str, str]]:
    """Every model with its newest version and state (READY: in memory)."""
    index = []
    for model in await plane.list_models():
        try:
            loaded = await plane.is_loaded(model.name)
        except NotFound:  # deleted meanwhile
            continue
        if ready_only and not loaded:
            continue
        entry = {
            "name": model.name,
            "version": "" if model.latest_version is None else str(model.latest_version),
            "state": READY if loaded else UNAVAILABLE,
        }
        if not loaded:
            entry["reason"] = "unloaded"
        index.append(entry)
    return index


def _no_version(name: str, model_version: str) -> NotFound:
    return NotFound(f"model {name!r} has no version {model_version!r}")

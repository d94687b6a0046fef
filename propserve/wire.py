"""The wire contract: what the server and the clients agree on, in one place.

Both sides import this module and nothing else of each other; it has no dependencies. From
it derive the server's status tables (propserve.service.errors), the clients' exception
ladder (propserve.clients.errors) and the error table of docs/api.md (checked by a test):

- the error codes, each with its gRPC status and HTTP status;
- the retry hint of a refusal for being too busy, in one unit on both transports;
- the tensor dtypes;
- the rules for names, request ids, versions and labels, and per-model settings;
- the records both transports return: Model, Version, StepResult, Evaluation.

"Absent" is ``None`` in these records, ``null`` in REST's JSON and an unset proto3
``optional`` field on gRPC; times are seconds since the Unix epoch, as floats, on both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# -- error codes --------------------------------------------------------------------------


@dataclass(frozen=True)
class Code:
    """An error code: its name in REST bodies and gRPC trailers, the gRPC status
    (``grpc.StatusCode``'s name), the HTTP status, and what it means."""

    name: str
    grpc: str
    http: int
    meaning: str


INVALID_ARGUMENT = Code(
    "invalid_argument",
    "INVALID_ARGUMENT",
    400,
    "input that can never succeed as given: a bad name, shape, dtype, spec or value",
)
NOT_FOUND = Code("not_found", "NOT_FOUND", 404, "no such model, version or label")
ALREADY_EXISTS = Code("already_exists", "ALREADY_EXISTS", 409, "the name is taken")
FAILED_PRECONDITION = Code(
    "failed_precondition",
    "FAILED_PRECONDITION",
    409,
    "not possible in the current state: a refused (diverging) step, a read-only store",
)
RESOURCE_EXHAUSTED = Code(
    "resource_exhausted",
    "RESOURCE_EXHAUSTED",
    413,
    "over a limit: message, rows, elements, parameters",
)
TOO_BUSY = Code(
    "too_busy",
    "RESOURCE_EXHAUSTED",
    429,
    "too much work waiting; nothing was done, retry after the hint",
)
UNAUTHENTICATED = Code(
    "unauthenticated", "UNAUTHENTICATED", 401, "no bearer token, or an unknown one"
)
PERMISSION_DENIED = Code(
    "permission_denied", "PERMISSION_DENIED", 403, "the token lacks the role the call needs"
)
UNAVAILABLE = Code("unavailable", "UNAVAILABLE", 503, "shutting down or not ready")
DATA_LOSS = Code("data_loss", "DATA_LOSS", 500, "a stored version failed verification")
DEADLINE_EXCEEDED = Code(
    "deadline_exceeded", "DEADLINE_EXCEEDED", 504, "no answer within the client's timeout"
)
INTERNAL = Code(
    "internal", "INTERNAL", 500, "a bug: logged with its traceback under the request id"
)

#: Every code, in the order of the docs' error table.
CODES: tuple[Code, ...] = (
    INVALID_ARGUMENT,
    NOT_FOUND,
    ALREADY_EXISTS,
    FAILED_PRECONDITION,
    RESOURCE_EXHAUSTED,
    TOO_BUSY,
    UNAUTHENTICATED,
    PERMISSION_DENIED,
    UNAVAILABLE,
    DATA_LOSS,
    DEADLINE_EXCEEDED,
    INTERNAL,
)
BY_NAME: dict[str, Code] = {code.name: code for code in CODES}

#: Metadata (gRPC trailers) and headers (REST) that carry an error's details besides the
#: status: the code's name, the request id, and the retry hint in milliseconds.
ERROR_CODE_KEY = "error-code"
REQUEST_ID_KEY = "x-request-id"
RETRY_AFTER_MS_KEY = "retry-after-ms"

#: The wait suggested to a client refused as too busy, in milliseconds. REST also sends the
#: standard ``Retry-After`` header, which counts whole seconds (rounded up).
RETRY_AFTER_MS = 100


def code_for_status(*, grpc: str | None = None, http: int | None = None) -> Code:
    """The code a bare status stands for when a response carries no code of its own (a
    proxy's answer, or grpc's own): the first code with that status, else ``internal``."""
    for code in CODES:
        if (grpc is not None and code.grpc == grpc) or (http is not None and code.http == http):
            return code
    return INTERNAL


# -- tensors ------------------------------------------------------------------------------

#: Tensor dtypes on the wire and their little-endian numpy type strings. gRPC names them
#: ``DTYPE_<NAME>`` (the proto's enum), REST by name.
DTYPES: dict[str, str] = {
    "float32": "<f4",
    "float64": "<f8",
    "int32": "<i4",
    "int64": "<i8",
}
#: A tensor has at most this many dimensions.
MAX_RANK = 8

# -- names, request ids, versions, labels, settings ----------------------------------------

#: Model and label names: no path ever comes from a client.
NAME_PATTERN = r"[a-z0-9][a-z0-9._-]{0,63}"
_NAME = re.compile(NAME_PATTERN)

#: Request ids a client may choose; any other is replaced by a fresh one (so a log line
#: cannot be forged through it).
REQUEST_ID_PATTERN = r"[A-Za-z0-9._-]{1,128}"
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)

#: Versions are numbered from 1 and carried as unsigned 64-bit integers (int64's range).
MAX_VERSION = 2**63 - 1


def name_problem(name: object, what: str = "model") -> str | None:
    """Why ``name`` is not a valid model (or label) name, or None."""
    # NOTE: fullmatch, not match: "$" would let a trailing newline through.
    if isinstance(name, str) and _NAME.fullmatch(name):
        return None
    return (
        f"invalid {what} name {name!r:.80}: expected 1 to 64 characters from a-z, 0-9, '.', "
        "'_' and '-', starting with a letter or digit"
    )


def valid_request_id(value: object) -> bool:
    return isinstance(value, str) and _REQUEST_ID.fullmatch(value) is not None


def source_problem(version: object, label: object) -> str | None:
    """Why (version, label) does not name a source of weights, or None. Neither: the
    server's default (see docs/api.md); a version: that saved version; a label: the version
    it names. Never both."""
    if version is not None and label is not None:
        return "give a version or a label, not both"
    if version is not None and (
        isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION
    ):
        return f"invalid version {version!r:.40}: expected an integer from 1 to 2**63-1"
    if label is not None:
        return name_problem(label, "label")
    return None


#: Per-model settings: name -> (lowest, highest) allowed integer.
SETTINGS: dict[str, tuple[int, int]] = {
    "retain": (1, 1_000_000),
    "autosave_every": (0, 1_000_000_000_000),
}


def settings_problem(settings: dict[str, Any]) -> str | None:
    """Why ``settings`` (a mapping of names to integers) is not valid, or None. Integers
    are strict: booleans, floats and strings are refused."""
    for key, value in settings.items():
        if key not in SETTINGS:
            return f"unknown setting {key!r}; settings are {', '.join(SETTINGS)}"
        low, high = SETTINGS[key]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            return f"invalid setting {key}={value!r:.40}: expected an integer in [{low}, {high}]"
    return None


#: How a weights file names and shapes a dense layer (docs/weights.md): "propserve" keeps
#: a weight (n_in, n_out) as the store does, "torch" (n_out, n_in) as torch.nn.Linear does,
#: named as an nn.Sequential's state_dict names it.
WEIGHT_LAYOUTS = ("propserve", "torch")
#: The formats a saved version exports to, and their media types.
WEIGHT_FORMATS = {"safetensors": "application/octet-stream", "onnx": "application/onnx"}


def export_problem(layout: object, format: object) -> str | None:
    """Why (layout, format) of an export is not valid, or None. A layout names safetensors
    tensors: an ONNX file has only the default."""
    if layout not in WEIGHT_LAYOUTS:
        return f"unknown layout {layout!r:.40}; layouts are {', '.join(WEIGHT_LAYOUTS)}"
    if format not in WEIGHT_FORMATS:
        return f"unknown format {format!r:.40}; formats are {', '.join(WEIGHT_FORMATS)}"
    if format == "onnx" and layout != "propserve":
        return "a layout applies to safetensors files; an ONNX file has its own"
    return None


#: The most history points one answer holds (GetHistory's ``limit``).
MAX_HISTORY_POINTS = 100_000


def history_problem(since: object, until: object, every: object, limit: object) -> str | None:
    """Why a history request's range is not valid, or None: ``since`` and ``until`` steps
    (None: open), ``every`` at least 1, ``limit`` from 1 to MAX_HISTORY_POINTS (None: the
    server's default). Integers are strict."""
    bounds = [
        ("since", since, 0, MAX_VERSION),
        ("until", until, 0, MAX_VERSION),
        ("every", every, 1, MAX_VERSION),
        ("limit", limit, 1, MAX_HISTORY_POINTS),
    ]
    for what, value, low, high in bounds:
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high
        ):
            return f"invalid {what} {value!r:.40}: expected an integer from {low} to {high}"
    return None


# -- records ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Model:
    """A model as both transports return it."""

    name: str
    spec: dict[str, Any]
    settings: dict[str, int]
    labels: dict[str, int]
    #: Training steps applied to the live head.
    head_step: int
    #: The newest saved version, if any.
    latest_version: int | None
    #: Steps on the head since it was last saved or loaded.
    unsaved_steps: int
    parameter_count: int
    #: Seconds since the Unix epoch.
    created_at: float
    #: The last training step's loss, if any.
    last_loss: float | None


@dataclass(frozen=True)
class Version:
    """A saved version as both transports return it."""

    model: str
    version: int
    step: int
    #: Seconds since the Unix epoch.
    created_at: float
    #: The version the head descended from when this one was saved, if any.
    parent: int | None
    metrics: dict[str, float]
    sha256: str
    size_bytes: int
    labels: tuple[str, ...]


@dataclass(frozen=True)
class Evaluation:
    """A model's loss on given rows, without training: what Evaluate reports."""

    loss: float
    #: Classification losses only.
    accuracy: float | None
    rows: int
    #: The training step of the weights that answered.
    step: int
    #: The saved version that answered (None: the live head).
    version: int | None


@dataclass(frozen=True)
class StepResult:
    """What one training step reports."""

    step: int
    #: The loss on the batch, before the update.
    loss: float
    #: Classification losses only.
    accuracy: float | None
    batch_size: int
    #: Set when this step triggered an autosave.
    saved_version: int | None


@dataclass(frozen=True)
class WeightsFile:
    """A saved version's weights as a file: what ExportWeights returns."""

    model: str
    version: int
    step: int
    #: "safetensors" or "onnx" (WEIGHT_FORMATS).
    format: str
    #: "propserve" or "torch" (WEIGHT_LAYOUTS).
    layout: str
    #: The sha256 of the version as stored; for a propserve-layout safetensors file, that of
    #: ``data`` itself, which is the stored file.
    sha256: str
    data: bytes


@dataclass(frozen=True)
class HistoryPoint:
    """One training step in a model's history, or with ``every`` > 1 one bucket of steps:
    its last step, mean loss and accuracy, last learning rate, summed rows, last time."""

    step: int
    loss: float
    #: Classification losses only.
    accuracy: float | None
    learning_rate: float
    rows: int
    #: Seconds since the Unix epoch.
    time: float


@dataclass(frozen=True)
class History:
    """Part of a model's training history, in step order: what GetHistory returns."""

    model: str
    points: tuple[HistoryPoint, ...]
    #: Where to continue (the next call's ``since``) when the limit cut the answer short.
    next_since: int | None

"""What the store keeps about models and versions, and the validation of everything that
comes in from outside (names, labels, version numbers, settings, JSON metadata).

Nothing here touches the disk. Every path the store builds is made from a value that went
through `check_name` or `check_version` first, so no client string ever becomes a path.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from propserve import wire
from propserve.service.errors import DataLoss, InvalidArgument, ResourceExhausted

NAME_PATTERN = wire.NAME_PATTERN
MAX_VERSION = wire.MAX_VERSION
MAX_STEP = 2**63 - 1

#: Settings of a model created without them (the server passes its own defaults).
DEFAULT_SETTINGS: dict[str, int] = {"retain": 10, "autosave_every": 0}

DEFAULT_MAX_METADATA_BYTES = 1 << 20
FORMAT = 1


@dataclass(frozen=True)
class ModelRecord:
    """A model as the store knows it: its spec, settings and labels (label -> version)."""

    name: str
    spec: dict[str, Any]
    settings: dict[str, Any]
    labels: dict[str, int]
    created_at: float  # seconds since the Unix epoch, UTC


@dataclass(frozen=True)
class VersionMeta:
    """One saved version's metadata (everything but the weights themselves).

    `sha256` is the hex digest of the weights bytes, `size_bytes` their length; `spec` is
    the model's spec when the version was saved, so a version describes itself."""

    model: str
    version: int
    step: int
    created_at: float
    parent: int | None
    metrics: dict[str, float]
    sha256: str
    size_bytes: int
    spec: dict[str, Any] = field(default_factory=dict, repr=False)


def check_name(value: object, what: str = "model") -> str:
    """Return `value` if it is a valid model name or label (wire.NAME_PATTERN), else raise
    InvalidArgument.

    The pattern cannot produce "", ".", "..", a slash, a NUL or a leading dot, so a valid
    name is always exactly one path component that cannot collide with the store's own
    dot-files."""
    problem = wire.name_problem(value, what)
    if problem:
        raise InvalidArgument(problem)
    assert isinstance(value, str)
    return value


def check_version(value: object) -> int:
    """Return `value` if it is a possible version number (an int in 1..2**63-1)."""
    problem = wire.source_problem(value, None)
    if problem:
        raise InvalidArgument(problem)
    assert isinstance(value, int)
    return value


def check_step(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_STEP:
        raise InvalidArgument(f"invalid step {value!r:.40}: expected an integer >= 0")
    return value


def check_settings(settings: object, base: Mapping[str, Any]) -> dict[str, Any]:
    """Merge `settings` over `base` after checking every key and value (wire.SETTINGS).

    Unknown keys are refused (a typo must not silently keep the default)."""
    if settings is None:
        return dict(base)
    if not isinstance(settings, Mapping):
        raise InvalidArgument("settings must be a mapping of setting name to value")
    problem = wire.settings_problem(dict(settings))
    if problem:
        raise InvalidArgument(problem)
    return dict(base) | dict(settings)


def check_metrics(metrics: object) -> dict[str, float]:
    """Metrics are finite numbers by name (e.g. the last loss)."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise InvalidArgument("metrics must be a mapping of name to number")
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not key:
            raise InvalidArgument(f"invalid metric name {key!r:.80}: expected a non-empty string")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidArgument(f"metric {key!r:.80} must be a number, not {value!r:.40}")
        number = float(value)
        if not math.isfinite(number):
            raise InvalidArgument(f"metric {key!r:.80} must be finite, not {number}")
        out[key] = number
    return out


def encode_json(doc: object, what: str, limit: int) -> bytes:
    """Canonical JSON bytes of `doc`, refusing what JSON cannot carry faithfully
    (NaN, infinities, non-string keys, arbitrary objects) and anything over `limit` bytes."""
    try:
        text = json.dumps(doc, allow_nan=False, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"{what} is not plain JSON data: {exc}") from None
    data = text.encode("utf-8")
    if len(data) > limit:
        raise ResourceExhausted(
            f"{what} is too large: {len(data)} bytes of JSON, the limit is {limit}"
        )
    return data


def check_spec(spec: object, limit: int) -> dict[str, Any]:
    if not isinstance(spec, Mapping):
        raise InvalidArgument("spec must be a mapping")
    for key in spec:
        if not isinstance(key, str):
            raise InvalidArgument(f"spec keys must be strings, not {key!r:.40}")
    # Decode our own encoding so that the record never aliases the caller's objects.
    decoded: dict[str, Any] = json.loads(encode_json(spec, "spec", limit))
    return decoded


# --- documents read back from disk: anything unexpected is DataLoss, never a crash ---------


def decode_doc(data: bytes, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataLoss(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise DataLoss(f"{where} is not a JSON object")
    return doc


def _get(doc: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = doc.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise DataLoss(f"{where}: field {key!r} is missing or malformed")
    return value


def model_from_doc(doc: Mapping[str, Any], name: str, where: str) -> tuple[ModelRecord, int]:
    """Parse a model.json document; returns the record and the version high-water mark."""
    if doc.get("name") != name:
        raise DataLoss(f"{where}: names model {doc.get('name')!r:.80}, expected {name!r}")
    labels = _get(doc, "labels", dict, where)
    for label, version in labels.items():
        if wire.name_problem(label) is not None or isinstance(version, bool):
            raise DataLoss(f"{where}: malformed label {label!r:.80}")
        if not isinstance(version, int) or version < 1:
            raise DataLoss(f"{where}: label {label!r} names a malformed version")
    record = ModelRecord(
        name=name,
        spec=_get(doc, "spec", dict, where),
        settings=_get(doc, "settings", dict, where),
        labels=labels,
        created_at=float(_get(doc, "created_at", (int, float), where)),
    )
    last_version = _get(doc, "last_version", int, where)
    return record, last_version


def version_from_doc(doc: Mapping[str, Any], name: str, version: int, where: str) -> VersionMeta:
    """Parse a version's meta.json, checking that it describes the folder it lies in."""
    if doc.get("model") != name or doc.get("version") != version:
        raise DataLoss(f"{where}: describes another model or version")
    parent = doc.get("parent")
    if parent is not None and (isinstance(parent, bool) or not isinstance(parent, int)):
        raise DataLoss(f"{where}: field 'parent' is malformed")
    sha = _get(doc, "sha256", str, where)
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise DataLoss(f"{where}: field 'sha256' is malformed")
    metrics = _get(doc, "metrics", dict, where)
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in metrics.values()):
        raise DataLoss(f"{where}: field 'metrics' is malformed")
    return VersionMeta(
        model=name,
        version=version,
        step=_get(doc, "step", int, where),
        created_at=float(_get(doc, "created_at", (int, float), where)),
        parent=parent,
        metrics={k: float(v) for k, v in metrics.items()},
        sha256=sha,
        size_bytes=_get(doc, "size_bytes", int, where),
        spec=_get(doc, "spec", dict, where),
    )

"""The model store: every saved version of every model, on disk, atomic and verified.

See `service.store.modelstore` for the layout and the guarantees."""

from propserve.service.store.modelstore import ModelStore
from propserve.service.store.records import (
    DEFAULT_MAX_METADATA_BYTES,
    DEFAULT_SETTINGS,
    NAME_PATTERN,
    ModelRecord,
    VersionMeta,
)

__all__ = [
    "DEFAULT_MAX_METADATA_BYTES",
    "DEFAULT_SETTINGS",
    "NAME_PATTERN",
    "ModelRecord",
    "ModelStore",
    "VersionMeta",
]

"""The engine's exception types.

Every error the engine raises on purpose is an :class:`EngineError`; the service maps these
to its own error table. Raising one never leaves a network changed.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class of the engine's errors."""


class SpecError(EngineError, ValueError):
    """A spec that cannot describe a network: unknown names, bad sizes, bad hyper-parameters."""


class InputError(EngineError, ValueError):
    """Inputs or targets that do not fit the network: rank, width, dtype, non-finite values,
    labels out of range, mismatched or empty batches."""


class DivergedError(EngineError):
    """A training step whose loss or new parameters are not finite; the step was refused and
    the network keeps its previous parameters and optimizer state."""


class StateError(EngineError, ValueError):
    """Serialised state that cannot be loaded: malformed safetensors, missing or extra tensors,
    shapes or dtypes that do not match the spec."""

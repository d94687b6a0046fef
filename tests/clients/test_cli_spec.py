"""The CLI's spec flags offer exactly the engine's choices (the clients cannot import the
engine, so propserve.clients.cli.spec writes them out; this keeps the two the same)."""

from __future__ import annotations

from propserve.clients.cli import spec
from propserve.engine import spec as engine


def test_the_flags_offer_the_engines_choices() -> None:
    assert set(spec.LOSSES) == set(engine.LOSS_OUTPUTS)
    assert set(spec.OPTIMIZERS) == set(engine.OPTIMIZERS)
    assert set(spec.DTYPES) == set(engine.DTYPES)
    assert set(spec.ACTIVATIONS) == set(engine.HIDDEN_ACTIVATIONS)
    assert set(spec.ACTIVATIONS + spec.OUTPUT_ONLY) == set(engine.OUTPUT_ACTIVATIONS)
    # The default loss is one of them, and listed first (as --help shows it).
    assert spec.LOSSES[0] == "softmax_cross_entropy"

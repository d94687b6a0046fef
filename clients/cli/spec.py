"""A model's spec from ``models create``'s flags and/or a JSON spec file.

The choices offered for the flags are the engine's (propserve.engine.spec), written out
here because the clients do not import the engine; a test keeps the two the same.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from propserve.clients.cli.datafiles import UsageError

#: Activations of any layer; softmax only as the output of softmax_cross_entropy.
ACTIVATIONS = ("identity", "relu", "leaky_relu", "sigmoid", "tanh", "gelu")
OUTPUT_ONLY = ("softmax",)
LOSSES = ("softmax_cross_entropy", "binary_cross_entropy", "mse")
OPTIMIZERS = ("sgd", "adam", "adamw")
DTYPES = ("float32", "float64")


def parse_layers(text: str) -> list[dict[str, Any]]:
    """'64:relu,32:tanh,10' -> [{units: 64, activation: relu}, ..., {units: 10}].

    The last layer may omit its activation: the server then picks the one its loss needs.
    """
    layers: list[dict[str, Any]] = []
    for part in text.split(","):
        units_text, _, activation = part.strip().partition(":")
        try:
            units = int(units_text)
        except ValueError:
            raise UsageError(
                f"bad --layers entry {part.strip()!r}: expected UNITS[:ACTIVATION], e.g. 64:relu,10"
            ) from None
        layer: dict[str, Any] = {"units": units}
        if activation:
            layer["activation"] = activation
        layers.append(layer)
    return layers


def build_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The spec from --spec FILE (or '-'), with any flags given overriding its fields."""
    spec: dict[str, Any] = {}
    if args.spec is not None:
        source = "stdin" if args.spec == "-" else args.spec
        try:
            text = sys.stdin.read() if args.spec == "-" else Path(args.spec).read_text()
            loaded = json.loads(text)
        except OSError as exc:
            raise UsageError(f"cannot read spec file {source}: {exc.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"bad spec file {source}: not valid JSON ({exc})") from None
        if not isinstance(loaded, dict):
            raise UsageError(f"bad spec file {source}: expected a JSON object")
        spec = loaded
    if args.input_dim is not None:
        spec["input_dim"] = args.input_dim
    if args.layers is not None:
        spec["layers"] = parse_layers(args.layers)
    if args.loss is not None:
        spec["loss"] = args.loss
    elif "loss" not in spec:
        spec["loss"] = "softmax_cross_entropy"
    if args.optimizer is not None or args.lr is not None:
        optimizer = spec.get("optimizer", {"name": "sgd"})
        optimizer = {"name": optimizer} if isinstance(optimizer, str) else dict(optimizer)
        if args.optimizer is not None and optimizer.get("name") != args.optimizer:
            optimizer = {"name": args.optimizer}
        if args.lr is not None:
            optimizer["lr"] = args.lr
        spec["optimizer"] = optimizer
    if args.dtype is not None:
        spec["dtype"] = args.dtype
    if args.seed is not None:
        spec["seed"] = args.seed
    missing = [k for k in ("input_dim", "layers") if k not in spec]
    if missing:
        raise UsageError(
            f"bad spec: missing {' and '.join(missing)}; give --spec FILE or "
            "--input-dim N --layers 64:relu,10"
        )
    return spec

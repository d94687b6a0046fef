"""``propserve predict``: outputs for rows from a file or stdin."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from propserve.clients import Client
from propserve.clients.cli import output
from propserve.clients.cli.datafiles import UsageError, load_inputs

EXIT_OK = 0


def predict(args: argparse.Namespace, client: Client) -> int:
    x = load_inputs(args.file, args.x_key)
    if x.ndim == 1:
        x = x.reshape(1, -1)
    if x.ndim != 2 or x.shape[0] == 0:
        raise UsageError(f"inputs must be (rows, features), got shape {x.shape}")
    if x.dtype.kind != "f":
        x = x.astype(np.float64)
    prediction = client.predict(args.name, x, version=args.version, label=args.label)
    outputs = prediction.outputs
    if args.output is not None:
        try:
            np.save(args.output, outputs)
        except OSError as exc:
            raise UsageError(f"cannot write {args.output}: {exc.strerror}") from None
        print(f"wrote outputs of shape {outputs.shape} to {args.output}", file=sys.stderr)
        if args.json:
            output.print_json(
                {"version": prediction.version, "step": prediction.step, "output": args.output}
            )
        return EXIT_OK
    body: dict[str, Any] = {"version": prediction.version, "step": prediction.step}
    if args.argmax:
        body["classes"] = outputs.argmax(axis=1).tolist()
    body["outputs"] = outputs.tolist()
    print(json.dumps(body))
    return EXIT_OK

"""Train a digit classifier on a running propserve server, from nothing, and check it.

Creates a model, streams scikit-learn's bundled digits (8x8 images, no download) to it in
batches over gRPC with a progress line per epoch, saves a version, labels it ``stable``,
then asks over REST, by that label, for a few predictions and the held-out rows' loss and
accuracy (Evaluate)::

    propserve serve &
    python examples/train_digits.py                      # about 97% after 20 epochs
    python examples/train_digits.py --epochs 3 --min-accuracy 0.85

Exits 0 when the test accuracy reaches --min-accuracy, 1 when it does not, 2 when the
server refuses or cannot be reached. A token (role train or admin) comes from --token or
PROPSERVE_TOKEN when the server asks for one.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from propserve.clients import (
    AlreadyExists,
    ClientError,
    GrpcClient,
    NotFound,
    Progress,
    RestClient,
    Unavailable,
)

SPEC = {
    "input_dim": 64,
    "layers": [{"units": 128, "activation": "relu"}, {"units": 10, "activation": "softmax"}],
    "loss": "softmax_cross_entropy",
    "optimizer": {"name": "adam", "lr": 0.003},
    "dtype": "float32",
    "seed": 0,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grpc", default="127.0.0.1:50051", help="gRPC host:port")
    parser.add_argument("--rest", default="http://127.0.0.1:8000", help="REST base URL")
    parser.add_argument("--token", default=os.environ.get("PROPSERVE_TOKEN"))
    parser.add_argument("--model", default="digits", help="model name (default digits)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and shuffling")
    parser.add_argument("--min-accuracy", type=float, default=0.96)
    parser.add_argument(
        "--replace", action="store_true", help="delete a model of the same name first"
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # pixels 0..16 -> 0..1
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=args.seed
    )
    rng = np.random.default_rng(args.seed)
    n_batches = -(-len(x_train) // args.batch_size)

    with GrpcClient(args.grpc, token=args.token) as grpc_client:
        if args.replace:
            with contextlib.suppress(NotFound):
                grpc_client.delete_model(args.model)
        model = grpc_client.create_model(args.model, SPEC)
        print(f"created model {model.name}: 64-128-10, {model.parameter_count:,} parameters")
        for epoch in range(1, args.epochs + 1):
            order = rng.permutation(len(x_train))
            batches = (
                (x_train[order[i : i + args.batch_size]], y_train[order[i : i + args.batch_size]])
                for i in range(0, len(order), args.batch_size)
            )
            # One bidirectional stream per epoch, with a live progress line on stderr.
            progress = Progress(n_batches, label=f"epoch {epoch:>2}/{args.epochs}")
            grpc_client.train(args.model, batches, progress=progress)
            progress.close()
        version = grpc_client.save_version(args.model)
        grpc_client.set_label(args.model, "stable", version.version)
        print(f"saved version {version.version} at step {version.step}, labelled stable")

    with RestClient(args.rest, token=args.token) as rest_client:
        prediction = rest_client.predict(args.model, x_test[:3], label="stable")
        print(f"predicted {prediction.outputs.argmax(axis=1).tolist()}, true {y_test[:3].tolist()}")
        # The server scores the held-out rows itself: the loss as training computes it.
        held_out = rest_client.evaluate(args.model, x_test, y_test, label="stable")
    accuracy = held_out.accuracy or 0.0
    print(
        f"test accuracy {accuracy:.4f}, loss {held_out.loss:.4f} on {held_out.rows} held-out "
        f"digits (version {held_out.version} by label 'stable', over REST)"
    )
    if accuracy < args.min_accuracy:
        print(f"below --min-accuracy {args.min_accuracy}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except Unavailable as exc:
        where = f"{args.grpc} (gRPC) or {args.rest} (REST)"
        print(f"train_digits: cannot reach the server at {where}: {exc}", file=sys.stderr)
        return 2
    except AlreadyExists as exc:
        print(f"train_digits: {exc} (pass --replace to start over)", file=sys.stderr)
        return 2
    except ClientError as exc:
        print(f"train_digits: {exc.code.name}: {exc.message.splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""``propserve train``: a model trained on a local .npz or .csv file.

Batches go to the server in order, an epoch at a time (cut where a ``--save-every`` save
falls), with an optional held-out validation split whose loss and accuracy the server
computes after each epoch (Evaluate), as it computes a training step's.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from numpy.typing import NDArray

from propserve.clients import Client, Progress, StepResult, errors
from propserve.clients.calls import stopped_message
from propserve.clients.cli import output
from propserve.clients.cli.datafiles import UsageError, fit_to_model, load_training_data

EXIT_OK = 0
EVALUATE_CHUNK = 4096


def _batches(
    x: NDArray[Any], y: NDArray[Any], order: NDArray[np.intp], size: int
) -> list[tuple[NDArray[Any], NDArray[Any]]]:
    return [(x[order[i : i + size]], y[order[i : i + size]]) for i in range(0, len(order), size)]


def _evaluate_all(
    client: Client, name: str, x: NDArray[Any], y: NDArray[Any]
) -> tuple[float, float | None]:
    """The head's (loss, accuracy) on (x, y), by the server's Evaluate in chunks of rows;
    the losses are means, so the chunks' combine weighted by their rows."""
    parts = [
        client.evaluate(name, x[i : i + EVALUATE_CHUNK], y[i : i + EVALUATE_CHUNK])
        for i in range(0, len(x), EVALUATE_CHUNK)
    ]
    rows = sum(part.rows for part in parts)
    loss = sum(part.loss * part.rows for part in parts) / rows
    if any(part.accuracy is None for part in parts):
        return loss, None
    return loss, sum((part.accuracy or 0.0) * part.rows for part in parts) / rows


def train(args: argparse.Namespace, client: Client) -> int:
    if args.batch_size < 1 or args.epochs < 1:
        raise UsageError("--batch-size and --epochs must be at least 1")
    if not 0.0 <= args.validation_split < 1.0:
        raise UsageError("--validation-split must be in [0, 1)")
    if args.save_every is not None and args.save_every < 1:
        raise UsageError("--save-every must be at least 1")
    x, y = load_training_data(args)
    spec = client.get_model(args.name).spec
    x, y = fit_to_model(x, y, spec, args.data, args.name)
    rng = np.random.default_rng(args.seed)
    n_val = round(len(x) * args.validation_split)
    if args.validation_split and not 0 < n_val < len(x):
        raise UsageError(f"--validation-split {args.validation_split} leaves no rows on one side")
    # The held-out rows are a seeded random sample, so sorted files still validate fairly.
    split = rng.permutation(len(x)) if n_val else np.arange(len(x))
    train_rows, val_rows = np.sort(split[n_val:]), split[:n_val]
    x_val, y_val = x[val_rows], y[val_rows]
    x, y = x[train_rows], y[train_rows]

    out = sys.stderr if args.json else sys.stdout
    live = sys.stderr.isatty()
    epochs: list[dict[str, Any]] = []
    saved: list[int] = []
    steps = 0
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(len(x)) if args.shuffle else np.arange(len(x))
        batches = _batches(x, y, order, args.batch_size)
        progress = Progress(len(batches), sys.stderr, f"epoch {epoch}/{args.epochs}")
        start = time.perf_counter()
        results: list[StepResult] = []
        for chunk in _save_chunks(batches, steps, args.save_every):
            try:
                results += client.train(
                    args.name, chunk, learning_rate=args.lr, progress=progress if live else False
                )
            except errors.ClientError as exc:
                if exc.applied is None:
                    raise
                applied = results + list(exc.applied)
                raise _stopped(exc, applied, epoch, args.epochs, saved) from None
            steps += len(chunk)
            if args.save_every and steps % args.save_every == 0:
                saved.append(client.save_version(args.name).version)
        elapsed = max(time.perf_counter() - start, 1e-9)
        if live:
            sys.stderr.write("\r\033[K")
        record = _epoch_record(epoch, results, elapsed)
        if n_val:
            record["val_loss"], record["val_accuracy"] = _evaluate_all(
                client, args.name, x_val, y_val
            )
        epochs.append(record)
        print(_epoch_line(record, args.epochs), file=out, flush=True)
    if args.save and (not saved or not args.save_every or steps % args.save_every):
        saved.append(client.save_version(args.name).version)
    if args.json:
        output.print_json({"model": args.name, "steps": steps, "epochs": epochs, "saved": saved})
    elif saved:
        print(f"saved version{'s' if len(saved) > 1 else ''} {', '.join(map(str, saved))}")
    return EXIT_OK


def _stopped(
    error: errors.ClientError,
    applied: list[StepResult],
    epoch: int,
    epochs: int,
    saved: list[int],
) -> errors.ClientError:
    """A stopped run's error, its batches numbered within the epoch (and the epoch named
    when there are several), with the versions saved before it."""
    where = f"epoch {epoch}/{epochs}: " if epochs > 1 else ""
    kept = f" (saved before it: version {', '.join(map(str, saved))})" if saved else ""
    return error.restated(f"{where}{stopped_message(applied, error.reason)}{kept}")


def _save_chunks(
    batches: list[tuple[NDArray[Any], NDArray[Any]]], done: int, every: int | None
) -> Iterator[list[tuple[NDArray[Any], NDArray[Any]]]]:
    """Split one epoch's batches where a --save-every boundary falls (counting from the run's
    first step), so that each save sees exactly the steps before it."""
    if not every:
        yield batches
        return
    i = 0
    while i < len(batches):
        take = every - (done + i) % every
        yield batches[i : i + take]
        i += take


def _epoch_record(epoch: int, results: list[StepResult], elapsed: float) -> dict[str, Any]:
    samples = sum(r.batch_size for r in results)
    loss = sum(r.loss * r.batch_size for r in results) / max(samples, 1)
    accuracies = [r for r in results if r.accuracy is not None]
    accuracy = (
        sum((r.accuracy or 0.0) * r.batch_size for r in accuracies) / samples
        if accuracies and len(accuracies) == len(results)
        else None
    )
    return {
        "epoch": epoch,
        "step": results[-1].step if results else None,
        "loss": loss,
        "accuracy": accuracy,
        "samples": samples,
        "samples_per_second": samples / elapsed,
    }


def _epoch_line(record: dict[str, Any], epochs: int) -> str:
    width = len(str(epochs))
    parts = [
        f"epoch {record['epoch']:>{width}}/{epochs}",
        f"loss {record['loss']:.4f}",
    ]
    if record["accuracy"] is not None:
        parts.append(f"acc {record['accuracy']:.4f}")
    if "val_loss" in record:
        parts.append(f"val_loss {record['val_loss']:.4f}")
        if record["val_accuracy"] is not None:
            parts.append(f"val_acc {record['val_accuracy']:.4f}")
    parts.append(f"{record['samples_per_second']:,.0f} samples/s")
    return "  ".join(parts)

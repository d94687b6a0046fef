"""The client half of the ``propserve`` command: models, train, predict and versions.

Every verb talks to a running server through :mod:`clients` (gRPC by default, REST with
``--transport rest`` or with ``--rest URL`` alone), never to the store directly::

    propserve models create digits --input-dim 64 --layers 64:relu,10 --optimizer adam
    propserve models list [--json]
    propserve train digits data.npz --epochs 5 --validation-split 0.1 --save
    propserve predict digits rows.csv --label stable --output out.npy
    propserve versions label digits stable 3

Connection options go after the verb, before or after its arguments: ``--grpc HOST:PORT``,
``--rest URL``, ``--transport``, ``--token`` (or ``PROPSERVE_TOKEN``), ``--tls``,
``--ca-cert``, ``--timeout``, ``--json``.

Exit codes: 0 success; 1 the server refused (unknown model, invalid argument, ...);
2 bad usage or a bad local file or spec; 3 the server cannot be reached or timed out;
130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TextIO

import numpy as np
from numpy.typing import NDArray

from propserve.clients import errors
from propserve.clients._progress import Progress
from propserve.clients.datafiles import UsageError, as_targets, load_inputs, load_training_data
from propserve.clients.grpc_client import GrpcClient
from propserve.clients.rest_client import RestClient
from propserve.clients.types import Model, Prediction, StepResult, Version

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130

DEFAULT_GRPC = "127.0.0.1:50051"
DEFAULT_REST = "http://127.0.0.1:8000"
PREDICT_CHUNK = 4096


class Client(Protocol):
    """What the CLI needs; GrpcClient and RestClient both provide it."""

    def close(self) -> None: ...
    def create_model(
        self,
        name: str,
        spec: dict[str, Any],
        *,
        retain: int | None = ...,
        autosave_every: int | None = ...,
    ) -> Model: ...
    def get_model(self, name: str) -> Model: ...
    def list_models(self) -> list[Model]: ...
    def delete_model(self, name: str) -> None: ...
    def predict(
        self, name: str, inputs: Any, *, version: int | None = ..., label: str | None = ...
    ) -> Prediction: ...
    def train(
        self,
        name: str,
        batches: Any,
        *,
        learning_rate: float | None = ...,
        progress: bool | Progress = ...,
        total: int | None = ...,
    ) -> list[StepResult]: ...
    def save_version(self, name: str) -> Version: ...
    def list_versions(self, name: str) -> list[Version]: ...
    def set_label(self, name: str, label: str, version: int) -> Model: ...
    def remove_label(self, name: str, label: str) -> Model: ...
    def rollback(
        self, name: str, *, version: int | None = ..., label: str | None = ...
    ) -> Model: ...


# ---------------------------------------------------------------- connection and output


def settle_connection(args: argparse.Namespace) -> None:
    """Fill in the connection's defaults: ``--rest URL`` alone means REST, anything else
    gRPC unless ``--transport`` says which."""
    if args.transport is None:
        args.transport = "rest" if args.rest is not None and args.grpc is None else "grpc"
    args.grpc = args.grpc or DEFAULT_GRPC
    args.rest = args.rest or DEFAULT_REST


def _address(args: argparse.Namespace) -> str:
    return str(args.rest if args.transport == "rest" else args.grpc)


def connect(args: argparse.Namespace) -> Client:
    token = args.token or os.environ.get("PROPSERVE_TOKEN") or None
    if args.ca_cert is not None and not args.ca_cert.is_file():
        raise UsageError(f"CA certificate {args.ca_cert} is not a readable file")
    if args.transport == "rest":
        return RestClient(
            args.rest, token=token, root_certificates=args.ca_cert, timeout=args.timeout
        )
    return GrpcClient(
        args.grpc,
        token=token,
        tls=args.tls,
        root_certificates=args.ca_cert,
        timeout=args.timeout,
    )


def _print_json(value: Any, stream: TextIO | None = None) -> None:
    print(json.dumps(value, indent=2, default=_json_default), file=stream or sys.stdout)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        padded = [str(c).ljust(w) for c, w in zip(cells[:-1], widths[:-1], strict=True)]
        return "  ".join([*padded, str(cells[-1])]).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _labels(labels: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"


# ---------------------------------------------------------------- models


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


def _model_json(model: Model) -> dict[str, Any]:
    return dataclasses.asdict(model)


def _models_create(args: argparse.Namespace, client: Client) -> int:
    spec = build_spec(args)
    model = client.create_model(
        args.name, spec, retain=args.retain, autosave_every=args.autosave_every
    )
    if args.json:
        _print_json(_model_json(model))
    else:
        print(f"created model {model.name} ({model.parameter_count:,} parameters)")
    return EXIT_OK


def _models_list(args: argparse.Namespace, client: Client) -> int:
    models = client.list_models()
    if args.json:
        _print_json([_model_json(m) for m in models])
        return EXIT_OK
    if not models:
        print("no models")
        return EXIT_OK
    rows = [
        [
            m.name,
            str(m.head_step),
            "-" if m.latest_version is None else str(m.latest_version),
            str(m.unsaved_steps),
            f"{m.parameter_count:,}",
            _num(m.last_loss),
            _labels(m.labels),
        ]
        for m in models
    ]
    print(_table(["NAME", "STEP", "LATEST", "UNSAVED", "PARAMS", "LOSS", "LABELS"], rows))
    return EXIT_OK


def _models_show(args: argparse.Namespace, client: Client) -> int:
    m = client.get_model(args.name)
    if args.json:
        _print_json(_model_json(m))
        return EXIT_OK
    spec = m.spec
    layers = ", ".join(
        f"{layer['units']}:{layer.get('activation', '?')}" for layer in spec["layers"]
    )
    optimizer = spec.get("optimizer", {})
    rows = [
        ["name", m.name],
        ["input_dim", str(spec.get("input_dim"))],
        ["layers", layers],
        ["loss", str(spec.get("loss"))],
        ["optimizer", f"{optimizer.get('name')} lr={optimizer.get('lr')}"],
        ["dtype", str(spec.get("dtype"))],
        ["seed", str(spec.get("seed"))],
        ["parameters", f"{m.parameter_count:,}"],
        ["head step", str(m.head_step)],
        ["latest version", "-" if m.latest_version is None else str(m.latest_version)],
        ["unsaved steps", str(m.unsaved_steps)],
        ["last loss", _num(m.last_loss)],
        ["labels", _labels(m.labels)],
        ["retain", str(m.settings.get("retain"))],
        ["autosave every", str(m.settings.get("autosave_every"))],
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
    return EXIT_OK


def _models_delete(args: argparse.Namespace, client: Client) -> int:
    client.delete_model(args.name)
    if args.json:
        _print_json({"deleted": args.name})
    else:
        print(f"deleted model {args.name}")
    return EXIT_OK


# ---------------------------------------------------------------- train


def _batches(
    x: NDArray[Any], y: NDArray[Any], order: NDArray[np.intp], size: int
) -> list[tuple[NDArray[Any], NDArray[Any]]]:
    return [(x[order[i : i + size]], y[order[i : i + size]]) for i in range(0, len(order), size)]


def evaluate(outputs: NDArray[Any], y: NDArray[Any], loss: str) -> tuple[float, float | None]:
    """(loss, accuracy) of predicted outputs against targets, as the engine defines them
    (mean reductions; accuracy None for mse). outputs are probabilities for the
    cross-entropy losses."""
    out = outputs.astype(np.float64)
    # NOTE: probabilities can round to exactly 0 or 1; clip before the log.
    eps = 1e-12
    if loss == "softmax_cross_entropy":
        p = np.clip(out, eps, 1.0)
        if y.ndim == 1:
            labels = y.astype(np.int64)
            value = float(-np.log(p[np.arange(len(labels)), labels]).mean())
            truth = labels
        else:
            value = float(-(y * np.log(p)).sum(axis=1).mean())
            truth = y.argmax(axis=1)
        return value, float(np.mean(out.argmax(axis=1) == truth))
    if loss == "binary_cross_entropy":
        p = np.clip(out, eps, 1.0 - eps)
        value = float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())
        return value, float(np.mean((out > 0.5) == (y > 0.5)))
    return float(((out - y) ** 2).mean()), None


def _predict_all(client: Client, name: str, x: NDArray[Any]) -> NDArray[Any]:
    parts = [
        client.predict(name, x[i : i + PREDICT_CHUNK]).outputs
        for i in range(0, len(x), PREDICT_CHUNK)
    ]
    return np.concatenate(parts)


def _train(args: argparse.Namespace, client: Client) -> int:
    if args.batch_size < 1 or args.epochs < 1:
        raise UsageError("--batch-size and --epochs must be at least 1")
    if not 0.0 <= args.validation_split < 1.0:
        raise UsageError("--validation-split must be in [0, 1)")
    if args.save_every is not None and args.save_every < 1:
        raise UsageError("--save-every must be at least 1")
    x, y = load_training_data(args)
    spec = client.get_model(args.name).spec
    x = x.astype(spec.get("dtype", "float32"), copy=False)
    y = as_targets(y, spec)
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
            results += client.train(
                args.name, chunk, learning_rate=args.lr, progress=progress if live else False
            )
            steps += len(chunk)
            if args.save_every and steps % args.save_every == 0:
                saved.append(client.save_version(args.name).version)
        elapsed = max(time.perf_counter() - start, 1e-9)
        if live:
            sys.stderr.write("\r\033[K")
        record = _epoch_record(epoch, results, elapsed)
        if n_val:
            record["val_loss"], record["val_accuracy"] = evaluate(
                _predict_all(client, args.name, x_val), y_val, str(spec.get("loss"))
            )
        epochs.append(record)
        print(_epoch_line(record, args.epochs), file=out, flush=True)
    if args.save and (not saved or not args.save_every or steps % args.save_every):
        saved.append(client.save_version(args.name).version)
    if args.json:
        _print_json({"model": args.name, "steps": steps, "epochs": epochs, "saved": saved})
    elif saved:
        print(f"saved version{'s' if len(saved) > 1 else ''} {', '.join(map(str, saved))}")
    return EXIT_OK


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


# ---------------------------------------------------------------- predict


def _predict(args: argparse.Namespace, client: Client) -> int:
    if args.version is not None and args.label is not None:
        raise UsageError("give --version or --label, not both")
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
            _print_json(
                {"version": prediction.version, "step": prediction.step, "output": args.output}
            )
        return EXIT_OK
    body: dict[str, Any] = {"version": prediction.version, "step": prediction.step}
    if args.argmax:
        body["classes"] = outputs.argmax(axis=1).tolist()
    body["outputs"] = outputs.tolist()
    print(json.dumps(body))
    return EXIT_OK


# ---------------------------------------------------------------- versions


def _version_json(version: Version) -> dict[str, Any]:
    return dataclasses.asdict(version)


def _versions_list(args: argparse.Namespace, client: Client) -> int:
    versions = client.list_versions(args.name)
    if args.json:
        _print_json([_version_json(v) for v in versions])
        return EXIT_OK
    if not versions:
        print(f"model {args.name} has no saved versions")
        return EXIT_OK
    rows = [
        [
            str(v.version),
            str(v.step),
            "-" if v.parent is None else str(v.parent),
            ",".join(v.labels) or "-",
            _size(v.size_bytes),
            v.sha256[:12],
            " ".join(f"{k}={val:.4g}" for k, val in sorted(v.metrics.items())) or "-",
        ]
        for v in versions
    ]
    print(_table(["VERSION", "STEP", "PARENT", "LABELS", "SIZE", "SHA256", "METRICS"], rows))
    return EXIT_OK


def _versions_save(args: argparse.Namespace, client: Client) -> int:
    version = client.save_version(args.name)
    if args.json:
        _print_json(_version_json(version))
    else:
        print(f"saved {args.name} version {version.version} (step {version.step})")
    return EXIT_OK


def _versions_label(args: argparse.Namespace, client: Client) -> int:
    model = client.set_label(args.name, args.label, args.version)
    if args.json:
        _print_json(_model_json(model))
    else:
        print(f"labelled {args.name} version {args.version} {args.label!r}")
    return EXIT_OK


def _versions_unlabel(args: argparse.Namespace, client: Client) -> int:
    model = client.remove_label(args.name, args.label)
    if args.json:
        _print_json(_model_json(model))
    else:
        print(f"removed label {args.label!r} from {args.name}")
    return EXIT_OK


def _versions_rollback(args: argparse.Namespace, client: Client) -> int:
    if (args.version is None) == (args.label is None):
        raise UsageError("rollback needs a VERSION or --label LABEL (one of them)")
    model = client.rollback(args.name, version=args.version, label=args.label)
    if args.json:
        _print_json(_model_json(model))
    else:
        target = f"version {args.version}" if args.version is not None else repr(args.label)
        print(f"rolled {args.name} back to {target} (head step {model.head_step})")
    return EXIT_OK


# ---------------------------------------------------------------- running a verb


def run(verb: Callable[[argparse.Namespace, Client], int], args: argparse.Namespace) -> int:
    """Connect, run ``verb`` and turn every failure into one line on stderr and an exit code."""
    settle_connection(args)
    try:
        client = connect(args)
        try:
            return verb(args, client)
        finally:
            client.close()
    except UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except (errors.Unavailable, errors.DeadlineExceeded) as exc:
        where = f"{_address(args)} ({args.transport})"
        first = exc.message.splitlines()[0] if exc.message else exc.code.name
        first = first.removeprefix("cannot reach the server: ")
        if isinstance(exc, errors.DeadlineExceeded):
            return _fail(f"no answer from the server at {where} in time: {first}", EXIT_UNREACHABLE)
        return _fail(f"cannot reach the server at {where}: {first}", EXIT_UNREACHABLE)
    except errors.ClientError as exc:
        message = exc.message.splitlines()[0] if exc.message else exc.code.name.replace("_", " ")
        return _fail(message, EXIT_REFUSED)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:
        # The reader went away (e.g. `| head`); point stdout at nothing so exit is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as exc:
        return _fail(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), EXIT_USAGE)


def _fail(message: str, code: int) -> int:
    print(f"propserve: {message}", file=sys.stderr)
    return code


def _verb(function: Callable[[argparse.Namespace, Client], int]) -> Callable[..., int]:
    def handler(args: argparse.Namespace) -> int:
        return run(function, args)

    return handler


def _common() -> argparse.ArgumentParser:
    """Options every client verb takes (after the verb)."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("connection")
    group.add_argument("--grpc", metavar="HOST:PORT", help=f"gRPC address ({DEFAULT_GRPC})")
    group.add_argument("--rest", metavar="URL", help=f"REST base URL ({DEFAULT_REST})")
    group.add_argument(
        "--transport",
        choices=("grpc", "rest"),
        help="which API to use (gRPC, or REST when only --rest is given)",
    )
    group.add_argument("--token", default=None, help="bearer token (default: $PROPSERVE_TOKEN)")
    group.add_argument("--tls", action="store_true", help="use TLS for gRPC (REST: https URL)")
    group.add_argument(
        "--ca-cert", dest="ca_cert", type=Path, default=None, help="PEM CA file to trust (TLS)"
    )
    group.add_argument("--timeout", type=float, default=30.0, help="seconds per call (default 30)")
    group.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")
    return parent


def add_client_commands(sub: Any) -> None:
    """Register models, train, predict and versions on ``propserve``'s subparsers."""
    common = _common()

    models = sub.add_parser("models", help="create, list, show and delete models")
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    create = models_sub.add_parser(
        "create",
        parents=[common],
        help="create a model from a JSON spec file or flags",
        description="Create a model. Flags override fields of --spec. Layers: UNITS[:ACT],... "
        "(the last layer's activation defaults to what the loss needs).",
    )
    create.add_argument("name")
    create.add_argument("--spec", metavar="FILE", help="JSON spec file ('-': stdin)")
    create.add_argument("--input-dim", dest="input_dim", type=int)
    create.add_argument("--layers", metavar="64:relu,10")
    create.add_argument(
        "--loss",
        choices=("softmax_cross_entropy", "binary_cross_entropy", "mse"),
        help="default softmax_cross_entropy",
    )
    create.add_argument("--optimizer", choices=("sgd", "adam", "adamw"))
    create.add_argument("--lr", type=float, help="learning rate")
    create.add_argument("--dtype", choices=("float32", "float64"))
    create.add_argument("--seed", type=int)
    create.add_argument("--retain", type=int, help="saved versions to keep")
    create.add_argument(
        "--autosave-every", dest="autosave_every", type=int, help="save every N steps (0: off)"
    )
    create.set_defaults(handler=_verb(_models_create))
    listing = models_sub.add_parser("list", parents=[common], help="list models")
    listing.set_defaults(handler=_verb(_models_list))
    show = models_sub.add_parser("show", parents=[common], help="show one model")
    show.add_argument("name")
    show.set_defaults(handler=_verb(_models_show))
    delete = models_sub.add_parser("delete", parents=[common], help="delete a model")
    delete.add_argument("name")
    delete.set_defaults(handler=_verb(_models_delete))

    train = sub.add_parser(
        "train",
        parents=[common],
        help="train a model on a .npz or .csv file",
        description="Train NAME on DATA: a .npz with arrays x (rows, features) and y (labels "
        "or targets), renamed with --x-key/--y-key, or a .csv with --target-column. Prints "
        "one line per epoch.",
    )
    train.add_argument("name")
    train.add_argument("data", metavar="DATA")
    train.add_argument("--x-key", dest="x_key", default="x", help="inputs array in a .npz (x)")
    train.add_argument("--y-key", dest="y_key", default="y", help="targets array in a .npz (y)")
    train.add_argument(
        "--target-column", dest="target_column", help="CSV target column: header name or index"
    )
    train.add_argument("--batch-size", dest="batch_size", type=int, default=32)
    train.add_argument("--epochs", type=int, default=1)
    train.add_argument("--shuffle", action="store_true", help="shuffle the rows every epoch")
    train.add_argument("--seed", type=int, default=0, help="seed for shuffling and the split")
    train.add_argument(
        "--validation-split",
        dest="validation_split",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="hold out this fraction of rows and report val loss/accuracy each epoch",
    )
    train.add_argument("--lr", type=float, help="learning rate for these steps")
    train.add_argument("--save", action="store_true", help="save a version at the end")
    train.add_argument(
        "--save-every", dest="save_every", type=int, metavar="N", help="save every N steps"
    )
    train.set_defaults(handler=_verb(_train))

    predict = sub.add_parser(
        "predict",
        parents=[common],
        help="predict from a .npy/.npz/.csv/.json file or stdin",
        description="Outputs for the rows in FILE (.npy, .npz, .csv, .json) or stdin (JSON or "
        ".npy bytes), printed as JSON or written with --output.",
    )
    predict.add_argument("name")
    predict.add_argument("file", nargs="?", metavar="FILE|-")
    predict.add_argument("--version", type=int)
    predict.add_argument("--label")
    predict.add_argument("--x-key", dest="x_key", default="x", help="inputs array in a .npz (x)")
    predict.add_argument("--output", "-o", type=Path, help="write the outputs to this .npy")
    predict.add_argument("--argmax", action="store_true", help="also print each row's class")
    predict.set_defaults(handler=_verb(_predict))

    versions = sub.add_parser("versions", help="list, save, label, unlabel and roll back versions")
    versions_sub = versions.add_subparsers(dest="versions_command", required=True, metavar="ACTION")
    vlist = versions_sub.add_parser("list", parents=[common], help="list saved versions")
    vlist.add_argument("name")
    vlist.set_defaults(handler=_verb(_versions_list))
    vsave = versions_sub.add_parser("save", parents=[common], help="save the head as a version")
    vsave.add_argument("name")
    vsave.set_defaults(handler=_verb(_versions_save))
    vlabel = versions_sub.add_parser("label", parents=[common], help="point LABEL at VERSION")
    vlabel.add_argument("name")
    vlabel.add_argument("label")
    vlabel.add_argument("version", type=int)
    vlabel.set_defaults(handler=_verb(_versions_label))
    vunlabel = versions_sub.add_parser("unlabel", parents=[common], help="remove a label")
    vunlabel.add_argument("name")
    vunlabel.add_argument("label")
    vunlabel.set_defaults(handler=_verb(_versions_unlabel))
    vrollback = versions_sub.add_parser(
        "rollback", parents=[common], help="make a saved version the head"
    )
    vrollback.add_argument("name")
    vrollback.add_argument("version", type=int, nargs="?")
    vrollback.add_argument("--label")
    vrollback.set_defaults(handler=_verb(_versions_rollback))


class Parser(argparse.ArgumentParser):
    """Options and positionals in any order (``predict NAME --grpc ADDR FILE``).

    NOTE: argparse matches positionals in runs between options, so an optional positional
    (predict's FILE, rollback's VERSION) met at the end of a run is taken as absent, and what
    follows the option is then "unrecognized". Intermixed parsing reads every option first.
    It does not support subparsers, so a parser with subcommands parses as argparse does."""

    _intermixing = False

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self._intermixing or self._subparsers is not None:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def main(argv: list[str] | None = None) -> int:
    """The client verbs alone (``python -m clients.cli``); ``propserve`` adds ``serve``."""
    parser = Parser(prog="propserve", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_client_commands(sub)
    args = parser.parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())

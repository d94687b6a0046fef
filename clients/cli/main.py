"""The client verbs of the ``propserve`` command: the parser, running a verb, exit codes.

Every verb talks to a running server through propserve.clients (gRPC by default, REST with
``--transport rest`` or with ``--rest URL`` alone), never to the store directly::

    propserve models create digits --input-dim 64 --layers 64:relu,10 --optimizer adam
    propserve models list [--json]
    propserve train digits data.npz --epochs 5 --validation-split 0.1 --save
    propserve predict digits rows.csv --label stable --output out.npy
    propserve versions label digits stable 3

Connection options go after the verb, before or after its arguments: ``--grpc HOST:PORT``,
``--rest URL``, ``--transport``, ``--token``, ``--tls``, ``--ca-cert``, ``--timeout``,
``--json``. The first four default to PROPSERVE_GRPC, PROPSERVE_REST, PROPSERVE_TRANSPORT
and PROPSERVE_TOKEN (see propserve.clients.cli.connection).

Errors are one line on stderr. The exit code says what kind of failure it was, whoever
found it, so that checking a value in the CLI or the client instead of the server never
changes it (also shown by ``--help``)::

    0    done
    1    refused for now or for you: an unknown model, version or label, a name taken,
         a refused (diverging) training step, a token missing or without the role, a
         limit, a busy server
    2    wrong as given, wherever it was found: bad usage, a bad local file, spec or
         value (every invalid_argument, from the CLI, the client or the server)
    3    no answer: the server cannot be reached or did not answer in time
    130  interrupted
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from propserve import wire
from propserve.clients import Client, errors
from propserve.clients.cli import history, models, predict, train, versions
from propserve.clients.cli.connection import (
    DEFAULT_GRPC,
    DEFAULT_REST,
    TRANSPORTS,
    address,
    connect,
    seconds,
    settle_connection,
)
from propserve.clients.cli.datafiles import UsageError
from propserve.clients.cli.spec import ACTIVATIONS, DTYPES, LOSSES, OPTIMIZERS

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130

#: The exit codes, as every verb's --help states them (and this module's docstring).
EXIT_CODES = """exit codes:
    0    done
    1    refused for now or for you: an unknown model, version or label, a name taken,
         a refused (diverging) training step, a token missing or without the role, a
         limit, a busy server
    2    wrong as given, wherever it was found: bad usage, a bad local file, spec or
         value (every invalid_argument, from the CLI, the client or the server)
    3    no answer: the server cannot be reached or did not answer in time
    130  interrupted"""


def run(verb: Callable[[argparse.Namespace, Client], int], args: argparse.Namespace) -> int:
    """Connect, run ``verb`` and turn every failure into one line on stderr and an exit code."""
    try:
        settle_connection(args)
        client = connect(args)
        try:
            return verb(args, client)
        finally:
            client.close()
    except UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except (errors.Unavailable, errors.DeadlineExceeded) as exc:
        where = f"{address(args)} ({args.transport})"
        first = exc.message.splitlines()[0] if exc.message else exc.code.name
        first = first.removeprefix("cannot reach the server: ")
        if isinstance(exc, errors.DeadlineExceeded):
            return _fail(f"no answer from the server at {where} in time: {first}", EXIT_UNREACHABLE)
        return _fail(f"cannot reach the server at {where}: {first}", EXIT_UNREACHABLE)
    except errors.ClientError as exc:
        message = exc.message.splitlines()[0] if exc.message else exc.code.name.replace("_", " ")
        wrong = isinstance(exc, errors.InvalidArgument)
        return _fail(message, EXIT_USAGE if wrong else EXIT_REFUSED)
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
    group.add_argument(
        "--grpc",
        metavar="HOST:PORT",
        help=f"gRPC address (default: $PROPSERVE_GRPC or {DEFAULT_GRPC})",
    )
    group.add_argument(
        "--rest", metavar="URL", help=f"REST base URL (default: $PROPSERVE_REST or {DEFAULT_REST})"
    )
    group.add_argument(
        "--transport",
        choices=TRANSPORTS,
        help="which API to use (default: rest when only --rest is given, else "
        "$PROPSERVE_TRANSPORT or grpc)",
    )
    group.add_argument("--token", default=None, help="bearer token (default: $PROPSERVE_TOKEN)")
    group.add_argument("--tls", action="store_true", help="use TLS for gRPC (REST: https URL)")
    group.add_argument(
        "--ca-cert", dest="ca_cert", type=Path, default=None, help="PEM CA file to trust (TLS)"
    )
    group.add_argument(
        "--timeout", type=seconds, default=30.0, help="seconds per call (default: %(default)s)"
    )
    group.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")
    return parent


def _add_verb(
    sub: Any,
    name: str,
    common: argparse.ArgumentParser,
    verb: Callable[[argparse.Namespace, Client], int],
    *,
    help: str,
    description: str | None = None,
) -> argparse.ArgumentParser:
    """A verb's parser: its help, the connection options, and the exit codes below."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        parents=[common],
        help=help,
        description=textwrap.fill(description or help[0].upper() + help[1:] + ".", 78),
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=_verb(verb))
    return parser


def add_client_commands(sub: Any) -> None:
    """Register models, train, predict and versions on ``propserve``'s subparsers."""
    common = _common()

    models_parser = sub.add_parser("models", help="create, list, show and delete models")
    models_sub = models_parser.add_subparsers(
        dest="models_command", required=True, metavar="ACTION"
    )
    create = _add_verb(
        models_sub,
        "create",
        common,
        models.create,
        help="create a model from a JSON spec file or flags",
        description="Create a model. Flags override fields of --spec. Layers: UNITS[:ACT],... "
        "(the last layer's activation defaults to what the loss needs).",
    )
    create.add_argument("name")
    create.add_argument("--spec", metavar="FILE", help="JSON spec file ('-': stdin)")
    create.add_argument("--input-dim", dest="input_dim", type=int)
    create.add_argument(
        "--layers",
        metavar="64:relu,10",
        help=f"UNITS[:ACTIVATION],... with activations {', '.join(ACTIVATIONS)}",
    )
    create.add_argument("--loss", choices=LOSSES, help="default softmax_cross_entropy")
    create.add_argument("--optimizer", choices=OPTIMIZERS)
    create.add_argument("--lr", type=float, help="learning rate")
    create.add_argument("--dtype", choices=DTYPES)
    create.add_argument("--seed", type=int)
    create.add_argument("--retain", type=int, help="saved versions to keep")
    create.add_argument(
        "--autosave-every", dest="autosave_every", type=int, help="save every N steps (0: off)"
    )
    create.add_argument(
        "--weights",
        type=Path,
        metavar="FILE",
        help="start from these weights (a .safetensors file; saved as version 1)",
    )
    create.add_argument(
        "--layout",
        choices=wire.WEIGHT_LAYOUTS,
        default="propserve",
        help="how --weights names and shapes layers (default: %(default)s; torch: an "
        "nn.Sequential's state_dict)",
    )
    _add_verb(models_sub, "list", common, models.listing, help="list models")
    show = _add_verb(models_sub, "show", common, models.show, help="show one model")
    show.add_argument("name")
    delete = _add_verb(models_sub, "delete", common, models.delete, help="delete a model")
    delete.add_argument("name")

    train_parser = _add_verb(
        sub,
        "train",
        common,
        train.train,
        help="train a model on a .npz or .csv file",
        description="Train NAME on DATA: a .npz with arrays x (rows, features) and y (labels "
        "or targets), renamed with --x-key/--y-key, or a .csv with --target-column. Prints "
        "one line per epoch.",
    )
    train_parser.add_argument("name")
    train_parser.add_argument("data", metavar="DATA")
    train_parser.add_argument(
        "--x-key", dest="x_key", default="x", help="inputs array in a .npz (default: %(default)s)"
    )
    train_parser.add_argument(
        "--y-key", dest="y_key", default="y", help="targets array in a .npz (default: %(default)s)"
    )
    train_parser.add_argument(
        "--target-column", dest="target_column", help="CSV target column: header name or index"
    )
    train_parser.add_argument(
        "--batch-size",
        dest="batch_size",
        type=int,
        default=32,
        help="rows per training step (default: %(default)s)",
    )
    train_parser.add_argument(
        "--epochs", type=int, default=1, help="passes over the rows (default: %(default)s)"
    )
    train_parser.add_argument("--shuffle", action="store_true", help="shuffle the rows every epoch")
    train_parser.add_argument(
        "--seed", type=int, default=0, help="seed of shuffling and the split (default: %(default)s)"
    )
    train_parser.add_argument(
        "--validation-split",
        dest="validation_split",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="hold out this fraction of rows and report val loss/accuracy each epoch "
        "(default: %(default)s, none)",
    )
    train_parser.add_argument(
        "--lr", type=float, help="learning rate for these steps (default: the model's own)"
    )
    train_parser.add_argument("--save", action="store_true", help="save a version at the end")
    train_parser.add_argument(
        "--save-every",
        dest="save_every",
        type=int,
        metavar="N",
        help="save a version every N steps (default: never; see --save)",
    )

    predict_parser = _add_verb(
        sub,
        "predict",
        common,
        predict.predict,
        help="predict from a .npy/.npz/.csv/.json file or stdin",
        description="Outputs for the rows in FILE (.npy, .npz, .csv, .json) or stdin (JSON or "
        ".npy bytes), printed as JSON or written with --output.",
    )
    predict_parser.add_argument("name")
    predict_parser.add_argument("file", nargs="?", metavar="FILE|-")
    predict_parser.add_argument("--version", type=int)
    predict_parser.add_argument("--label")
    predict_parser.add_argument(
        "--x-key", dest="x_key", default="x", help="inputs array in a .npz (default: %(default)s)"
    )
    predict_parser.add_argument("--output", "-o", type=Path, help="write the outputs to this .npy")
    predict_parser.add_argument("--argmax", action="store_true", help="also print each row's class")

    versions_parser = sub.add_parser(
        "versions", help="list, save, label, unlabel and roll back versions"
    )
    versions_sub = versions_parser.add_subparsers(
        dest="versions_command", required=True, metavar="ACTION"
    )
    vlist = _add_verb(versions_sub, "list", common, versions.listing, help="list saved versions")
    vlist.add_argument("name")
    vsave = _add_verb(
        versions_sub, "save", common, versions.save, help="save the head as a version"
    )
    vsave.add_argument("name")
    vlabel = _add_verb(versions_sub, "label", common, versions.label, help="point LABEL at VERSION")
    vlabel.add_argument("name")
    vlabel.add_argument("label")
    vlabel.add_argument("version", type=int)
    vunlabel = _add_verb(versions_sub, "unlabel", common, versions.unlabel, help="remove a label")
    vunlabel.add_argument("name")
    vunlabel.add_argument("label")
    vrollback = _add_verb(
        versions_sub, "rollback", common, versions.rollback, help="make a saved version the head"
    )
    vrollback.add_argument("name")
    vrollback.add_argument("version", type=int, nargs="?")
    vrollback.add_argument("--label")
    vexport = _add_verb(
        versions_sub,
        "export",
        common,
        versions.export,
        help="write a saved version's weights to a file",
        description="Write saved VERSION of NAME to a file: safetensors (in the propserve or "
        "torch layout) or ONNX. Prints the stored version's sha256.",
    )
    vexport.add_argument("name")
    vexport.add_argument("version", type=int)
    vexport.add_argument("--output", "-o", type=Path, required=True, help="the file to write")
    vexport.add_argument(
        "--layout", choices=wire.WEIGHT_LAYOUTS, default="propserve", help="default: %(default)s"
    )
    vexport.add_argument(
        "--format",
        choices=list(wire.WEIGHT_FORMATS),
        default="safetensors",
        help="default: %(default)s",
    )

    history_parser = _add_verb(
        sub,
        "history",
        common,
        history.show,
        help="show a model's training history (a table, or --plot)",
        description="The head's training history: one row per step (or per bucket of --every "
        "steps). --plot draws loss (and accuracy) against step in the terminal, with saved "
        "versions marked.",
    )
    history_parser.add_argument("name")
    history_parser.add_argument("--since", type=int, help="first step")
    history_parser.add_argument("--until", type=int, help="last step")
    history_parser.add_argument(
        "--every", type=int, help="one point per bucket of N steps (default: at most 2000 points)"
    )
    history_parser.add_argument("--plot", action="store_true", help="draw a terminal plot")
    history_parser.add_argument(
        "--tail", type=int, default=20, help="table rows (default: %(default)s)"
    )


class Parser(argparse.ArgumentParser):
    """Options and positionals in any order (``predict NAME --grpc ADDR FILE``).

    NOTE: argparse matches positionals in runs between options, so an optional positional
    (predict's FILE, rollback's VERSION) met at the end of a run is taken as absent, and what
    follows the option is then "unrecognized". Intermixed parsing reads every option first.
    It does not support subparsers, so a parser with subcommands parses as argparse does."""

    _intermixing = False
    _has_subcommands = False

    def add_subparsers(self, **kwargs: Any) -> Any:
        self._has_subcommands = True
        return super().add_subparsers(**kwargs)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self._intermixing or self._has_subcommands:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False

"""``propserve serve``: the server's verb of the ``propserve`` command (see propserve.cli).

Every setting of :class:`~propserve.service.config.Settings` is a flag here and a
``PROPSERVE_*`` environment variable; a flag wins over the variable.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import SecretStr, ValidationError

from propserve.service import errors
from propserve.service.config import Settings, describe, unknown_variables


def _serve(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {
        name: value
        for name, value in vars(args).items()
        if name in Settings.model_fields and value is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        for line in describe(exc).splitlines():
            print(f"propserve: invalid setting: {line}", file=sys.stderr)
        return 2
    if settings.tune_heap:
        from propserve.service.memory import configure_heap  # noqa: PLC0415

        configure_heap()  # before any thread of the server's starts
    from propserve.service import logs  # noqa: PLC0415
    from propserve.service.server import serve  # noqa: PLC0415

    logs.configure(settings.log_level)
    for name in unknown_variables(os.environ):
        logging.getLogger("propserve.config").warning(
            "config.unknown_variable", extra={"variable": name}
        )
    if settings.workers > 1:
        from propserve.service.supervisor import supervise  # noqa: PLC0415

        return supervise(settings)
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        runner = asyncio.run
    try:
        runner(serve(settings, version=args.propserve_version))
    except errors.PropserveError as exc:
        print(f"propserve: {exc.message}", file=sys.stderr)
        return 1
    return 0


def _flag_type(annotation: Any) -> Any:
    """The type a flag's text converts to: the annotation without its None."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return str if annotation is SecretStr else annotation


def add_serve(sub: Any, version: str) -> None:
    """Register ``serve`` on ``propserve``'s subcommands, one flag per setting."""
    serve = sub.add_parser(
        "serve",
        help="run the model server (gRPC and REST)",
        description="Run the model server. Each flag is also an environment variable "
        "(PROPSERVE_<NAME>); a flag wins.",
    )
    for name, field in Settings.model_fields.items():
        kind = _flag_type(field.annotation)
        default = field.default
        help_text = f"{field.description} [PROPSERVE_{name.upper()}]"
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            serve.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                help=f"{help_text} (default: {default})",
            )  # fmt: skip
            continue
        if name == "tokens":
            help_text += " (visible to other users of the machine: prefer --tokens-file)"
        shown = argparse.SUPPRESS if default is None or (kind is str and not default) else default
        serve.add_argument(
            flag,
            dest=name,
            type=Path if kind is Path else kind,
            default=None,
            metavar=name.upper(),
            help=help_text if shown is argparse.SUPPRESS else f"{help_text} (default: {shown})",
        )
    serve.set_defaults(handler=_serve, propserve_version=version)

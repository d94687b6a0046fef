"""The ``propserve`` command: ``serve`` runs the server (with the ``server`` extra), the other
verbs talk to a running one (see propserve.clients.cli)."""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from typing import Any

from propserve.clients.cli import Parser, add_client_commands
from propserve.clients.cli.main import EXIT_CODES


def version() -> str:
    """The installed distribution's version (a source tree that is not installed has none)."""
    try:
        return metadata.version("propserve")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _add_serve(sub: Any, version: str) -> None:
    try:
        from propserve.service.cli import add_serve  # noqa: PLC0415 - the optional server
    except ImportError as exc:
        missing = exc.name or "a dependency"

        def unavailable(args: Any) -> int:
            print(
                f"propserve: the server needs the 'server' extra ({missing} is not installed):"
                " pip install 'propserve[server]'",
                file=sys.stderr,
            )
            return 1

        serve = sub.add_parser("serve", help="run the model server (needs propserve[server])")
        serve.set_defaults(handler=unavailable)
        return
    add_serve(sub, version)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(
        prog="propserve",
        description="Serve and train neural networks: 'propserve serve' runs the server, the "
        "other verbs talk to a running one.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    installed = version()
    parser.add_argument("--version", action="version", version=f"propserve {installed}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub, installed)
    add_client_commands(sub)
    args = parser.parse_args(argv)
    handler: Any = args.handler
    return int(handler(args))


if __name__ == "__main__":
    sys.exit(main())

"""The ``propserve`` command."""

from __future__ import annotations

import argparse
import sys

import engine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="propserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"propserve {engine.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the model server")
    args = parser.parse_args(argv)
    if args.command == "serve":
        print(f"propserve engine {engine.__version__}: the server is not built yet", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Render the docs' tables that come from the code: ``.venv/bin/python scripts/render_docs.py``.

    .venv/bin/python scripts/render_docs.py            # rewrite the tables in docs/
    .venv/bin/python scripts/render_docs.py --check    # exit 1 if a table is stale

- docs/api.md's error table, from propserve.wire's codes;
- docs/operations.md's settings table, from propserve.service.config.Settings.

Each table sits between ``<!-- NAME: generated ... -->`` and ``<!-- /NAME -->``.
"""

from __future__ import annotations

import argparse
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def error_table() -> str:
    from propserve import wire  # noqa: PLC0415

    rows = ["| code | gRPC | HTTP | meaning |", "|---|---|---|---|"]
    rows += [f"| `{c.name}` | {c.grpc} | {c.http} | {c.meaning} |" for c in wire.CODES]
    return "\n".join(rows)


def _shown(default: Any) -> str:
    if default is None:
        return "none"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    return f"`{default}`"


def _kind(annotation: Any) -> str:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return {"SecretStr": "str", "PosixPath": "path", "Path": "path"}.get(
        annotation.__name__, annotation.__name__
    )


def settings_table() -> str:
    from propserve.service.config import Settings  # noqa: PLC0415

    rows = ["| variable | flag | type | default | meaning |", "|---|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        rows.append(
            f"| `PROPSERVE_{name.upper()}` | `{flag}` | {_kind(field.annotation)} "
            f"| {_shown(field.default)} | {field.description} |"
        )
    return "\n".join(rows)


TABLES = {
    ROOT / "docs" / "api.md": {"error-table": error_table},
    ROOT / "docs" / "operations.md": {"settings-table": settings_table},
}


def render(text: str, tables: dict[str, Any]) -> str:
    for name, make in tables.items():
        pattern = re.compile(rf"(<!-- {name}: [^\n]*-->\n)(.*?)(<!-- /{name} -->)", re.DOTALL)
        if pattern.search(text) is None:
            raise SystemExit(f"no <!-- {name}: ... --> block to render")
        text = pattern.sub(lambda m, make=make: m.group(1) + make() + "\n" + m.group(3), text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args()
    stale = []
    for path, tables in TABLES.items():
        text = path.read_text()
        rendered = render(text, tables)
        if rendered != text:
            stale.append(str(path.relative_to(ROOT)))
            if not args.check:
                path.write_text(rendered)
    if args.check and stale:
        print("stale tables (run scripts/render_docs.py):", *stale, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``propserve versions list|save|label|unlabel|rollback|export``."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from propserve.clients import Client
from propserve.clients.cli import output

EXIT_OK = 0


def listing(args: argparse.Namespace, client: Client) -> int:
    versions = client.list_versions(args.name)
    if args.json:
        output.print_json([output.version_json(v) for v in versions])
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
            output.size(v.size_bytes),
            v.sha256[:12],
            " ".join(f"{k}={val:.4g}" for k, val in sorted(v.metrics.items())) or "-",
        ]
        for v in versions
    ]
    print(output.table(["VERSION", "STEP", "PARENT", "LABELS", "SIZE", "SHA256", "METRICS"], rows))
    return EXIT_OK


def save(args: argparse.Namespace, client: Client) -> int:
    version = client.save_version(args.name)
    if args.json:
        output.print_json(output.version_json(version))
    else:
        print(f"saved {args.name} version {version.version} (step {version.step})")
    return EXIT_OK


def label(args: argparse.Namespace, client: Client) -> int:
    model = client.set_label(args.name, args.label, args.version)
    if args.json:
        output.print_json(output.model_json(model))
    else:
        print(f"labelled {args.name} version {args.version} {args.label!r}")
    return EXIT_OK


def unlabel(args: argparse.Namespace, client: Client) -> int:
    model = client.remove_label(args.name, args.label)
    if args.json:
        output.print_json(output.model_json(model))
    else:
        print(f"removed label {args.label!r} from {args.name}")
    return EXIT_OK


def rollback(args: argparse.Namespace, client: Client) -> int:
    model = client.rollback(args.name, version=args.version, label=args.label)
    if args.json:
        output.print_json(output.model_json(model))
    else:
        target = f"version {args.version}" if args.version is not None else repr(args.label)
        print(f"rolled {args.name} back to {target} (head step {model.head_step})")
    return EXIT_OK


def export(args: argparse.Namespace, client: Client) -> int:
    exported = client.export_weights(
        args.name, args.version, layout=args.layout, format=args.format
    )
    _write_whole(args.output, exported.data)
    if args.json:
        output.print_json(
            {
                "model": exported.model,
                "version": exported.version,
                "step": exported.step,
                "format": exported.format,
                "layout": exported.layout,
                "sha256": exported.sha256,
                "bytes": len(exported.data),
                "file": str(args.output),
            }
        )
    else:
        print(
            f"wrote {args.name} version {exported.version} (step {exported.step}) as "
            f"{exported.format} ({exported.layout} layout) to {args.output}: "
            f"{output.size(len(exported.data))}; stored sha256 {exported.sha256}"
        )
    return EXIT_OK


def _write_whole(path: Path, data: bytes) -> None:
    """Write ``path`` so that it is never seen half written: a temporary file beside it,
    renamed over it."""
    directory = path.parent if str(path.parent) else Path(".")
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise

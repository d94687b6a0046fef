"""``propserve versions list|save|label|unlabel|rollback``."""

from __future__ import annotations

import argparse

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

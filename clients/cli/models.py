"""``propserve models create|list|show|delete``."""

from __future__ import annotations

import argparse

from propserve.clients import Client
from propserve.clients.cli import output
from propserve.clients.cli.spec import build_spec

EXIT_OK = 0


def create(args: argparse.Namespace, client: Client) -> int:
    spec = build_spec(args)
    model = client.create_model(
        args.name,
        spec,
        retain=args.retain,
        autosave_every=args.autosave_every,
        weights=args.weights,
        layout=args.layout,
    )
    if args.json:
        output.print_json(output.model_json(model))
    elif args.weights is not None:
        print(
            f"created model {model.name} ({model.parameter_count:,} parameters) from "
            f"{args.weights}, saved as version {model.latest_version} (step {model.head_step})"
        )
    else:
        print(f"created model {model.name} ({model.parameter_count:,} parameters)")
    return EXIT_OK


def listing(args: argparse.Namespace, client: Client) -> int:
    models = client.list_models()
    if args.json:
        output.print_json([output.model_json(m) for m in models])
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
            output.num(m.last_loss),
            output.labels(m.labels),
        ]
        for m in models
    ]
    print(output.table(["NAME", "STEP", "LATEST", "UNSAVED", "PARAMS", "LOSS", "LABELS"], rows))
    return EXIT_OK


def show(args: argparse.Namespace, client: Client) -> int:
    m = client.get_model(args.name)
    if args.json:
        output.print_json(output.model_json(m))
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
        ["last loss", output.num(m.last_loss)],
        ["labels", output.labels(m.labels)],
        ["retain", str(m.settings.get("retain"))],
        ["autosave every", str(m.settings.get("autosave_every"))],
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
    return EXIT_OK


def delete(args: argparse.Namespace, client: Client) -> int:
    client.delete_model(args.name)
    if args.json:
        output.print_json({"deleted": args.name})
    else:
        print(f"deleted model {args.name}")
    return EXIT_OK

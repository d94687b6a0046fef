"""``propserve history NAME [--plot]``: a model's training curve, as a table or a plot."""

from __future__ import annotations

import argparse
import math

from propserve.clients import Client
from propserve.clients.cli import output
from propserve.clients.types import HistoryPoint, Version

EXIT_OK = 0
#: Points fetched when --every is not given: the history is bucketed to about this many.
DEFAULT_POINTS = 2000


def fetch(
    client: Client, name: str, since: int | None, until: int | None, every: int | None
) -> list[HistoryPoint]:
    """The points from ``since`` to ``until``, every ``every`` steps (default: buckets so
    that about DEFAULT_POINTS come back), following the server's cursor."""
    if every is None:
        first = since or 1
        last = until if until is not None else client.get_model(name).head_step
        every = max(1, math.ceil((last - first + 1) / DEFAULT_POINTS))
    points: list[HistoryPoint] = []
    cursor = since
    while True:
        page = client.history(name, since=cursor, until=until, every=every)
        points.extend(page.points)
        if page.next_since is None:
            return points
        cursor = page.next_since


def show(args: argparse.Namespace, client: Client) -> int:
    points = fetch(client, args.name, args.since, args.until, args.every)
    if args.json:
        output.print_json([output.record_json(p) for p in points])
        return EXIT_OK
    if not points:
        print(f"model {args.name} has no training history")
        return EXIT_OK
    if args.plot:
        print(plot(args.name, points, client.list_versions(args.name)))
        return EXIT_OK
    rows = [
        [
            str(p.step),
            output.num(p.loss),
            output.num(p.accuracy),
            f"{p.learning_rate:.3g}",
            str(p.rows),
            output.timestamp(p.time),
        ]
        for p in points[-args.tail :]
    ]
    print(output.table(["STEP", "LOSS", "ACCURACY", "LR", "ROWS", "TIME"], rows))
    if len(points) > args.tail:
        print(f"(the last {args.tail} of {len(points)} points; --tail N for more, --plot)")
    return EXIT_OK


def plot(name: str, points: list[HistoryPoint], versions: list[Version]) -> str:
    """Loss (left axis) and accuracy (right axis, if any) against step, a vertical line at
    each saved version's step, as terminal text (plotext, without colours)."""
    import plotext as plt  # noqa: PLC0415 - ~0.2 s to import: only when plotting

    plt.clear_figure()
    plt.theme("clear")
    steps = [p.step for p in points]
    plt.plot(steps, [p.loss for p in points], label="loss", marker="braille")
    accuracy = [(p.step, p.accuracy) for p in points if p.accuracy is not None]
    if accuracy:
        plt.plot(
            [s for s, _ in accuracy],
            [a for _, a in accuracy],
            label="accuracy",
            marker="braille",
            yside="right",
        )
    first, last = steps[0], steps[-1]
    for version in versions:
        if first <= version.step <= last:
            plt.vline(version.step)
    marked = [f"v{v.version}@{v.step}" for v in versions if first <= v.step <= last]
    plt.title(f"{name}: loss" + (" and accuracy" if accuracy else "") + " by step")
    plt.xlabel("step" + (f"   versions: {' '.join(marked)}" if marked else ""))
    plt.plotsize(100, 25)
    text: str = plt.uncolorize(plt.build())
    plt.clear_figure()
    return text

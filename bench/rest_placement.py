"""Benchmark of REST single-row predictions at concurrency 1 under three placements of the
load generator: where the scheduler puts it, on the same core as the server, on another.

    .venv/bin/python bench/rest_placement.py            # a table (about two minutes)
    .venv/bin/python bench/rest_placement.py --quick    # under half a minute
    .venv/bin/python bench/rest_placement.py --json     # one JSON object per case

At concurrency 1, wrk and the server hand each request back and forth. On separate cores
every hand-over wakes a task on another core (on a VM, an interrupt between virtual CPUs); on
one core it is a switch between two tasks, but the core then runs both sides' work one after
the other. Which of the two a run gets is the scheduler's choice, made again for every wrk
process, and it moves a bare echo's throughput far more than the server's (the echo waits in
epoll; the server polls for a millisecond after each answer). bench/service.py leaves the
choice to the scheduler; this benchmark pins it, so that each placement's ratio can be read
apart.

It starts the real server (model A=[784,512,256,10], as bench/service.py does) and the bare
FastAPI echo, and runs wrk (one thread, one connection) on each in turn, interleaved, for every
body (JSON numbers, base64) and placement:

- ``free``: no pinning;
- ``same core``: the target process (every thread) and wrk on the first allowed CPU;
- ``separate``: the target on the first allowed CPU, wrk on the second.

Reported per case: requests/s, the target's and wrk's CPU time per request, and the server's
throughput over the echo's (information, not a target). Needs wrk, taskset (util-linux) and
two CPUs. Every run is bounded in time and every child is stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import echo, load, procs, report
from bench.common import BLAS_THREADS, SPEC_A
from bench.payloads import make_payloads, predict_path
from propserve.clients import AsyncGrpcClient

MODEL = "a"
PLACEMENTS = ("free", "same core", "separate")
BODIES = ("json", "b64")


COLUMNS = [
    report.Column("body", 5, report.cell_of("body"), left=True),
    report.Column("placement", 10, report.cell_of("placement"), left=True),
    report.Column("op", 7, report.cell_of("op"), left=True),
    report.Column("req/s", 7, report.cell_of("throughput", report.rate)),
    report.Column("p50 ms", 7, report.cell_of("p50_s", report.ms)),
    report.Column("srv us/req", 10, report.cell_of("server_cpu_per_req_s", report.us)),
    report.Column("wrk us/req", 10, report.cell_of("client_cpu_per_req_s", report.us)),
    report.Column("ratio", 6, report.cell_of("ratio", report.ratio)),
]


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of process ``pid`` onto ``cpus``."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that has just ended
            os.sched_setaffinity(int(tid), cpus)


def placement_cpus(placement: str, allowed: list[int]) -> tuple[set[int], set[int] | None]:
    """(the target's CPUs, wrk's CPUs or None for the scheduler's choice)."""
    if placement == "free":
        return set(allowed), None
    first, second = allowed[0], allowed[1]
    return {first}, {first} if placement == "same core" else {second}


async def measure(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        raise SystemExit("needs two CPUs")
    if shutil.which("taskset") is None:
        raise SystemExit("taskset is not installed (util-linux)")
    payloads = make_payloads(MODEL, 1)
    body = {"json": payloads.rest, "b64": payloads.rest_b64}
    budget = load.Budget(0, args.seconds, 0)
    children: list[procs.Child] = []
    samples: dict[tuple[str, str, str], list[load.Sample]] = {}
    try:
        server = procs.start_server(work, BLAS_THREADS)
        children.append(server)
        rest_echo = echo.start_echo("rest", work)
        children.append(rest_echo)
        async with AsyncGrpcClient(f"127.0.0.1:{server.ports['grpc_port']}") as client:
            await client.create_model(MODEL, SPEC_A)
        targets = [
            ("echo", rest_echo, "/echo"),
            ("server", server, predict_path(MODEL)),
        ]
        for turn in range(args.rounds):
            for kind in BODIES:
                for placement in PLACEMENTS:
                    # the order alternates, so that neither side always goes first
                    for who, child, path in targets if turn % 2 == 0 else targets[::-1]:
                        target_cpus, wrk_cpus = placement_cpus(placement, allowed)
                        pin(child.pid, target_cpus)
                        await procs.quiesce(child.pid)
                        sample = await asyncio.to_thread(
                            load.wrk_load,
                            wrk,
                            work,
                            child.ports["rest_port"],
                            path,
                            body[kind],
                            1,
                            budget,
                            child.pid,
                            wrk_cpus,
                        )
                        pin(child.pid, set(allowed))
                        samples.setdefault((kind, placement, who), []).append(sample)
    finally:
        for child in reversed(children):
            child.stop()
    results = []
    for kind in BODIES:
        for placement in PLACEMENTS:
            rows = {
                who: load.summarize(load.merge(samples[(kind, placement, who)]))
                for who in ("echo", "server")
            }
            for who, stats in rows.items():
                result = {"body": kind, "placement": placement, "op": who, **stats}
                if who == "server":
                    baseline = rows["echo"]["throughput"]
                    result["baseline"] = baseline
                    result["ratio"] = stats["throughput"] / baseline if baseline else None
                results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round of 1 s turns")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved turns per case")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per turn")
    parser.add_argument("--json", action="store_true", help="one JSON object per case")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds = 1, 1.0
    info = report.machine()
    import uvloop  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="propserve-placement-") as tmp:
        results = uvloop.run(measure(args, Path(tmp)))
    if args.json:
        for r in results:
            print(json.dumps({**r, "machine": info}))
        return 0
    print(report.machine_line(info))
    print(
        f"wrk -t1 -c1, {args.rounds} interleaved turns of {args.seconds:g} s per case; "
        "baseline: the bare FastAPI echo in the same placement"
    )
    report.print_table(COLUMNS, results)
    by_placement: dict[str, list[float]] = {}
    for r in results:
        if r.get("ratio") is not None:
            by_placement.setdefault(r["placement"], []).append(r["ratio"])
    summary = ", ".join(
        f"{placement} {statistics.fmean(ratios):.2f}x" for placement, ratios in by_placement.items()
    )
    print(f"server/echo, mean of the bodies: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

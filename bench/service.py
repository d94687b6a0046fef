"""Benchmark of the service against bare transports and the in-process engine, in one run.

    .venv/bin/python bench/service.py              # a table (a few minutes)
    .venv/bin/python bench/service.py --quick      # about a minute
    .venv/bin/python bench/service.py --json       # one JSON object per line

It starts, as child processes on ephemeral loopback ports, the real server (a temporary
store) with model A=[784,512,256,10] float32, and the bare echoes of bench/echo.py (gRPC and
FastAPI), which receive the same request bytes.

Cases: single-row and 256-row Predict over gRPC (raw float32 bytes) and REST (nested JSON
lists, ``rest``; base64 as the REST clients send it, ``rest-b64``) at concurrency 1, 8 and
64, each alternating with the matching echo case so that the host's noise hits both alike;
streamed training (one bidirectional Train stream of batch-256 steps) against
``Network.train_step`` on the same batches in this process, in alternating rounds (long
rounds for the target, short bursts beside them). The server's load runs twice; its resident
memory is read before, between and after, each time once the server has trimmed its heap;
the figures reported are the second run's, and so are the server's collector runs.

Load generators are those of bench/load.py: single-row REST goes through wrk when installed,
where the scheduler puts it. The client's CPU per request is reported beside the server's.

Targets:
- streamed training >= 0.9x in-process samples/s;
- gRPC single-row Predict p50 at concurrency 1 <= 1.5x (echo p50 + in-process forward);
- 256-row Predict at concurrency 8 (gRPC, REST base64) >= 0.7x the in-process forward
  throughput of 256 rows with the server's workers and BLAS threads (``ratio_forward``,
  measured in the same run; REST JSON numbers beside it as information). Beside it,
  ``ratio_cpu_bound``: the most such requests a second the host's cores could serve at the
  CPU a request cost the server and the load generator together in this case, over the
  same in-process rate: what ratio_forward could reach at best with that cost per request;
- gRPC single-row Predict at concurrency 64: the server's CPU per request <= 1.25x the bare
  echo's plus the in-process forward (``cpu_ratio``);
- the server's RSS growth over the second load <= 10%.
REST against the bare echo (throughput ratio) is reported as information, not a target.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import echo, load, procs, report
from bench.common import BLAS_THREADS, SPEC_A
from bench.load import Budget, Sample
from bench.payloads import PREDICT_METHOD, Payloads, make_payloads, predict_path
from bench.train_stream import TrainBatches, compare_training, train_batches
from propserve.service.workers import default_threads

MODEL = "a"
ROWS = (1, 256)
CONCURRENCY = (1, 8, 64)
#: Distinct training batches (the rounds cycle through them).
TRAIN_BATCHES = 80
TARGETS = {
    "train_stream": 0.9,
    "grpc_p50": 1.5,
    "rss_growth": 0.10,
    # 256-row Predict at c=8 over the in-process forward throughput of the server's workers.
    "large_predict": 0.7,
    # Single-row gRPC Predict at c=64: the server's CPU per request over the bare echo's
    # plus the forward pass.
    "grpc_cpu": 1.25,
}
#: The concurrency of the large-prediction and CPU targets.
LARGE_CONCURRENCY = 8
CPU_CONCURRENCY = 64


@dataclass(frozen=True)
class Plan:
    predict: dict[int, Budget]  # by rows
    rest_256: Budget
    train_rounds: int
    train_round_steps: int
    burst_rounds: int
    burst_steps: int
    alternations: int
    forward_repeats: int
    forward_seconds: float


QUICK = Plan(
    predict={1: Budget(1500, 0.5, 20), 256: Budget(300, 0.5, 2)},
    rest_256=Budget(64, 1.0, 1),
    train_rounds=2,
    train_round_steps=40,
    burst_rounds=3,
    burst_steps=12,
    alternations=1,
    forward_repeats=500,
    forward_seconds=1.0,
)
FULL = Plan(
    predict={1: Budget(20000, 2.5, 200), 256: Budget(3000, 2.5, 20)},
    rest_256=Budget(256, 3.0, 2),
    train_rounds=6,
    train_round_steps=120,
    burst_rounds=12,
    burst_steps=20,
    alternations=3,
    forward_repeats=3000,
    forward_seconds=3.0,
)


def in_process_forward(repeats: int, idle: float = 0.0) -> float:
    """Median seconds of one single-row Network.forward of model A in this process, called
    back to back, or each after sleeping ``idle`` seconds (as a server waits for requests)."""
    import numpy as np  # noqa: PLC0415

    from propserve.engine import ModelSpec, Network  # noqa: PLC0415

    network = Network(ModelSpec.from_dict(SPEC_A))
    x = np.random.default_rng(1).standard_normal((1, 784), dtype=np.float32)
    times = []
    for _ in range(repeats):
        if idle:
            time.sleep(idle)
        start = time.perf_counter()
        network.forward(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def in_process_throughput(rows: int, threads: int, seconds: float) -> float:
    """Forward passes of ``rows`` rows of model A per second in this process, ``threads``
    threads computing side by side (each with the BLAS threads set for this process): what
    the server's workers could do if requests cost nothing else."""
    import numpy as np  # noqa: PLC0415

    from propserve.engine import ModelSpec, Network  # noqa: PLC0415

    network = Network(ModelSpec.from_dict(SPEC_A))
    inputs = [
        np.random.default_rng(i).standard_normal((rows, 784), dtype=np.float32)
        for i in range(threads)
    ]
    for x in inputs:
        network.forward(x)  # warm
    deadline = time.perf_counter() + seconds

    def passes(x: Any) -> int:
        done = 0
        while time.perf_counter() < deadline:
            network.forward(x)
            done += 1
        return done

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(passes, inputs))
    return total / (time.perf_counter() - start)


async def forward_baseline(plan: Plan) -> float:
    """The in-process forward throughput of 256 rows with the server's workers, measured
    right after the case it is the baseline of (the host's speed drifts within minutes)."""
    return await asyncio.to_thread(
        in_process_throughput, 256, default_threads(), plan.forward_seconds
    )


async def create_model(server: procs.Child) -> None:
    from propserve.clients import AsyncGrpcClient  # noqa: PLC0415

    async with AsyncGrpcClient(f"127.0.0.1:{server.ports['grpc_port']}") as client:
        await client.create_model(MODEL, SPEC_A)


def row(
    transport: str, op: str, rows: int, concurrency: int, stats: dict[str, Any]
) -> dict[str, Any]:
    return {"transport": transport, "op": op, "rows": rows, "concurrency": concurrency, **stats}


async def run_load(
    plan: Plan,
    server: procs.Child,
    echoes: dict[str, procs.Child] | None,
    payloads: dict[int, Payloads],
    train: TrainBatches,
    wrk: str | None,
    work: Path,
) -> list[dict[str, Any]]:
    """One pass of the load over the server (and, when given, the echoes, interleaved)."""
    results: list[dict[str, Any]] = []
    # (child, gRPC method) by who: the echo first in every turn, as it always was
    grpc_targets = {"server": (server, PREDICT_METHOD)}
    if echoes:
        grpc_targets = {"echo": (echoes["grpc"], echo.ECHO_METHOD), **grpc_targets}
    channels = {
        who: load.grpc_channel(c.ports["grpc_port"]) for who, (c, _) in grpc_targets.items()
    }
    try:
        for ch in channels.values():
            await asyncio.wait_for(ch.channel_ready(), 10)
        for rows in ROWS:
            for conc in CONCURRENCY:
                budget = plan.predict[rows]
                samples: dict[str, list[Sample]] = {who: [] for who in grpc_targets}
                for turn in range(plan.alternations):
                    share = budget.share(plan.alternations, first=turn == 0)
                    for who, (child, method) in grpc_targets.items():
                        await procs.quiesce(child.pid)
                        samples[who].append(
                            await load.grpc_load(
                                channels[who], method, payloads[rows].grpc, conc, share, child.pid
                            )
                        )
                for who, taken in samples.items():
                    op = "predict" if who == "server" else "echo"
                    results.append(row("grpc", op, rows, conc, load.summarize(load.merge(taken))))
                if rows == 256:
                    results[-1]["forward_throughput"] = await forward_baseline(plan)
        rest_targets = {"server": (server, predict_path(MODEL))}
        if echoes:
            rest_targets = {"echo": (echoes["rest"], "/echo"), **rest_targets}
        rest_cases = [("rest", rows, payloads[rows].rest) for rows in ROWS]
        rest_cases += [("rest-b64", rows, payloads[rows].rest_b64) for rows in ROWS]
        for transport, rows, body in rest_cases:
            for conc in CONCURRENCY:
                budget = plan.predict[rows] if rows == 1 else plan.rest_256
                samples = {who: [] for who in rest_targets}
                for turn in range(plan.alternations):
                    share = budget.share(plan.alternations, first=turn == 0)
                    for who, (child, path) in rest_targets.items():
                        port = child.ports["rest_port"]
                        await procs.quiesce(child.pid)
                        if wrk and rows == 1:
                            sample = await asyncio.to_thread(
                                load.wrk_load, wrk, work, port, path, body, conc, share, child.pid
                            )
                        else:
                            sample = await load.rest_load(port, path, body, conc, share, child.pid)
                        samples[who].append(sample)
                for who, taken in samples.items():
                    op = "predict" if who == "server" else "echo"
                    stats = load.summarize(load.merge(taken))
                    results.append(row(transport, op, rows, conc, stats))
                if rows == 256:
                    results[-1]["forward_throughput"] = await forward_baseline(plan)
        for op, rounds, steps in (
            ("train_stream", plan.train_rounds, plan.train_round_steps),
            ("train_bursts", plan.burst_rounds, plan.burst_steps),
        ):
            await procs.quiesce(server.pid)
            trained = await compare_training(channels["server"], train, rounds, steps)
            results.append(
                {
                    **row("grpc", op, trained.batch, 1, {}),
                    "p50_s": None,
                    "p99_s": None,
                    "steps": trained.steps,
                    "round_steps": steps,
                    "throughput": trained.remote,
                    "baseline": trained.local,
                    "baseline_of": f"in-process samples/s, interleaved rounds of {steps} steps",
                    "ratio": trained.remote / trained.local,
                    "round_ratios": [round(r, 3) for r in trained.round_ratios],
                }
            )
    finally:
        for ch in channels.values():
            await ch.close()
    return results


def attach_targets(results: list[dict[str, Any]], forward_s: float) -> None:
    """Baselines, ratios and verdicts: gRPC Predict p50 against echo p50 + forward, REST
    Predict throughput against the echo's (information), training against in-process;
    256-row Predict throughput against the in-process forward throughput measured beside
    it, single-row gRPC server CPU against the echo's plus the forward."""
    echoes = {
        (r["transport"], r["rows"], r["concurrency"]): r for r in results if r["op"] == "echo"
    }
    for r in results:
        if r["op"] == "predict" and r["rows"] == 256:
            r["ratio_forward"] = r["throughput"] / r["forward_throughput"]
            cpu = (r.get("server_cpu_per_req_s") or 0.0) + (r.get("client_cpu_per_req_s") or 0.0)
            if cpu:
                r["cpu_bound_throughput"] = (os.cpu_count() or 1) / cpu
                r["ratio_cpu_bound"] = r["cpu_bound_throughput"] / r["forward_throughput"]
            if r["concurrency"] == LARGE_CONCURRENCY and r["transport"] != "rest":
                r["target"] = f"ratio_forward >= {TARGETS['large_predict']}"
                r["met"] = r["ratio_forward"] >= TARGETS["large_predict"]
        if r["op"] == "predict" and r["transport"] == "grpc" and r["rows"] == 1:
            echo_cpu = echoes.get(("grpc", 1, r["concurrency"]), {}).get("server_cpu_per_req_s")
            if echo_cpu and r.get("server_cpu_per_req_s"):
                r["cpu_baseline"] = echo_cpu + forward_s
                r["cpu_ratio"] = r["server_cpu_per_req_s"] / r["cpu_baseline"]
                if r["concurrency"] == CPU_CONCURRENCY:
                    r["target"] = f"cpu_ratio <= {TARGETS['grpc_cpu']}"
                    r["met"] = r["cpu_ratio"] <= TARGETS["grpc_cpu"]
        if r["op"] == "train_stream":
            r["target"] = f"ratio >= {TARGETS['train_stream']}"
            r["met"] = r["ratio"] >= TARGETS["train_stream"]
        base = echoes.get((r["transport"], r["rows"], r["concurrency"]))
        if r["op"] != "predict" or base is None:
            continue
        r["echo_p50_s"] = base["p50_s"]
        r["echo_throughput"] = base["throughput"]
        if r["transport"] == "grpc":
            r["baseline"] = base["p50_s"] + forward_s
            r["baseline_of"] = "echo p50 + in-process forward"
            r["ratio"] = r["p50_s"] / r["baseline"]
            if r["rows"] == 1 and r["concurrency"] == 1:
                r["target"] = f"ratio <= {TARGETS['grpc_p50']}"
                r["met"] = r["ratio"] <= TARGETS["grpc_p50"]
        else:
            r["baseline"] = base["throughput"]
            r["baseline_of"] = "echo throughput (information)"
            r["ratio"] = r["throughput"] / r["baseline"] if r["baseline"] else None


def collector_row(
    before: dict[str, tuple[int, float, int]],
    after: dict[str, tuple[int, float, int]],
    releases: float | None,
) -> dict[str, Any]:
    """The server's collector runs during the second load, by generation; ``releases``:
    the server's after-burst releases meanwhile (each one is a full collection, at idle,
    between two cases), None where it does not trim."""
    generations = {}
    for generation, (runs, seconds, long) in after.items():
        runs0, seconds0, long0 = before.get(generation, (0, 0.0, 0))
        generations[generation] = {
            "runs": runs - runs0,
            "seconds": seconds - seconds0,
            "over_10ms": long - long0,
        }
    return {**row("-", "gc", 0, 0, {}), "generations": generations, "idle_releases": releases}


async def benchmark(
    args: argparse.Namespace, work: Path
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    plan = QUICK if args.quick else FULL
    from threadpoolctl import threadpool_limits  # noqa: PLC0415

    # The in-process engine gets the server's BLAS threads, so the comparison is like for like.
    threadpool_limits(args.blas_threads, user_api="blas")
    wrk = None if args.rest_client == "asyncio" else shutil.which("wrk")
    if args.rest_client == "wrk" and wrk is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    info = report.machine()
    payloads = {rows: make_payloads(MODEL, rows) for rows in ROWS}
    train = train_batches(MODEL, TRAIN_BATCHES)
    forward_s = in_process_forward(plan.forward_repeats)
    # NOTE: the target's baseline is the forward pass back to back; after an idle gap the same
    # pass runs with cold caches, as in a server waiting for its next request. Reported only.
    forward_idle_s = in_process_forward(plan.forward_repeats // 5, idle=0.0005)
    children: list[procs.Child] = []
    cpu0 = time.process_time()
    children0 = os.times()
    try:
        server = procs.start_server(work, args.blas_threads)
        children.append(server)
        echoes = {}
        for kind in echo.KINDS:
            echoes[kind] = echo.start_echo(kind, work)
            children.append(echoes[kind])
        await create_model(server)
        before = await procs.settled_rss_kib(server)
        await run_load(plan, server, None, payloads, train, wrk, work)
        after_1 = await procs.settled_rss_kib(server)
        port = server.ports["rest_port"]
        metrics = procs.scrape(port)
        collected_before, trims_before = procs.gc_pauses(metrics), procs.heap_trims(port, metrics)
        results = await run_load(plan, server, echoes, payloads, train, wrk, work)
        # Read before the server's release after the load, whose full collection runs idle.
        metrics = procs.scrape(port)
        collected_after, trims_after = procs.gc_pauses(metrics), procs.heap_trims(port, metrics)
        after_2 = await procs.settled_rss_kib(server)
    finally:
        for child in reversed(children):
            child.stop()
    children1 = os.times()
    client_cpu = (
        time.process_time()
        - cpu0
        + (children1.children_user - children0.children_user)
        + (children1.children_system - children0.children_system)
    )
    attach_targets(results, forward_s)
    growth = (after_2 - after_1) / after_1
    results.append(
        {
            **row("-", "rss", 0, 0, {}),
            "before_kib": before,
            "after_1_kib": after_1,
            "after_2_kib": after_2,
            "growth": growth,
            "target": f"growth <= {TARGETS['rss_growth']:.0%}",
            "met": growth <= TARGETS["rss_growth"],
            "client_cpu_s": client_cpu,
        }
    )
    releases = None if trims_before is None else (trims_after or 0) - trims_before
    results.append(collector_row(collected_before, collected_after, releases))
    info.update(
        forward_s=forward_s,
        forward_after_idle_s=forward_idle_s,
        server_threads=default_threads(),
        train_round_steps=plan.train_round_steps,
        burst_steps=plan.burst_steps,
        server_pid=server.pid,
        blas_threads=args.blas_threads,
        rest_client="wrk (1 row), asyncio keep-alive (256 rows)" if wrk else "asyncio keep-alive",
        quick=args.quick,
    )
    return info, results


# -- the table -----------------------------------------------------------------------------


def _throughput(r: dict[str, Any]) -> str:
    return report.rate(r["throughput"]) + ("*" if r["op"].startswith("train_") else "")


def _baseline(r: dict[str, Any]) -> str:
    base = r.get("baseline")
    if base is None:
        return "-"
    if r["op"] == "predict" and r["transport"] == "grpc":
        return f"{report.ms(base)}ms"
    return f"{report.rate(base)}/s"


def _target(r: dict[str, Any]) -> str:
    """The target and its verdict; a target on another ratio than the row's ``ratio``
    shows that ratio's value (and the in-process forward rate it compares with)."""
    if "target" not in r:
        return ""
    measured = r["target"].split()[0]
    if measured == "ratio_forward":
        bound = f"; CPU bound {r['ratio_cpu_bound']:.2f}" if "ratio_cpu_bound" in r else ""
        shown = (
            f"{measured} {r[measured]:.2f} (fwd {report.rate(r['forward_throughput'])}/s{bound}) "
        )
    elif measured == "cpu_ratio":
        shown = f"{measured} {r[measured]:.2f} (echo+fwd {r['cpu_baseline'] * 1e6:.0f} us) "
    else:
        shown = ""
    return f"{shown}{r['target']} {report.verdict(r['met'])}"


COLUMNS = [
    report.Column("transport", 9, report.cell_of("transport"), left=True),
    report.Column("op", 12, report.cell_of("op"), left=True),
    report.Column("rows", 4, report.cell_of("rows")),
    report.Column("conc", 4, report.cell_of("concurrency")),
    report.Column("p50 ms", 8, report.cell_of("p50_s", report.ms)),
    report.Column("p99 ms", 8, report.cell_of("p99_s", report.ms)),
    report.Column("req/s", 8, _throughput),
    report.Column("cli us/req", 10, report.cell_of("client_cpu_per_req_s", report.us)),
    report.Column("srv us/req", 10, report.cell_of("server_cpu_per_req_s", report.us)),
    report.Column("baseline", 10, _baseline),
    report.Column("ratio", 6, report.cell_of("ratio", report.ratio)),
    report.Column("target", 0, _target, left=True),
]


def print_results(info: dict[str, Any], results: list[dict[str, Any]]) -> None:
    print(report.machine_line(info))
    print(
        f"server: pid {info['server_pid']}, blas_threads {info['blas_threads']}; "
        f"REST load: {info['rest_client']}; in-process forward (1 row) "
        f"{report.ms(info['forward_s'])} ms back to back, "
        f"{report.ms(info['forward_after_idle_s'])} ms after 0.5 ms idle"
    )
    report.print_table(COLUMNS, [r for r in results if r["op"] not in ("rss", "gc")])
    print(
        "(* samples/s; baseline: in-process Network.train_step, in rounds alternating with "
        "the stream's:\n   train_stream in rounds of "
        f"{info['train_round_steps']} steps, train_bursts in rounds of {info['burst_steps']}, "
        "each round starting with the stream's pipeline empty;\n   REST ratios: throughput "
        "over the bare echo's, information only)"
    )
    for r in results:
        if r["op"] == "rss":
            mib = {k: r[k] / 1024 for k in ("before_kib", "after_1_kib", "after_2_kib")}
            print(
                f"server RSS: before {mib['before_kib']:.1f} MiB, after load 1 "
                f"{mib['after_1_kib']:.1f} MiB, after load 2 {mib['after_2_kib']:.1f} MiB; "
                f"growth over load 2 {report.percent(r['growth'])} ({_target(r)})"
            )
            print(f"load generator CPU: {r['client_cpu_s']:.1f} s in all")
        elif r["op"] == "gc":
            runs = ", ".join(
                f"generation {g}: {v['runs']} runs, {v['seconds'] * 1e3:.1f} ms, "
                f"{v['over_10ms']} over 10 ms"
                for g, v in sorted(r["generations"].items())
            )
            released = r["idle_releases"]
            idle = "" if released is None else f"; after-burst releases among them: {released:.0f}"
            print(f"server's collector during load 2: {runs or 'no runs'}{idle}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short cases (about a minute)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument(
        "--blas-threads",
        type=int,
        default=BLAS_THREADS,
        help=f"BLAS threads for the server and the in-process engine (default {BLAS_THREADS})",
    )
    parser.add_argument(
        "--rest-client",
        choices=("auto", "wrk", "asyncio"),
        default="auto",
        help="REST load generator (auto: wrk when installed)",
    )
    args = parser.parse_args(argv)
    import uvloop  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="propserve-bench-") as tmp:
        info, results = uvloop.run(benchmark(args, Path(tmp)))
    if args.json:
        report.print_json_lines(info, results)
    else:
        print_results(info, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

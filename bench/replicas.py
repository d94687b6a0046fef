"""Benchmark of read replicas (``propserve serve --follow``): how soon a label moved on the
writer is served by its replicas, and what ``--workers 2`` adds to one replica process.

    .venv/bin/python bench/replicas.py              # a table (a few minutes)
    .venv/bin/python bench/replicas.py --quick      # about a minute
    .venv/bin/python bench/replicas.py --json       # one JSON object per line

Every server is a child process on ephemeral loopback ports over one temporary store, with
one BLAS thread: the writer (the plain server) and the replicas (``--follow``, polling the
store every --poll-interval, default 0.5 s, the server's default). Model A
(bench/common.py's SPEC_A: 784-512-256-10, float32) is created on the writer over REST,
trained a step and saved four times (versions 1-4), and labelled ``stable`` at version 3.

1. Label moves. One replica, then two (separate processes, so that each is asked
   separately): the writer moves ``stable`` back and forth between versions 2 and 3 over
   REST (``PUT /v1/models/a/labels/stable``), each move after a random pause of up to one
   poll interval (so that moves fall anywhere in the replicas' polling cycle). From the
   moment the PUT is sent, each replica is asked for single-row predictions naming no
   version (REST, one keep-alive connection each, one every POLL_GAP) until it answers
   from the new version: that time, per replica and move, is the move-to-served time
   (p50, p99, max over the moves; the PUT's own time is part of it). Beside it, each
   replica's own ``propserve_replica_lag_seconds`` over the same moves (the difference of
   two scrapes of /metrics: count, mean, and the bucket bounds its p50 and p99 fall
   under), ``propserve_replica_versions_loaded`` and
   ``propserve_replica_follow_errors_total``.

2. Throughput. One replica process (``--follow``) and ``--follow --workers 2`` (two
   processes sharing the ports with SO_REUSEPORT, under a supervisor) over the same store,
   both up at once, taking turns (the order flipping each turn) under single-row
   predictions at concurrency 64: gRPC unary Predict sent by h2load (Debian:
   nghttp2-client) as HTTP/2 POSTs of the gRPC frame over 64 connections, one call in
   flight on each; REST (``POST /v1/models/a/predict``, nested JSON) by wrk over 64
   keep-alive connections. SO_REUSEPORT spreads connections, not calls: a client holding
   one connection reaches one worker (the full run shows it: gRPC over one connection with
   64 calls in flight). A Python client spends about as much CPU per call as the server, so
   neither generator is one. Each case runs twice: with the generator pinned to cpu 1
   (taskset; the servers free to run on both cores, so they share cpu 1 with it), and
   unpinned. The server's CPU is its processes' together (/proc: the supervisor and its
   workers), the workers' split of it beside; the generator's CPU per request is reported
   too, and so are the cores the host's other processes kept busy meanwhile (/proc/stat's
   user and system time less the server's and the generator's): on a 2-core host that
   others share, a turn squeezed by them shows as such.

   h2load reads HTTP statuses, not gRPC's trailers. Before the load, grpcio sends the same
   request bytes to each server over eight connections and checks the status (OK), the
   outputs (1 x 10) and the version that answered (3); during the load, an answer without
   a message (an error status comes as trailers alone) shows in h2load's DATA bytes, which
   must equal the answers times the checked answer's framed size (the shortfall counts as
   errors).

Targets:
- label moves: every replica serves each move within 1 s at p99, with one replica and with
  two, and none left unserved (MOVE_TIMEOUT);
- ``--workers 2`` >= 1.4x one process's requests/s on gRPC single-row at concurrency 64,
  judged with the generator pinned to cpu 1 (the unpinned figure is reported beside it).
Every process started is stopped by its PID (a supervisor's workers too, should any
outlive it), and the whole run is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import load, procs, report
from bench.common import BLAS_THREADS, DIMS_A, SPEC_A
from bench.load import Budget, Sample
from bench.payloads import PREDICT_METHOD, make_payloads, predict_path, rows_of
from propserve.v1 import model_service_pb2 as pb

MODEL = "a"
LABEL = "stable"
#: Versions saved on the writer; the label moves between the two MOVING ones.
VERSIONS = 4
MOVING = (2, 3)
#: Pause between two polls of a replica while waiting for a move to be served.
POLL_GAP = 0.002
#: A move not served by then counts as unserved.
MOVE_TIMEOUT = 10.0
CONCURRENCY = 64
#: Where the generator runs: pinned to cpu 1, or where the scheduler puts it.
GENERATORS: dict[str, set[int] | None] = {"cpu1": {1}, "free": None}
JUDGED = "cpu1"
TARGETS = {"move_p99_s": 1.0, "workers_grpc": 1.4}
SIDES = ("single", "workers2")


@dataclass(frozen=True)
class Case:
    name: str
    transport: str  # "grpc" (h2load) or "rest" (wrk)
    connections: int
    streams: int  # calls in flight on each connection


GRPC = Case("grpc", "grpc", CONCURRENCY, 1)
REST = Case("rest", "rest", CONCURRENCY, 1)
GRPC_ONE = Case("grpc-1conn", "grpc", 1, CONCURRENCY)


@dataclass(frozen=True)
class Plan:
    moves: int
    cases: tuple[Case, ...]
    turns: int
    seconds: float  # per turn
    warmup: float  # per side, before a case's turns
    deadline: float  # the whole run


QUICK = Plan(moves=20, cases=(GRPC, REST), turns=2, seconds=2.0, warmup=1.0, deadline=420)
FULL = Plan(
    moves=100, cases=(GRPC, REST, GRPC_ONE), turns=4, seconds=5.0, warmup=1.0, deadline=1200
)


# -- REST calls (API calls and polls; the load goes through wrk) ----------------------------


class Http:
    """One keep-alive HTTP/1.1 connection to a loopback port, reopened when the server has
    closed it, one request at a time."""

    _LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)
    _CLOSE = re.compile(rb"\r\nconnection:\s*close", re.IGNORECASE)

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def call(
        self, method: str, path: str, body: Any = None, timeout: float = 30.0
    ) -> tuple[int, bytes]:
        """The status and body of one request (``body`` sent as JSON unless bytes). A
        connection the server closed meanwhile is reopened and the request sent again."""
        data = body if body is None or isinstance(body, bytes) else orjson.dumps(body)
        for attempt in range(2):
            try:
                return await asyncio.wait_for(self._exchange(method, path, data), timeout)
            except (ConnectionError, asyncio.IncompleteReadError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def json(self, method: str, path: str, body: Any = None) -> Any:
        """The JSON answer of a request that must succeed (2xx)."""
        status, answer = await self.call(method, path, body)
        if not 200 <= status < 300:
            raise RuntimeError(f"{method} {path}: HTTP {status}: {answer[:300]!r}")
        return orjson.loads(answer) if answer else None

    async def _exchange(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + (body or b""))
        header = await self.reader.readuntil(b"\r\n\r\n")
        length = self._LENGTH.search(header)
        answer = await self.reader.readexactly(int(length.group(1)) if length else 0)
        if self._CLOSE.search(header):
            self.close()
        return int(header[9:12]), answer

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


# -- the writer's store ---------------------------------------------------------------------


async def prepare(writer: Http) -> None:
    """Model A on the writer, VERSIONS versions (a training step before each), ``stable`` at
    the second of MOVING."""
    await writer.json("POST", "/v1/models", {"name": MODEL, "spec": SPEC_A})
    rows = 16
    inputs = rows_of(rows).tolist()
    targets = np.random.default_rng(0).integers(0, DIMS_A[-1], rows).tolist()
    for expected in range(1, VERSIONS + 1):
        await writer.json(
            "POST", f"/v1/models/{MODEL}/train_step", {"inputs": inputs, "targets": targets}
        )
        saved = await writer.json("POST", f"/v1/models/{MODEL}/versions")
        if saved["version"] != expected:
            raise RuntimeError(f"the writer saved version {saved['version']}, not {expected}")
    await writer.json("PUT", f"/v1/models/{MODEL}/labels/{LABEL}", {"version": MOVING[1]})


def replica_env(workers: int, poll_interval: float) -> dict[str, str]:
    env = {"PROPSERVE_FOLLOW": "true", "PROPSERVE_POLL_INTERVAL": str(poll_interval)}
    if workers > 1:
        env["PROPSERVE_WORKERS"] = str(workers)
    return env


# -- 1. label moves ---------------------------------------------------------------------------


@dataclass
class Replica:
    name: str
    child: procs.Child
    conn: Http
    errors: int = 0  # polls answered other than 200

    async def served(self, body: bytes) -> int | None:
        """The version that answers a prediction naming none (None: not answered)."""
        status, answer = await self.conn.call("POST", predict_path(MODEL), body)
        if status != 200:
            self.errors += 1
            return None
        version: int | None = orjson.loads(answer)["version"]
        return version

    async def wait_for(self, version: int, body: bytes, since: float) -> float | None:
        """Seconds from ``since`` to the first answer from ``version``; None past
        MOVE_TIMEOUT."""
        while True:
            answered = await self.served(body)
            now = time.perf_counter()
            if answered == version:
                return now - since
            if now - since > MOVE_TIMEOUT:
                return None
            await asyncio.sleep(POLL_GAP)


def histogram(metrics: bytes, name: str) -> dict[str, Any]:
    """A histogram of a /metrics scrape (its series added up over their labels): cumulative
    counts by upper bound, the sum and the count."""
    text = metrics.decode()
    buckets: dict[float, float] = {}
    for bound, value in re.findall(
        rf'^{name}_bucket\{{(?:[^}}]*,)?le="([^"]+)"[^}}]*\}} (\S+)$', text, re.M
    ):
        buckets[float(bound)] = buckets.get(float(bound), 0.0) + float(value)
    total = sum(float(v) for v in re.findall(rf"^{name}_sum(?:\{{[^}}]*\}})? (\S+)$", text, re.M))
    count = sum(float(v) for v in re.findall(rf"^{name}_count(?:\{{[^}}]*\}})? (\S+)$", text, re.M))
    return {"buckets": buckets, "sum": total, "count": count}


def scalar(metrics: bytes, name: str) -> float | None:
    """A gauge's or counter's value in a scrape (its series added up); None if absent."""
    values = re.findall(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", metrics.decode(), re.M)
    return sum(float(v) for v in values) if values else None


def lag_between(before: bytes, after: bytes) -> dict[str, Any]:
    """The replica's lag histogram over what happened between two scrapes: count, mean, and
    the upper bounds of the buckets its p50 and p99 fall in."""
    name = "propserve_replica_lag_seconds"
    old, new = histogram(before, name), histogram(after, name)
    count = new["count"] - old["count"]
    cumulative = sorted(
        (bound, value - old["buckets"].get(bound, 0.0)) for bound, value in new["buckets"].items()
    )

    def bound_of(q: float) -> float | None:
        return next((b for b, c in cumulative if count and c >= q * count), None)

    return {
        "count": int(count),
        "mean_s": (new["sum"] - old["sum"]) / count if count else None,
        "p50_le_s": bound_of(0.5),
        "p99_le_s": bound_of(0.99),
        "cumulative": {str(bound): int(c) for bound, c in cumulative},
    }


def nearest_rank(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None


async def label_moves(
    writer: Http, replicas: list[Replica], moves: int, poll_interval: float, rng: random.Random
) -> list[dict[str, Any]]:
    """``moves`` moves of ``stable`` between the MOVING versions, each timed until every
    replica serves it; one row per replica."""
    body = make_payloads(MODEL, 1).rest
    model = await writer.json("GET", f"/v1/models/{MODEL}")
    current = model["labels"][LABEL]
    start = time.perf_counter()
    for replica in replicas:  # all of them serving the label as it is, first
        if await replica.wait_for(current, body, start) is None:
            raise RuntimeError(f"{replica.name} does not serve version {current} of {LABEL}")
    scrapes = {r.name: procs.scrape(r.child.ports["rest_port"]) for r in replicas}
    served: dict[str, list[float | None]] = {r.name: [] for r in replicas}
    puts: list[float] = []
    for _ in range(moves):
        await asyncio.sleep(rng.uniform(0, poll_interval))
        target = MOVING[0] if current == MOVING[1] else MOVING[1]
        start = time.perf_counter()
        await writer.json("PUT", f"/v1/models/{MODEL}/labels/{LABEL}", {"version": target})
        puts.append(time.perf_counter() - start)
        waits: list[Awaitable[float | None]] = [r.wait_for(target, body, start) for r in replicas]
        for replica, took in zip(replicas, await asyncio.gather(*waits), strict=True):
            served[replica.name].append(took)
        current = target
    rows = []
    for replica in replicas:
        metrics = procs.scrape(replica.child.ports["rest_port"])
        times = [t for t in served[replica.name] if t is not None]
        unserved = len(served[replica.name]) - len(times)
        p99 = nearest_rank(times, 0.99)
        met = unserved == 0 and p99 is not None and p99 <= TARGETS["move_p99_s"]
        rows.append(
            {
                "part": "label_move",
                "replicas": len(replicas),
                "replica": replica.name,
                "moves": moves,
                "unserved": unserved,
                "p50_s": nearest_rank(times, 0.5),
                "p99_s": p99,
                "max_s": max(times, default=None),
                "put_p50_s": nearest_rank(puts, 0.5),
                "poll_errors": replica.errors,
                "lag": lag_between(scrapes[replica.name], metrics),
                "versions_loaded": scalar(metrics, "propserve_replica_versions_loaded"),
                "follow_errors": scalar(metrics, "propserve_replica_follow_errors_total"),
                "target": f"p99 <= {TARGETS['move_p99_s']:g} s, all served",
                "met": met,
                "served_s": served[replica.name],
            }
        )
        replica.errors = 0
    return rows


# -- 2. throughput ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Tools:
    h2load: str
    wrk: str
    work: Path
    message: bytes  # a serialized single-row PredictRequest
    rest_body: bytes  # its /v1 JSON body (nested lists)
    frame_size: int  # an answer's framed size (5 + the checked PredictResponse's bytes)


async def check_server(child: procs.Child, tools: Tools, version: int) -> int:
    """The same request bytes over gRPC (grpcio, eight separate connections) and REST (eight
    connections): each must answer OK from ``version`` with 1 x 10 outputs. Returns the
    gRPC answer's serialized size."""
    sizes = set()
    for _ in range(8):
        channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{child.ports['grpc_port']}",
            options=[*load.GRPC_OPTIONS, ("grpc.use_local_subchannel_pool", 1)],
        )
        try:
            stub: Any = channel.unary_unary(PREDICT_METHOD)
            reply = await stub(tools.message, timeout=30)  # raises unless the status is OK
        finally:
            await channel.close()
        answer = pb.PredictResponse.FromString(reply)
        if list(answer.outputs.shape) != [1, DIMS_A[-1]] or answer.version != version:
            raise RuntimeError(
                f"{child.name}: gRPC answered shape {list(answer.outputs.shape)} from version "
                f"{answer.version}"
            )
        sizes.add(len(reply))
        conn = Http(child.ports["rest_port"])
        try:
            out = await conn.json("POST", predict_path(MODEL), tools.rest_body)
        finally:
            conn.close()
        if np.asarray(out["outputs"]).shape != (1, DIMS_A[-1]) or out["version"] != version:
            raise RuntimeError(f"{child.name}: REST answered {out}")
    if len(sizes) != 1:
        raise RuntimeError(f"{child.name}: gRPC answers of sizes {sorted(sizes)}")
    return sizes.pop()


@dataclass
class Turn:
    """One turn of load on one side: the sample, the whole host's busy CPU seconds and the
    seconds they were counted over, and (a server of several processes) each process's
    share of the server's CPU, largest first."""

    sample: Sample
    host_cpu: float
    elapsed: float
    shares: list[float]


async def one_turn(
    case: Case, child: procs.Child, tools: Tools, cpus: set[int] | None, seconds: float
) -> Turn:
    """One turn of ``case`` on a server, its CPU that of all its processes."""
    workers = procs.descendants(child.pid)
    before = {pid: procs.cpu_seconds(pid) for pid in workers}
    host0, start = procs.host_busy_seconds(), time.perf_counter()
    if case.transport == "rest":
        sample = await asyncio.to_thread(
            load.wrk_load,
            tools.wrk,
            tools.work,
            child.ports["rest_port"],
            predict_path(MODEL),
            tools.rest_body,
            case.connections,
            Budget(0, seconds, 0),
            child.pid,
            cpus,
            server_cpu=procs.tree_cpu_seconds,
        )
    else:
        taken = await asyncio.to_thread(
            load.h2load_grpc,
            tools.h2load,
            tools.work,
            child.ports["grpc_port"],
            PREDICT_METHOD,
            tools.message,
            case.connections,
            case.streams,
            seconds,
            child.pid,
            cpus,
            procs.tree_cpu_seconds,
        )
        if taken.statuses["2xx"] != taken.done:
            raise RuntimeError(f"{child.name}: h2load statuses {taken.statuses}")
        # An answer without a message (an error's trailers alone) leaves its frame out.
        missing = taken.sample.requests - taken.data_bytes // tools.frame_size
        taken.sample.errors += max(0, missing)
        sample = taken.sample
    host, elapsed = procs.host_busy_seconds() - host0, time.perf_counter() - start
    spent = {pid: procs.cpu_seconds(pid) - cpu for pid, cpu in before.items()}
    total = sum(spent.values())
    shares = sorted((cpu / total for cpu in spent.values()), reverse=True) if total else []
    return Turn(sample, host, elapsed, shares)


def mean_shares(turns: list[Turn]) -> list[float]:
    """The processes' shares of a server's CPU, turn by turn largest first, averaged over
    the turns (a connection lands on one worker for a whole turn)."""
    shares = [t.shares for t in turns if t.shares]
    return [sum(column) / len(shares) for column in zip(*shares, strict=True)] if shares else []


def others_cores(turns: list[Turn]) -> float:
    """Cores busy with neither the server nor the generator over ``turns``: the host's busy
    CPU less theirs."""
    host = sum(t.host_cpu for t in turns)
    ours = sum(t.sample.server_cpu + t.sample.client_cpu for t in turns)
    elapsed = sum(t.elapsed for t in turns)
    return max(0.0, host - ours) / elapsed if elapsed else 0.0


def cores(stats: dict[str, Any]) -> float:
    """Cores a side's server kept busy: its CPU per request times its requests/s."""
    value: float = stats["server_cpu_per_req_s"] * stats["throughput"]
    return value


async def throughput(
    plan: Plan, sides: dict[str, procs.Child], tools: Tools
) -> list[dict[str, Any]]:
    """Every case with the generator on each of GENERATORS, the sides taking turns."""
    rows = []
    for generator, cpus in GENERATORS.items():
        for case in plan.cases:
            if case is GRPC_ONE and generator != JUDGED:
                continue
            for side in SIDES:  # off the record
                await procs.quiesce(sides[side].pid, tree=True)
                await one_turn(case, sides[side], tools, cpus, plan.warmup)
            turns: dict[str, list[Turn]] = {side: [] for side in SIDES}
            for turn in range(plan.turns):
                for side in SIDES if turn % 2 == 0 else SIDES[::-1]:
                    await procs.quiesce(sides[side].pid, tree=True)
                    turns[side].append(await one_turn(case, sides[side], tools, cpus, plan.seconds))
            single, double = (
                load.summarize(load.merge([t.sample for t in turns[side]])) for side in SIDES
            )
            for stats in (single, double):
                stats["server_cores"] = cores(stats)
            ratio = _ratio(double["throughput"], single["throughput"])
            row: dict[str, Any] = {
                "part": "throughput",
                "generator": generator,
                "case": case.name,
                "transport": case.transport,
                "connections": case.connections,
                "streams": case.streams,
                "single": single,
                "workers2": double,
                "ratio_throughput": ratio,
                "ratio_cost": _ratio(
                    double["server_cpu_per_req_s"], single["server_cpu_per_req_s"]
                ),
                "worker_shares": mean_shares(turns["workers2"]),
                "others_cores": others_cores([t for side in SIDES for t in turns[side]]),
                "turns": [
                    {
                        f"{side}_throughput": t.sample.requests / t.sample.wall
                        if t.sample.wall
                        else 0.0
                        for side, t in ((side, turns[side][i]) for side in SIDES)
                    }
                    for i in range(plan.turns)
                ],
            }
            if case is GRPC and generator == JUDGED:
                row["target"] = f"x req/s >= {TARGETS['workers_grpc']}"
                row["met"] = ratio is not None and ratio >= TARGETS["workers_grpc"]
            rows.append(row)
    return rows


def _ratio(ours: float, theirs: float) -> float | None:
    return ours / theirs if theirs else None


# -- the run ----------------------------------------------------------------------------------


def tool_version(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=10)
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0] if text else "?"


async def benchmark(
    args: argparse.Namespace, work: Path
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    plan = QUICK if args.quick else FULL
    h2load, wrk = shutil.which("h2load"), shutil.which("wrk")
    if h2load is None or wrk is None:
        raise SystemExit("needs h2load and wrk (apt-get install nghttp2-client wrk)")
    store = work / "store"
    children: list[procs.Child] = []
    left: list[int] = []
    connections: list[Http] = []
    rng = random.Random(args.seed)
    worker_pids: list[int] = []

    def start(name: str, env: dict[str, str] | None = None) -> procs.Child:
        child = procs.start_server(work, BLAS_THREADS, name, store=store, env=env)
        children.append(child)
        return child

    def stop(child: procs.Child) -> None:
        children.remove(child)
        left.extend(procs.stop_tree(child))

    results: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(plan.deadline):
            writer = start("writer")
            writer_conn = Http(writer.ports["rest_port"])
            connections.append(writer_conn)
            await prepare(writer_conn)
            follow = replica_env(1, args.poll_interval)
            replicas: list[Replica] = []
            for count in (1, 2):
                while len(replicas) < count:
                    child = start(f"replica{len(replicas) + 1}", follow)
                    conn = Http(child.ports["rest_port"])
                    connections.append(conn)
                    replicas.append(Replica(f"r{len(replicas) + 1}", child, conn))
                results += await label_moves(
                    writer_conn, replicas, plan.moves, args.poll_interval, rng
                )
            for conn in connections:
                conn.close()
            for replica in replicas:
                stop(replica.child)
            model = await writer_conn.json("GET", f"/v1/models/{MODEL}")
            stop(writer)
            sides = {
                "single": start("single", follow),
                "workers2": start("workers2", replica_env(2, args.poll_interval)),
            }
            payloads = make_payloads(MODEL, 1)
            tools = Tools(h2load, wrk, work, payloads.grpc, payloads.rest, 0)
            sizes = {await check_server(c, tools, model["labels"][LABEL]) for c in sides.values()}
            if len(sizes) != 1:
                raise RuntimeError(f"the two servers' gRPC answers differ in size: {sizes}")
            tools = Tools(h2load, wrk, work, payloads.grpc, payloads.rest, 5 + sizes.pop())
            worker_pids = procs.descendants(sides["workers2"].pid)
            results += await throughput(plan, sides, tools)
    finally:
        for conn in connections:
            conn.close()
        for child in reversed(list(children)):
            stop(child)
    info = report.machine()
    info.update(
        h2load=tool_version([h2load, "--version"]),
        wrk=tool_version([wrk, "-v"]),
        model="A (SPEC_A: 784-512-256-10, float32)",
        blas_threads=BLAS_THREADS,
        poll_interval_s=args.poll_interval,
        poll_gap_s=POLL_GAP,
        moves=plan.moves,
        turns=plan.turns,
        turn_seconds=plan.seconds,
        concurrency=CONCURRENCY,
        judged_generator=JUDGED,
        workers2_processes=len(worker_pids),
        outlived_their_server=left,
        seed=args.seed,
        quick=args.quick,
    )
    return info, [*results, *summaries(results)]


def summaries(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    moves = [r for r in results if r["part"] == "label_move"]
    judged = [r for r in results if "met" in r and r["part"] == "throughput"]
    return [
        {
            "summary": "label_move",
            "target": f"every replica serves a label move within {TARGETS['move_p99_s']:g} s "
            "at p99 (1 and 2 replicas)",
            "met": all(r["met"] for r in moves) if moves else None,
        },
        {
            "summary": "workers",
            "target": f"--workers 2 >= {TARGETS['workers_grpc']}x one process, gRPC "
            f"single-row req/s at concurrency {CONCURRENCY}, generator on {JUDGED}",
            "ratio": judged[0]["ratio_throughput"] if judged else None,
            "met": judged[0]["met"] if judged else None,
        },
    ]


# -- the tables -------------------------------------------------------------------------------


def _seconds_le(value: float | None) -> str:
    return "-" if value is None else f"<={value * 1e3:g}"


def _target(r: dict[str, Any]) -> str:
    return f"{r['target']} {report.verdict(r['met'])}" if "target" in r else ""


def _lag(key: str, fmt: Any) -> Any:
    return lambda r: fmt(r["lag"][key])


MOVE_COLUMNS = [
    report.Column("replicas", 8, report.cell_of("replicas")),
    report.Column("replica", 7, report.cell_of("replica"), left=True),
    report.Column("moves", 5, report.cell_of("moves")),
    report.Column("p50 ms", 7, report.cell_of("p50_s", report.ms)),
    report.Column("p99 ms", 7, report.cell_of("p99_s", report.ms)),
    report.Column("max ms", 7, report.cell_of("max_s", report.ms)),
    report.Column("unserved", 8, report.cell_of("unserved")),
    report.Column("PUT ms", 6, report.cell_of("put_p50_s", report.ms)),
    report.Column("lag n", 5, _lag("count", str)),
    report.Column("lag mean", 8, _lag("mean_s", report.ms)),
    report.Column("lag p50", 7, _lag("p50_le_s", _seconds_le)),
    report.Column("lag p99", 7, _lag("p99_le_s", _seconds_le)),
    report.Column("loaded", 6, report.cell_of("versions_loaded", lambda v: f"{v:.0f}")),
    report.Column("errors", 6, report.cell_of("follow_errors", lambda v: f"{v:.0f}")),
    report.Column("target", 0, _target, left=True),
]


def _cores(value: float) -> str:
    return f"{value:.2f}"


def _split(r: dict[str, Any]) -> str:
    shares = r["worker_shares"]
    return "/".join(f"{s * 100:.0f}" for s in shares[:3]) if shares else "-"


THROUGHPUT_COLUMNS = [
    report.Column("generator", 9, report.cell_of("generator"), left=True),
    report.Column("case", 10, report.cell_of("case"), left=True),
    report.Column("conns", 5, lambda r: f"{r['connections']}x{r['streams']}"),
    report.Column("1p req/s", 8, report.cell_in("single", "throughput", report.rate)),
    report.Column("1p p50", 7, report.cell_in("single", "p50_s", report.ms)),
    report.Column("1p us", 5, report.cell_in("single", "server_cpu_per_req_s", report.us)),
    report.Column("1p cpu", 6, report.cell_in("single", "server_cores", _cores)),
    report.Column("2w req/s", 8, report.cell_in("workers2", "throughput", report.rate)),
    report.Column("2w p50", 7, report.cell_in("workers2", "p50_s", report.ms)),
    report.Column("2w us", 5, report.cell_in("workers2", "server_cpu_per_req_s", report.us)),
    report.Column("2w cpu", 6, report.cell_in("workers2", "server_cores", _cores)),
    report.Column("split %", 7, _split),
    report.Column("x req/s", 7, report.cell_of("ratio_throughput", report.ratio)),
    report.Column("x cost", 6, report.cell_of("ratio_cost", report.ratio)),
    report.Column("gen us", 6, report.cell_in("workers2", "client_cpu_per_req_s", report.us)),
    report.Column("others", 6, report.cell_of("others_cores", _cores)),
    report.Column("errors", 6, lambda r: f"{r['single']['errors']}/{r['workers2']['errors']}"),
    report.Column("target", 0, _target, left=True),
]


def print_results(info: dict[str, Any], results: list[dict[str, Any]]) -> None:
    print(report.machine_line(info))
    print(
        f"model {info['model']}, {info['blas_threads']} BLAS thread; replicas poll the store "
        f"every {info['poll_interval_s']:g} s; {info['h2load']}, {info['wrk']}"
    )
    print(
        f"\n1. label moves: {info['moves']} moves of {LABEL} between versions {MOVING[0]} and "
        f"{MOVING[1]} on the writer (REST), each replica asked every "
        f"{info['poll_gap_s'] * 1e3:g} ms until it answers from the new version"
    )
    report.print_table(MOVE_COLUMNS, [r for r in results if r.get("part") == "label_move"])
    print(
        "(from the PUT sent to the replica's first answer from the new version; PUT: the "
        "writer's answer, p50;\n lag: the replica's propserve_replica_lag_seconds over the "
        "moves, its p50/p99 as bucket bounds in ms;\n loaded: "
        "propserve_replica_versions_loaded; errors: propserve_replica_follow_errors_total)"
    )
    print(
        f"\n2. throughput: single row, concurrency {info['concurrency']}, {info['turns']} "
        f"alternating turns of {info['turn_seconds']:g} s per side; 1p: --follow, one "
        f"process; 2w: --follow --workers 2 ({info['workers2_processes']} processes under "
        "the supervisor)"
    )
    report.print_table(THROUGHPUT_COLUMNS, [r for r in results if r.get("part") == "throughput"])
    print(
        "(gRPC: h2load, REST: wrk, each one thread; generator cpu1: taskset -c 1, the "
        "servers free on both cores;\n free: unpinned. us: server CPU per request (all its "
        "processes); cpu: cores the server kept busy;\n split: the workers' shares of 2w's "
        "CPU (per turn, largest first, averaged); x: 2w over 1p;\n gen us: the generator's "
        "CPU per request (2w's turns); others: cores busy with other processes meanwhile;\n"
        " errors: 1p/2w)"
    )
    for r in results:
        if "summary" in r:
            extra = f" (x {report.ratio(r['ratio'])})" if "ratio" in r else ""
            print(f"target: {r['target']}: {report.verdict(r['met']) or '-'}{extra}")
    if info["outlived_their_server"]:
        print(f"processes that outlived their server: {info['outlived_their_server']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short cases (about a minute)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=0.5,
        help="the replicas' --poll-interval in seconds (default 0.5, the server's)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the pauses between moves")
    args = parser.parse_args(argv)
    import uvloop  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="propserve-replicas-") as tmp:
        info, results = uvloop.run(benchmark(args, Path(tmp)))
    if args.json:
        report.print_json_lines(info, results)
    else:
        print_results(info, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

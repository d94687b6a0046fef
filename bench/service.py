"""Benchmark of the service against bare transports and the in-process engine, in one run.

    .venv/bin/python bench/service.py              # a table (a few minutes)
    .venv/bin/python bench/service.py --quick      # under a minute
    .venv/bin/python bench/service.py --json       # one JSON object per line

It starts, as child processes on ephemeral loopback ports:

- the real server (``python -m propserve serve``, a temporary store) with model
  A=[784,512,256,10] float32 (relu, softmax cross-entropy, sgd);
- a bare gRPC echo (grpc.aio, one generic bytes-in/bytes-out method) that receives the same
  serialized PredictRequest and answers bytes the size of the PredictResponse;
- a bare FastAPI echo (uvicorn, uvloop/httptools, like the server) that reads the same JSON
  body raw and answers a small JSON.

Cases: single-row and 256-row Predict over gRPC (raw float32 bytes) and REST (nested JSON
lists, and base64 bytes as the REST clients send them, transport ``rest-b64``) at concurrency
1, 8 and 64, each alternating with the matching echo case (three turns each, one with --quick) so
that the host's noise hits both alike; streamed training over gRPC (one bidirectional Train
stream of batch-256 steps) against ``engine.Network.train_step`` on the same batches in this
process, in alternating rounds of 120 steps (the target's figure), and again in rounds of 20
(``train_bursts``: a client that pauses every 20 batches pays each burst's pipeline fill).
The server's load runs twice; its resident memory (VmRSS) is read before, between and after,
each time once the server has trimmed its heap after the load (propserve_heap_trims_total
moved), and the second run's growth must stay within 10%. The figures reported are the second run's,
and so are the server's garbage-collector runs (propserve_gc_pause_seconds by generation: runs,
time in all and runs over 10 ms; every thread's Python code waits through each).

Load generation is cheap on purpose (the host has 2 cores, shared with the server): gRPC
goes through one grpc.aio channel with pre-serialized request bytes and undecoded replies;
single-row REST through ``wrk`` when installed (Debian: apt-get install wrk), else (and for
256 rows, where the server's time dwarfs the client's and every request must complete) raw
asyncio HTTP/1.1 keep-alive connections. The client's CPU seconds per request are reported
beside the server's. Every loop is bounded in requests and in time, and every child is stopped
by PID. wrk runs where the scheduler puts it, as the targets do; at concurrency 1 sharing a
core with wrk makes the bare echo much faster than apart, and the server less so, which
bench/rest_placement.py measures with each placement pinned.

Targets: streamed training >= 0.9x in-process samples/s; gRPC single-row Predict p50 at
concurrency 1 <= 1.3x (echo p50 + in-process forward time); REST single-row Predict
throughput >= 0.8x the bare FastAPI echo (at each concurrency).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SPEC: dict[str, Any] = {
    "input_dim": 784,
    "layers": [
        {"units": 512, "activation": "relu"},
        {"units": 256, "activation": "relu"},
        {"units": 10, "activation": "softmax"},
    ],
    "loss": "softmax_cross_entropy",
    "optimizer": {"name": "sgd", "lr": 0.01},
    "dtype": "float32",
    "seed": 0,
}
MODEL = "a"
ROWS = (1, 256)
CONCURRENCY = (1, 8, 64)
TRAIN_BATCH = 256
#: Distinct training batches (the rounds cycle through them).
TRAIN_BATCHES = 80
PREDICT_METHOD = "/propserve.v1.ModelService/Predict"
TRAIN_METHOD = "/propserve.v1.ModelService/Train"
ECHO_METHOD = "/bench.Echo/Echo"
START_TIMEOUT = 60.0
TARGETS = {"train_stream": 0.9, "grpc_p50": 1.3, "rest_throughput": 0.8}


@dataclass(frozen=True)
class Budget:
    """Bounds of one load case: at most ``requests`` started, at most ``seconds`` spent."""

    requests: int
    seconds: float
    warmup: int

    def share(self, parts: int, *, first: bool) -> Budget:
        """One of ``parts`` alternating turns of this budget (the warm-up in the first)."""
        if parts == 1:
            return self
        return Budget(
            max(1, self.requests // parts), self.seconds / parts, self.warmup if first else 0
        )


# -- child processes -----------------------------------------------------------------------


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    ports: dict[str, int]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s; always by this child's PID."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()


def spawn(name: str, command: list[str], work: Path, env: dict[str, str]) -> Child:
    ready = work / f"{name}.ready.json"
    log = work / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            cwd=ROOT,
        )
    child = Child(name, process, {}, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not ready.exists():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready in {START_TIMEOUT} s:\n{log.read_text()}")
            time.sleep(0.02)
        child.ports = {k: v for k, v in json.loads(ready.read_text()).items() if k != "pid"}
    except BaseException:
        child.stop()
        raise
    return child


def start_server(work: Path, blas_threads: int | None) -> Child:
    env = {
        "PROPSERVE_STORE": str(work / "store"),
        "PROPSERVE_REST_PORT": "0",
        "PROPSERVE_GRPC_PORT": "0",
        "PROPSERVE_REST_HOST": "127.0.0.1",
        "PROPSERVE_GRPC_HOST": "127.0.0.1",
        "PROPSERVE_READY_FILE": str(work / "server.ready.json"),
        "PROPSERVE_GRACE_SECONDS": "5",
    }
    if blas_threads is not None:
        env["PROPSERVE_BLAS_THREADS"] = str(blas_threads)
    return spawn("server", [sys.executable, "-m", "propserve", "serve"], work, env)


def start_echo(kind: str, work: Path) -> Child:
    ready = work / f"echo-{kind}.ready.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--echo", kind, "--ready", str(ready)]
    return spawn(f"echo-{kind}", command, work, {})


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def scrape(port: int) -> bytes:
    """The server's /metrics. Scrapes are not activity to the server, so reading them does
    not delay a trim."""
    head = f"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def heap_trims(port: int, metrics: bytes | None = None) -> float | None:
    """The server's propserve_heap_trims_total (None where it does not trim: not glibc),
    from ``metrics`` when given (a scrape), else from a new scrape."""
    text = scrape(port) if metrics is None else metrics
    match = re.search(rb"^propserve_heap_trims_total (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def gc_pauses(metrics: bytes) -> dict[str, tuple[int, float, int]]:
    """The server's collector runs so far, by generation: (runs, seconds in all, runs over
    10 ms), from propserve_gc_pause_seconds in a scrape."""
    text = metrics.decode()
    runs: dict[str, tuple[int, float, int]] = {}
    for generation in ("0", "1", "2"):
        label = f'generation="{generation}"'
        count = re.search(rf"^propserve_gc_pause_seconds_count{{{label}}} (\S+)$", text, re.M)
        total = re.search(rf"^propserve_gc_pause_seconds_sum{{{label}}} (\S+)$", text, re.M)
        within = re.search(
            rf'^propserve_gc_pause_seconds_bucket{{{label},le="0\.01"}} (\S+)$', text, re.M
        )
        if count and total and within:
            n = int(float(count.group(1)))
            runs[generation] = (n, float(total.group(1)), n - int(float(within.group(1))))
    return runs


async def settled_rss_kib(server: Child) -> int:
    """VmRSS once the server has handed back the memory the last load freed.

    NOTE: the server trims its heap 1-2 s after the last API request (service.memory). Read
    at a fixed 2 s after the load, the figure was sometimes the heap before the trim (118-125
    MiB against ~100 after it), so this waits for the server's trim counter to move once the
    load is over (at most 8 s: a trim that came before the first look is not waited for)."""
    await quiesce(server.pid)
    port = server.ports["rest_port"]
    seen = heap_trims(port)
    deadline = time.monotonic() + 8
    while seen is not None and heap_trims(port) == seen and time.monotonic() < deadline:
        await asyncio.sleep(0.25)
    await asyncio.sleep(0.25)
    return rss_kib(server.pid)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def quiesce(pid: int, timeout: float = 30.0) -> None:
    """Wait until the process is idle (under 5% of a core over 100 ms), so that one case's
    backlog does not run into the next; bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = cpu_seconds(pid)
        await asyncio.sleep(0.1)
        if cpu_seconds(pid) - before < 0.005:
            return


# -- the echo servers (run in their child processes) -------------------------------------------


def _predict_reply_size(request_bytes: int) -> int:
    rows = max(request_bytes // (784 * 4), 1)
    return rows * 10 * 4 + 16


async def _grpc_echo(ready: Path) -> None:
    import grpc  # noqa: PLC0415

    replies: dict[int, bytes] = {}

    async def echo(request: bytes, context: Any) -> bytes:
        reply = replies.get(len(request))
        if reply is None:
            reply = replies[len(request)] = bytes(_predict_reply_size(len(request)))
        return reply

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.so_reuseport", 0),
        ]
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    _write_ready(ready, {"grpc_port": port})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


async def _rest_echo(ready: Path) -> None:
    import orjson  # noqa: PLC0415
    import uvicorn  # noqa: PLC0415
    from fastapi import FastAPI, Request, Response  # noqa: PLC0415

    app = FastAPI()

    async def echo(request: Request) -> Response:
        body = await request.body()
        return Response(orjson.dumps({"bytes": len(body)}), media_type="application/json")

    # The annotations are strings here (postponed evaluation) naming local imports.
    echo.__annotations__ = {"request": Request, "return": Response}
    app.post("/echo")(echo)

    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_config=None, access_log=False, lifespan="off"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            return
        await asyncio.sleep(0.01)
    _write_ready(ready, {"rest_port": server.servers[0].sockets[0].getsockname()[1]})
    await task


def _write_ready(path: Path, ports: dict[str, int]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps({"pid": os.getpid(), **ports}))
    os.replace(temporary, path)


def run_echo(kind: str, ready: Path) -> None:
    import uvloop  # noqa: PLC0415

    uvloop.run(_grpc_echo(ready) if kind == "grpc" else _rest_echo(ready))


# -- payloads ------------------------------------------------------------------------------


@dataclass
class Payloads:
    rows: int
    grpc: bytes  # a serialized PredictRequest (float32 raw bytes)
    rest: bytes  # {"inputs": nested lists}, as JSON
    rest_b64: bytes  # {"inputs": {b64, shape, dtype}}, as JSON


def make_payloads(rows: int) -> Payloads:
    import numpy as np  # noqa: PLC0415
    import orjson  # noqa: PLC0415

    from propserve.v1 import model_service_pb2 as pb  # noqa: PLC0415

    x = np.random.default_rng(rows).standard_normal((rows, 784), dtype=np.float32)
    tensor = pb.Tensor(shape=[rows, 784], dtype=pb.DTYPE_FLOAT32, data=x.tobytes())
    grpc_bytes = pb.PredictRequest(model=MODEL, inputs=tensor).SerializeToString()
    rest_bytes = orjson.dumps({"inputs": x.tolist()})
    b64 = {"b64": base64.b64encode(x.tobytes()).decode(), "shape": [rows, 784], "dtype": "float32"}
    return Payloads(rows, grpc_bytes, rest_bytes, orjson.dumps({"inputs": b64}))


def train_batches(steps: int) -> tuple[list[Any], list[Any], list[bytes]]:
    import numpy as np  # noqa: PLC0415

    from propserve.v1 import model_service_pb2 as pb  # noqa: PLC0415

    rng = np.random.default_rng(7)
    xs, ys, wire = [], [], []
    for _ in range(steps):
        x = rng.standard_normal((TRAIN_BATCH, 784), dtype=np.float32)
        y = rng.integers(0, 10, TRAIN_BATCH, dtype=np.int64)
        xs.append(x)
        ys.append(y)
        request = pb.TrainStepRequest(
            model=MODEL,
            inputs=pb.Tensor(shape=[TRAIN_BATCH, 784], dtype=pb.DTYPE_FLOAT32, data=x.tobytes()),
            targets=pb.Tensor(shape=[TRAIN_BATCH], dtype=pb.DTYPE_INT64, data=y.tobytes()),
        )
        wire.append(request.SerializeToString())
    return xs, ys, wire


# -- load generation -----------------------------------------------------------------------


@dataclass
class Sample:
    latencies: list[float]
    wall: float
    client_cpu: float
    server_cpu: float
    errors: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.latencies)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def throughput(self) -> float:
        return self.count / self.wall if self.wall > 0 else 0.0


async def closed_loop(
    call: Callable[[], Awaitable[None]], concurrency: int, budget: Budget, server_pid: int
) -> Sample:
    """``concurrency`` workers each issuing one call after another, until ``budget``."""
    for _ in range(budget.warmup):
        await call()
    latencies: list[float] = []
    failures = 0
    issued = 0
    deadline = time.perf_counter() + budget.seconds

    async def worker() -> None:
        nonlocal issued, failures
        while issued < budget.requests and time.perf_counter() < deadline:
            issued += 1
            start = time.perf_counter()
            try:
                await call()
            except Exception:
                failures += 1
                continue
            latencies.append(time.perf_counter() - start)

    cpu0, server0, start = time.process_time(), cpu_seconds(server_pid), time.perf_counter()
    await asyncio.wait_for(
        asyncio.gather(*(worker() for _ in range(concurrency))), budget.seconds + 60
    )
    wall = time.perf_counter() - start
    return Sample(
        latencies,
        wall,
        time.process_time() - cpu0,
        cpu_seconds(server_pid) - server0,
        failures,
    )


class HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection with one request in flight (no pipelining)."""

    _LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.header_end = -1
        self.length = -1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.header_end < 0:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self.header_end = end + 4
            match = self._LENGTH.search(self.buffer, 0, end + 2)
            self.length = int(match.group(1)) if match else 0
        if len(self.buffer) >= self.header_end + self.length and self.waiter is not None:
            status = int(self.buffer[9:12])
            del self.buffer[: self.header_end + self.length]
            self.header_end = self.length = -1
            if not self.waiter.done():
                self.waiter.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection lost"))

    async def request(self, data: bytes) -> int:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self.waiter


def http_request(port: int, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def rest_load(
    port: int, path: str, body: bytes, concurrency: int, budget: Budget, server_pid: int
) -> Sample:
    loop = asyncio.get_running_loop()
    connections = [
        (await loop.create_connection(HttpConnection, "127.0.0.1", port))[1]
        for _ in range(concurrency)
    ]
    free = list(connections)
    data = http_request(port, path, body)

    async def call() -> None:
        conn = free.pop()
        try:
            status = await conn.request(data)
        finally:
            free.append(conn)
        if status != 200:
            raise RuntimeError(f"HTTP {status}")

    try:
        return await closed_loop(call, concurrency, budget, server_pid)
    finally:
        for conn in connections:
            if conn.transport is not None:
                conn.transport.close()


WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = io.open(os.getenv("BENCH_BODY"), "rb"):read("*a")
done = function(summary, latency, requests)
  io.write(string.format(
    "BENCH {\\"requests\\": %d, \\"errors\\": %d, \\"status\\": %d, \\"p50_us\\": %d, "
    .. "\\"p99_us\\": %d, \\"duration_us\\": %d}\\n",
    summary.requests, summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.timeout, summary.errors.status, latency:percentile(50),
    latency:percentile(99), summary.duration))
end
"""


def wrk_load(
    wrk: str,
    work: Path,
    port: int,
    path: str,
    body: bytes,
    concurrency: int,
    budget: Budget,
    server_pid: int,
    cpus: set[int] | None = None,
) -> Sample:
    """wrk for ``budget.seconds`` (at least 1 s; wrk counts whole seconds), on ``cpus`` when
    given (else where the scheduler puts it)."""
    script = work / "bench.lua"
    script.write_text(WRK_SCRIPT)
    body_path = work / f"body-{len(body)}.json"
    if not body_path.exists():
        body_path.write_bytes(body)
    seconds = max(1, round(budget.seconds))
    command = [
        wrk,
        "-t1",
        f"-c{concurrency}",
        f"-d{seconds}s",
        "--timeout",
        "30s",
        "-s",
        str(script),
        f"http://127.0.0.1:{port}{path}",
    ]
    if cpus is not None:
        # NOTE: taskset (util-linux) sets the affinity and execs wrk; a preexec_fn would run
        # Python between fork and exec, which a process with threads must not do.
        command = ["taskset", "-c", ",".join(str(cpu) for cpu in sorted(cpus)), *command]
    env = {**os.environ, "BENCH_BODY": str(body_path)}
    before = os.times()
    server0 = cpu_seconds(server_pid)
    done = subprocess.run(
        command,
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    after = os.times()
    server_cpu = cpu_seconds(server_pid) - server0
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if done.returncode or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}\n{done.stderr}")
    result = json.loads(line[6:])
    if result["status"]:
        raise RuntimeError(f"{result['status']} answers were not 2xx from {path}")
    client_cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    wall = result["duration_us"] / 1e6
    # wrk reports percentiles, not every latency: rebuild a two-point sample.
    p50, p99 = result["p50_us"] / 1e6, result["p99_us"] / 1e6
    count = result["requests"]
    sample = Sample([], wall, client_cpu, server_cpu, result["errors"] + result["status"])
    sample.extra = {"count": count, "p50": p50, "p99": p99}
    return sample


def merge(samples: list[Sample]) -> Sample:
    """Alternating turns of one case as one sample: their requests, times and CPU added up;
    for wrk's turns (percentiles only), the median of their percentiles."""
    if len(samples) == 1:
        return samples[0]
    merged = Sample(
        [latency for s in samples for latency in s.latencies],
        sum(s.wall for s in samples),
        sum(s.client_cpu for s in samples),
        sum(s.server_cpu for s in samples),
        sum(s.errors for s in samples),
    )
    if all(s.extra for s in samples):
        merged.extra = {
            "count": sum(s.extra["count"] for s in samples),
            "p50": statistics.median(s.extra["p50"] for s in samples),
            "p99": statistics.median(s.extra["p99"] for s in samples),
        }
    return merged


def summarize(sample: Sample) -> dict[str, Any]:
    if sample.extra:
        count, p50, p99 = sample.extra["count"], sample.extra["p50"], sample.extra["p99"]
    else:
        count, p50, p99 = sample.count, sample.percentile(0.5), sample.percentile(0.99)
    done = max(count, 1)
    return {
        "requests": count,
        "errors": sample.errors,
        "p50_s": p50,
        "p99_s": p99,
        "throughput": count / sample.wall if sample.wall > 0 else 0.0,
        "wall_s": sample.wall,
        "client_cpu_s": sample.client_cpu,
        "client_cpu_per_req_s": sample.client_cpu / done,
        "server_cpu_per_req_s": sample.server_cpu / done,
    }


# -- the benchmark -------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import grpc  # noqa: PLC0415

    from bench import common  # noqa: PLC0415

    return {**common.machine(), "grpcio": grpc.__version__, "kernel": platform.release()}


def in_process_forward(repeats: int, idle: float = 0.0) -> float:
    """Median seconds of one single-row Network.forward of model A in this process, called
    back to back, or each after sleeping ``idle`` seconds (as a server waits for requests)."""
    import numpy as np  # noqa: PLC0415

    from propserve.engine import ModelSpec, Network  # noqa: PLC0415

    network = Network(ModelSpec.from_dict(SPEC))
    x = np.random.default_rng(1).standard_normal((1, 784), dtype=np.float32)
    times = []
    for _ in range(repeats):
        if idle:
            time.sleep(idle)
        start = time.perf_counter()
        network.forward(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass
class TrainComparison:
    """Interleaved rounds of in-process steps and streamed steps on the same batches."""

    local_seconds: float = 0.0
    remote_seconds: float = 0.0
    steps: int = 0
    round_ratios: list[float] = field(default_factory=list)

    @property
    def local(self) -> float:
        return self.steps * TRAIN_BATCH / self.local_seconds

    @property
    def remote(self) -> float:
        return self.steps * TRAIN_BATCH / self.remote_seconds


async def compare_training(
    channel: Any, train: tuple[list[Any], list[Any], list[bytes]], rounds: int, steps: int
) -> TrainComparison:
    """Samples/s of ``Network.train_step`` in this process and of one gRPC Train stream,
    alternating round by round over the same batches.

    NOTE: the host's speed drifts by up to 2x within a minute (the same in-process step took
    4.1 ms and 7.7 ms a minute apart), so a baseline measured once before or after the
    stream compares different machines; alternating rounds of about a second lets the drift
    hit both alike. The stream stays open across rounds, as a training client's does, and
    idles while this process trains; each of its rounds still starts with an empty pipeline
    (the round's first batch cannot overlap a previous step), which the in-process rounds do
    not pay and a client streaming without pause pays once. That costs ~5 ms a round (the
    first batch's transfer, a first step slowed by the client's burst of writes, the last
    answer's return). Compared in interleaved blocks of 240 steps, longer rounds read higher
    each time: rounds of 20 against 120 0.899x/0.929x, 0.905x/0.934x and 0.894x/0.917x,
    against 100 0.892x/0.897x. Hence rounds of 120 for the target, with bursts of 20 reported
    beside them."""
    import grpc  # noqa: PLC0415

    from propserve.engine import ModelSpec, Network  # noqa: PLC0415

    xs, ys, wire = train
    network = Network(ModelSpec.from_dict(SPEC))
    network.train_step(xs[0], ys[0])
    result = TrainComparison()
    stream = channel.stream_stream(TRAIN_METHOD)(timeout=60 + rounds * steps)
    try:
        for r in range(rounds):
            chosen = [(i + r * steps) % len(xs) for i in range(steps)]
            start = time.perf_counter()
            for i in chosen:
                network.train_step(xs[i], ys[i])
            local = time.perf_counter() - start

            async def send(chosen: list[int] = chosen) -> None:
                for i in chosen:
                    await stream.write(wire[i])

            start = time.perf_counter()
            sending = asyncio.ensure_future(send())
            try:
                for _ in chosen:
                    if await stream.read() is grpc.aio.EOF:
                        raise RuntimeError("the Train stream ended early")
            except BaseException:
                sending.cancel()
                raise
            remote = time.perf_counter() - start
            await sending
            result.local_seconds += local
            result.remote_seconds += remote
            result.steps += steps
            result.round_ratios.append(local / remote)
        await stream.done_writing()
        if await stream.read() is not grpc.aio.EOF:
            raise RuntimeError("the Train stream answered more batches than it was sent")
    finally:
        stream.cancel()
    return result


@dataclass
class Plan:
    predict: dict[int, Budget]  # by rows
    rest_256: Budget
    train_rounds: int
    train_round_steps: int
    burst_rounds: int
    burst_steps: int
    alternations: int
    forward_repeats: int


QUICK = Plan(
    predict={1: Budget(1500, 0.5, 20), 256: Budget(300, 0.5, 2)},
    rest_256=Budget(64, 1.0, 1),
    train_rounds=2,
    train_round_steps=40,
    burst_rounds=3,
    burst_steps=12,
    alternations=1,
    forward_repeats=500,
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
)


def row(
    transport: str, op: str, rows: int, concurrency: int, stats: dict[str, Any]
) -> dict[str, Any]:
    return {"transport": transport, "op": op, "rows": rows, "concurrency": concurrency, **stats}


async def run_load(
    plan: Plan,
    server: Child,
    echoes: dict[str, Child] | None,
    payloads: dict[int, Payloads],
    train: tuple[list[Any], list[Any], list[bytes]],
    wrk: str | None,
    work: Path,
) -> list[dict[str, Any]]:
    """One pass of the load over the server (and, when given, the echoes, interleaved)."""
    import grpc  # noqa: PLC0415

    options = [
        ("grpc.max_receive_message_length", 64 << 20),
        ("grpc.max_send_message_length", 64 << 20),
    ]
    results: list[dict[str, Any]] = []
    targets = {"server": f"127.0.0.1:{server.ports['grpc_port']}"}
    if echoes:
        targets["echo"] = f"127.0.0.1:{echoes['grpc'].ports['grpc_port']}"
    channels = {k: grpc.aio.insecure_channel(v, options=options) for k, v in targets.items()}
    try:
        for ch in channels.values():
            await asyncio.wait_for(ch.channel_ready(), 10)
        # gRPC predict
        for rows in ROWS:
            payload = payloads[rows]
            for conc in CONCURRENCY:
                budget = plan.predict[rows]
                samples: dict[str, list[Sample]] = {"echo": [], "server": []}
                for turn in range(plan.alternations):
                    for who, method in (("echo", ECHO_METHOD), ("server", PREDICT_METHOD)):
                        if who not in channels:
                            continue
                        stub: Any = channels[who].unary_unary(method)

                        async def call(stub: Any = stub, data: bytes = payload.grpc) -> None:
                            await stub(data, timeout=60)

                        pid = server.pid if who == "server" else echoes["grpc"].pid  # type: ignore[index]
                        await quiesce(pid)
                        share = budget.share(plan.alternations, first=turn == 0)
                        samples[who].append(await closed_loop(call, conc, share, pid))
                for who, taken in samples.items():
                    if taken:
                        op = "predict" if who == "server" else "echo"
                        results.append(row("grpc", op, rows, conc, summarize(merge(taken))))
        # REST predict: nested lists, and base64 bytes (the REST clients' default)
        rest_cases = [("rest", rows, payloads[rows].rest) for rows in ROWS]
        rest_cases += [("rest-b64", rows, payloads[rows].rest_b64) for rows in ROWS]
        for transport, rows, body in rest_cases:
            for conc in CONCURRENCY:
                budget = plan.predict[rows] if rows == 1 else plan.rest_256
                cases = [("server", server, f"/v1/models/{MODEL}/predict")]
                if echoes:
                    cases.insert(0, ("echo", echoes["rest"], "/echo"))
                samples = {"echo": [], "server": []}
                for turn in range(plan.alternations):
                    for who, child, path in cases:
                        port = child.ports["rest_port"]
                        await quiesce(child.pid)
                        share = budget.share(plan.alternations, first=turn == 0)
                        if wrk and rows == 1:
                            sample = await asyncio.to_thread(
                                wrk_load, wrk, work, port, path, body, conc, share, child.pid
                            )
                        else:
                            sample = await rest_load(port, path, body, conc, share, child.pid)
                        samples[who].append(sample)
                for who, taken in samples.items():
                    if taken:
                        op = "predict" if who == "server" else "echo"
                        results.append(row(transport, op, rows, conc, summarize(merge(taken))))
        # streamed training against the engine in this process: long rounds, then bursts
        for op, rounds, steps in (
            ("train_stream", plan.train_rounds, plan.train_round_steps),
            ("train_bursts", plan.burst_rounds, plan.burst_steps),
        ):
            await quiesce(server.pid)
            trained = await compare_training(channels["server"], train, rounds, steps)
            results.append(
                {
                    "transport": "grpc",
                    "op": op,
                    "rows": TRAIN_BATCH,
                    "concurrency": 1,
                    "steps": trained.steps,
                    "round_steps": steps,
                    "throughput": trained.remote,
                    "p50_s": None,
                    "p99_s": None,
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


async def create_model(server: Child) -> None:
    import grpc  # noqa: PLC0415

    from propserve.v1 import model_service_pb2 as pb  # noqa: PLC0415
    from propserve.v1 import model_service_pb2_grpc as pb_grpc  # noqa: PLC0415

    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.ports['grpc_port']}") as channel:
        stub = pb_grpc.ModelServiceStub(channel)
        await stub.CreateModel(pb.CreateModelRequest(name=MODEL, spec_json=json.dumps(SPEC)))


def attach_targets(results: list[dict[str, Any]], forward_s: float) -> None:
    echo = {(r["transport"], r["rows"], r["concurrency"]): r for r in results if r["op"] == "echo"}
    for r in results:
        if r["op"] != "predict":
            continue
        base = echo.get((r["transport"], r["rows"], r["concurrency"]))
        if base is None:
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
            r["baseline_of"] = "echo throughput"
            r["ratio"] = r["throughput"] / r["baseline"] if r["baseline"] else None
            if r["rows"] == 1:
                r["target"] = f"ratio >= {TARGETS['rest_throughput']}"
                r["met"] = r["ratio"] is not None and r["ratio"] >= TARGETS["rest_throughput"]
    for r in results:
        if r["op"] == "train_stream":
            r["target"] = f"ratio >= {TARGETS['train_stream']}"
            r["met"] = r["ratio"] >= TARGETS["train_stream"]


def _fmt_s(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1e3:.3f}"


def print_table(info: dict[str, Any], results: list[dict[str, Any]]) -> None:
    print(
        f"machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}, "
        f"numpy {info['numpy']}, grpcio {info['grpcio']}, kernel {info['kernel']}"
    )
    print(
        f"server: pid {info['server_pid']}, blas_threads {info['blas_threads']}; "
        f"REST load: {info['rest_client']}; in-process forward (1 row) "
        f"{info['forward_s'] * 1e3:.3f} ms back to back, "
        f"{info['forward_after_idle_s'] * 1e3:.3f} ms after 0.5 ms idle"
    )
    header = (
        f"{'transport':9} {'op':12} {'rows':>4} {'conc':>4} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'req/s':>8} {'cli us/req':>10} {'srv us/req':>10} {'baseline':>10} {'ratio':>6} "
        "target"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        if r["op"] in ("rss", "gc"):
            continue
        base = r.get("baseline")
        if base is None:
            base_text = "-"
        elif r["op"] == "predict" and r["transport"] == "grpc":
            base_text = f"{base * 1e3:.3f}ms"
        else:
            base_text = f"{base:,.0f}/s"
        ratio = r.get("ratio")
        target = r.get("target", "")
        if target:
            target = f"{target} {'met' if r['met'] else 'MISSED'}"
        throughput = r["throughput"]
        tp_text = f"{throughput:,.0f}" + ("*" if r["op"].startswith("train_") else "")
        cli = r.get("client_cpu_per_req_s")
        srv = r.get("server_cpu_per_req_s")
        print(
            f"{r['transport']:9} {r['op']:12} {r['rows']:>4} {r['concurrency']:>4} "
            f"{_fmt_s(r.get('p50_s')):>8} {_fmt_s(r.get('p99_s')):>8} {tp_text:>8} "
            f"{'-' if cli is None else f'{cli * 1e6:.0f}':>10} "
            f"{'-' if srv is None else f'{srv * 1e6:.0f}':>10} "
            f"{base_text:>10} {'-' if ratio is None else f'{ratio:.3f}':>6} {target}"
        )
    print(
        "(* samples/s; baseline: in-process Network.train_step, in rounds alternating with "
        "the stream's:\n   train_stream in rounds of "
        f"{info['train_round_steps']} steps, train_bursts in rounds of {info['burst_steps']}, "
        "each round starting with the stream's pipeline empty)"
    )
    for r in results:
        if r["op"] == "rss":
            print(
                f"server RSS: before {r['before_kib'] / 1024:.1f} MiB, after load 1 "
                f"{r['after_1_kib'] / 1024:.1f} MiB, after load 2 {r['after_2_kib'] / 1024:.1f} "
                f"MiB; growth over load 2 {r['growth'] * 100:+.1f}% (limit +10%: "
                f"{'met' if r['met'] else 'MISSED'})"
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
    return {
        "transport": "-",
        "op": "gc",
        "rows": 0,
        "concurrency": 0,
        "generations": generations,
        "idle_releases": releases,
    }


async def benchmark(
    args: argparse.Namespace, work: Path
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    plan = QUICK if args.quick else FULL
    from threadpoolctl import threadpool_limits  # noqa: PLC0415

    from propserve.service.server import DEFAULT_BLAS_THREADS  # noqa: PLC0415

    # The in-process engine gets the server's BLAS threads, so the comparison is like for like.
    threadpool_limits(args.blas_threads or DEFAULT_BLAS_THREADS, user_api="blas")
    wrk = None if args.rest_client == "asyncio" else shutil.which("wrk")
    if args.rest_client == "wrk" and wrk is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    info = machine()
    payloads = {rows: make_payloads(rows) for rows in ROWS}
    train = train_batches(TRAIN_BATCHES)
    forward_s = in_process_forward(plan.forward_repeats)
    # NOTE: the target's baseline is the forward pass back to back, as the issue defines it;
    # after an idle gap the same pass runs with cold caches (measured here: 2-4x slower), as
    # it does in a server waiting for its next request. Reported beside it, not used.
    forward_idle_s = in_process_forward(plan.forward_repeats // 5, idle=0.0005)
    children: list[Child] = []
    cpu0 = time.process_time()
    children0 = os.times()
    try:
        server = start_server(work, args.blas_threads)
        children.append(server)
        echoes = {}
        for kind in ("grpc", "rest"):
            echoes[kind] = start_echo(kind, work)
            children.append(echoes[kind])
        await create_model(server)
        before = await settled_rss_kib(server)
        await run_load(plan, server, None, payloads, train, wrk, work)
        after_1 = await settled_rss_kib(server)
        port = server.ports["rest_port"]
        metrics = scrape(port)
        collected_before, trims_before = gc_pauses(metrics), heap_trims(port, metrics)
        results = await run_load(plan, server, echoes, payloads, train, wrk, work)
        # Read before the server's release after the load, whose full collection runs idle.
        metrics = scrape(port)
        collected_after, trims_after = gc_pauses(metrics), heap_trims(port, metrics)
        after_2 = await settled_rss_kib(server)
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
            "transport": "-",
            "op": "rss",
            "rows": 0,
            "concurrency": 0,
            "before_kib": before,
            "after_1_kib": after_1,
            "after_2_kib": after_2,
            "growth": growth,
            "target": "growth <= 10%",
            "met": growth <= 0.10,
            "client_cpu_s": client_cpu,
        }
    )
    releases = None if trims_before is None else (trims_after or 0) - trims_before
    results.append(collector_row(collected_before, collected_after, releases))
    info.update(
        forward_s=forward_s,
        forward_after_idle_s=forward_idle_s,
        train_round_steps=plan.train_round_steps,
        burst_steps=plan.burst_steps,
        server_pid=server.pid,
        blas_threads=args.blas_threads or DEFAULT_BLAS_THREADS,
        rest_client="wrk (1 row), asyncio keep-alive (256 rows)" if wrk else "asyncio keep-alive",
        quick=args.quick,
    )
    return info, results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short cases (under a minute)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument(
        "--blas-threads",
        type=int,
        default=None,
        help="BLAS threads for the server and the in-process engine (default: the server's)",
    )
    parser.add_argument(
        "--rest-client",
        choices=("auto", "wrk", "asyncio"),
        default="auto",
        help="REST load generator (auto: wrk when installed)",
    )
    parser.add_argument("--echo", choices=("grpc", "rest"), help=argparse.SUPPRESS)
    parser.add_argument("--ready", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.echo:
        run_echo(args.echo, args.ready)
        return 0
    import uvloop  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="propserve-bench-") as tmp:
        info, results = uvloop.run(benchmark(args, Path(tmp)))
    if args.json:
        print(json.dumps({"machine": info}))
        for r in results:
            print(json.dumps(r))
    else:
        print_table(info, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

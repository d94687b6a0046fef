"""Load generators that cost the client little CPU (the host's 2 cores are shared with the
server): gRPC through one grpc.aio channel with pre-serialized requests and undecoded
replies; REST through raw asyncio HTTP/1.1 keep-alive connections, or through ``wrk`` (Debian:
apt-get install wrk). Closed loops (a number of workers, each sending its next request when
the last is answered) are bounded by a Budget in requests and time; the open loop
(``paced``: requests at a fixed rate, answered or not) by its length.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import statistics
import subprocess
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench.procs import cpu_seconds

#: Channel options for messages of 256 rows and more.
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


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


@dataclass
class Sample:
    """One turn of load on one process: what the client saw and what both sides spent.

    ``latencies`` holds every request's where the client keeps them; ``quantiles`` (p50,
    p99) where it reports only those (wrk)."""

    requests: int
    wall: float
    client_cpu: float
    server_cpu: float
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    quantiles: tuple[float, float] | None = None

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def merge(samples: list[Sample]) -> Sample:
    """Alternating turns of one case as one sample: their requests, times and CPU added up;
    for turns with quantiles only, the median of their quantiles."""
    if len(samples) == 1:
        return samples[0]
    merged = Sample(
        sum(s.requests for s in samples),
        sum(s.wall for s in samples),
        sum(s.client_cpu for s in samples),
        sum(s.server_cpu for s in samples),
        sum(s.errors for s in samples),
        [latency for s in samples for latency in s.latencies],
    )
    quantiles = [s.quantiles for s in samples if s.quantiles is not None]
    if quantiles:
        merged.quantiles = (
            statistics.median(q[0] for q in quantiles),
            statistics.median(q[1] for q in quantiles),
        )
    return merged


def summarize(sample: Sample) -> dict[str, Any]:
    """A sample as a result row's fields (seconds, requests/s)."""
    if sample.quantiles is not None:
        p50, p99 = sample.quantiles
    else:
        p50, p99 = sample.percentile(0.5), sample.percentile(0.99)
    done = max(sample.requests, 1)
    return {
        "requests": sample.requests,
        "errors": sample.errors,
        "p50_s": p50,
        "p99_s": p99,
        "throughput": sample.requests / sample.wall if sample.wall > 0 else 0.0,
        "wall_s": sample.wall,
        "client_cpu_s": sample.client_cpu,
        "client_cpu_per_req_s": sample.client_cpu / done,
        "server_cpu_per_req_s": sample.server_cpu / done,
    }


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
        len(latencies),
        wall,
        time.process_time() - cpu0,
        cpu_seconds(server_pid) - server0,
        failures,
        latencies,
    )


# -- gRPC ----------------------------------------------------------------------------------


def grpc_channel(port: int) -> grpc.aio.Channel:
    """An insecure grpc.aio channel to a loopback port."""
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS)


async def grpc_load(
    channel: grpc.aio.Channel,
    method: str,
    request: bytes,
    concurrency: int,
    budget: Budget,
    server_pid: int,
) -> Sample:
    """Unary calls of ``method`` (e.g. "/pkg.Service/Method") with the same serialized
    request; replies stay undecoded bytes."""
    stub: Any = channel.unary_unary(method)

    async def call() -> None:
        await stub(request, timeout=60)

    return await closed_loop(call, concurrency, budget, server_pid)


# -- REST: asyncio HTTP/1.1 ----------------------------------------------------------------


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
        """Send a whole request's bytes; the answer's HTTP status."""
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self.waiter


async def connect(port: int) -> HttpConnection:
    """A keep-alive connection to a loopback port."""
    loop = asyncio.get_running_loop()
    return (await loop.create_connection(HttpConnection, "127.0.0.1", port))[1]


def http_request(port: int, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    """A POST of ``body`` as bytes on the wire: JSON unless ``headers`` name another
    Content-Type; ``headers`` are sent besides."""
    fields = {"Content-Type": "application/json", **(headers or {})}
    lines = "".join(f"{name}: {value}\r\n" for name, value in fields.items())
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{lines}"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def rest_load(
    port: int,
    path: str,
    body: bytes,
    concurrency: int,
    budget: Budget,
    server_pid: int,
    headers: dict[str, str] | None = None,
) -> Sample:
    """POSTs of ``body`` (with ``headers``, see http_request) to ``path`` over
    ``concurrency`` keep-alive connections; any answer but 200 counts as an error."""
    connections = [await connect(port) for _ in range(concurrency)]
    free = list(connections)
    data = http_request(port, path, body, headers)

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


# -- REST: wrk -----------------------------------------------------------------------------

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
    headers: dict[str, str] | None = None,
    server_cpu: Callable[[int], float] = cpu_seconds,
) -> Sample:
    """wrk for ``budget.seconds`` (at least 1 s; wrk counts whole seconds), on ``cpus`` when
    given (else where the scheduler puts it), sending ``headers`` besides (a Content-Type
    among them replaces JSON's); the server's CPU read by ``server_cpu`` (e.g.
    procs.tree_cpu_seconds for a server of several processes). Blocking: run it in a
    thread from a loop."""
    text = WRK_SCRIPT + "".join(
        f"wrk.headers[{json.dumps(name)}] = {json.dumps(value)}\n"
        for name, value in (headers or {}).items()
    )
    script = work / f"bench-{zlib.crc32(text.encode()):08x}.lua"
    script.write_text(text)
    body_path = work / f"body-{zlib.crc32(body):08x}.json"
    if not body_path.exists():
        body_path.write_bytes(body)
    seconds = max(1, round(budget.seconds))
    command = pinned(
        [
            wrk,
            "-t1",
            f"-c{concurrency}",
            f"-d{seconds}s",
            "--timeout",
            "30s",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}{path}",
        ],
        cpus,
    )
    env = {**os.environ, "BENCH_BODY": str(body_path)}
    before = os.times()
    server0 = server_cpu(server_pid)
    done = subprocess.run(
        command, check=False, env=env, capture_output=True, text=True, timeout=seconds + 60
    )
    after = os.times()
    spent = server_cpu(server_pid) - server0
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if done.returncode or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}\n{done.stderr}")
    result = json.loads(line[6:])
    if result["status"]:
        raise RuntimeError(f"{result['status']} answers were not 2xx from {path}")
    client_cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    return Sample(
        result["requests"],
        result["duration_us"] / 1e6,
        client_cpu,
        spent,
        result["errors"],
        quantiles=(result["p50_us"] / 1e6, result["p99_us"] / 1e6),
    )


def pinned(command: list[str], cpus: set[int] | None) -> list[str]:
    """``command`` run on ``cpus`` through taskset, or as it is where ``cpus`` is None."""
    if cpus is None:
        return command
    # NOTE: taskset (util-linux) sets the affinity and execs the command; a preexec_fn would
    # run Python between fork and exec, which a process with threads must not do.
    return ["taskset", "-c", ",".join(str(cpu) for cpu in sorted(cpus)), *command]


# -- gRPC: h2load ----------------------------------------------------------------------------


def grpc_frame(message: bytes) -> bytes:
    """A gRPC message as it goes in an HTTP/2 body: not compressed (0), its length as 4
    big-endian bytes, the message."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


@dataclass
class H2Sample:
    """One h2load turn: the sample, and what tells whether every answer carried a message."""

    sample: Sample
    done: int
    data_bytes: int
    statuses: dict[str, int]


def h2load_grpc(
    h2load: str,
    work: Path,
    port: int,
    method: str,
    message: bytes,
    connections: int,
    streams: int,
    seconds: float,
    server_pid: int,
    cpus: set[int] | None = None,
    server_cpu: Callable[[int], float] = cpu_seconds,
) -> H2Sample:
    """Unary gRPC calls of ``method`` (e.g. "/pkg.Service/Method") with the serialized
    ``message``, sent by h2load (Debian: apt-get install nghttp2-client) as HTTP/2 POSTs over
    ``connections`` connections with ``streams`` calls in flight on each, for ``seconds``,
    on ``cpus`` when given. h2load reads HTTP statuses, not trailers: a call answered with
    an error status has no message, which the answers' DATA bytes (``data_bytes``, against
    ``done`` answers) show; check one call's status with grpcio besides. Latencies are
    h2load's per-request log's. Blocking: run it in a thread from a loop."""
    body_path = work / f"grpc-{zlib.crc32(message):08x}.bin"
    if not body_path.exists():
        body_path.write_bytes(grpc_frame(message))
    log = work / f"h2load-{time.monotonic_ns()}.log"
    command = pinned(
        [
            h2load,
            "-t1",
            f"-c{connections}",
            f"-m{streams}",
            f"-D{seconds:g}",
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "-d",
            str(body_path),
            f"--log-file={log}",
            f"http://127.0.0.1:{port}{method}",
        ],
        cpus,
    )
    before = os.times()
    server0 = server_cpu(server_pid)
    done = subprocess.run(
        command, check=False, capture_output=True, text=True, timeout=seconds + 60
    )
    after = os.times()
    spent = server_cpu(server_pid) - server0
    try:
        lines = log.read_text().splitlines() if log.exists() else []
    finally:
        log.unlink(missing_ok=True)
    finished = re.search(r"^finished in ([\d.]+)(m?s)", done.stdout, re.M)
    answered = re.search(r"^requests: \d+ total, \d+ started, (\d+) done", done.stdout, re.M)
    codes = re.search(
        r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", done.stdout, re.M
    )
    data = re.search(r"\((\d+)\) data", done.stdout)
    if done.returncode or not (finished and answered and codes and data):
        raise RuntimeError(f"h2load failed ({done.returncode}): {done.stdout}\n{done.stderr}")
    wall = float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1)
    statuses = dict(zip(("2xx", "3xx", "4xx", "5xx"), map(int, codes.groups()), strict=True))
    latencies = list(
        int(fields[2]) / 1e6
        for fields in (line.split("\t") for line in lines)
        if len(fields) > 2 and fields[1] == "200"
    )
    client_cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    # done: answered, whatever their status, or failed (connection errors, timeouts)
    finished_calls = int(answered.group(1))
    quantiles = Sample(0, 0.0, 0.0, 0.0, latencies=latencies)
    sample = Sample(
        statuses["2xx"],
        wall,
        client_cpu,
        spent,
        finished_calls - statuses["2xx"],
        quantiles=(quantiles.percentile(0.5), quantiles.percentile(0.99)),
    )
    return H2Sample(sample, finished_calls, int(data.group(1)), statuses)


# -- one side of a case ----------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """What one side of a case sends, over and over: over REST a POST of ``body`` to the path
    ``target`` with ``headers`` besides (see http_request); over gRPC the serialized ``body``
    to the method ``target`` (e.g. "/pkg.Service/Method")."""

    transport: str  # "rest" or "grpc"
    target: str
    body: bytes
    headers: dict[str, str] | None = None


async def request_load(
    request: Request,
    server_pid: int,
    rest_port: int,
    channel: grpc.aio.Channel | None,
    concurrency: int,
    budget: Budget,
    wrk: str | None,
    work: Path,
) -> Sample:
    """One turn of ``request`` on a server: gRPC through ``channel``; REST through ``wrk``
    when given (in a thread), else asyncio keep-alive connections."""
    if request.transport == "grpc":
        if channel is None:
            raise ValueError("a gRPC request needs a channel")
        return await grpc_load(
            channel, request.target, request.body, concurrency, budget, server_pid
        )
    if wrk is not None:
        return await asyncio.to_thread(
            wrk_load,
            wrk,
            work,
            rest_port,
            request.target,
            request.body,
            concurrency,
            budget,
            server_pid,
            headers=request.headers,
        )
    return await rest_load(
        rest_port, request.target, request.body, concurrency, budget, server_pid, request.headers
    )


# -- open loop (rate-limited) ----------------------------------------------------------------


async def paced(
    rate: float,
    seconds: float,
    send: Callable[[float], Awaitable[None]],
    max_in_flight: int,
    on_skip: Callable[[float], None],
    drain: float = 15.0,
) -> None:
    """Open loop: start ``send(intended)`` ``rate`` times a second for ``seconds``, on a
    schedule that does not wait for answers, so a server that stalls cannot slow the client
    down and hide it. ``intended`` is the perf_counter time each start was due (the loop
    starts them in ticks of a few ms, so a send starts up to a tick late). A start due while
    ``max_in_flight`` sends are unanswered is skipped (``on_skip(intended)``). Sends still
    running ``drain`` seconds after the end are cancelled."""
    start = time.perf_counter()
    end = start + seconds
    issued = 0
    running: set[asyncio.Future[None]] = set()
    while (now := time.perf_counter()) < end:
        due = int((now - start) * rate)
        while issued < due:
            issued += 1
            intended = start + issued / rate
            if len(running) >= max_in_flight:
                on_skip(intended)
                continue
            task = asyncio.ensure_future(send(intended))
            running.add(task)
            task.add_done_callback(running.discard)
        # starts due within a tick go out together: one wake-up per tick, not per request
        await asyncio.sleep(0.005)
    if running:
        _, late = await asyncio.wait(set(running), timeout=drain)
        for pending in late:
            pending.cancel()


class RestPool:
    """``size`` keep-alive HTTP/1.1 connections to one loopback port, opened up front and
    used in turn (so none idles long enough for the server to close it), each carrying one
    request at a time; a request waits for a free one. A connection that fails or times out
    is replaced."""

    def __init__(self, port: int, size: int) -> None:
        self.port = port
        self.size = size
        self.idle: collections.deque[HttpConnection] = collections.deque()
        self.slots = asyncio.Semaphore(size)

    async def open(self) -> None:
        while len(self.idle) < self.size:
            self.idle.append(await connect(self.port))

    async def post(self, data: bytes, timeout: float) -> int:
        """Send a whole request's bytes (http_request); the answer's HTTP status."""
        async with self.slots:
            conn = self.idle.popleft() if self.idle else None
            if conn is None or conn.transport is None or conn.transport.is_closing():
                conn = await asyncio.wait_for(connect(self.port), timeout)
            try:
                status = await asyncio.wait_for(conn.request(data), timeout)
            except BaseException:
                if conn.transport is not None:
                    conn.transport.close()
                raise
            self.idle.append(conn)
            return status

    def close(self) -> None:
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()
        self.idle.clear()

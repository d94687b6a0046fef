"""Soak test of one propserve server: steady prediction load, training, saves and label
moves for a while, reported interval by interval, with a verdict per target.

    .venv/bin/python bench/soak.py                                  # 10 minutes
    .venv/bin/python bench/soak.py --minutes 1 --interval-seconds 15  # a short check
    .venv/bin/python bench/soak.py --json                           # one JSON object per line

It starts the server (``python -m propserve serve``, a temporary store, loopback ports) with
two models of architecture A = [784, 512, 256, 10] float32: ``serve`` answers predictions,
``learn`` trains. Then, all at once:

- training: one gRPC Train stream on ``learn`` through the client, batches of 32 rows at a
  steady pace (--train-steps-per-s), a version saved every 100 steps (SaveVersion), and
  every 30 s the label ``stable`` moved to the newest version (SetLabel);
- a probe: once a second, a prediction from ``learn`` by the label ``stable``, which must
  answer from the labelled version (or the one it replaced, while a move is in flight);
- predictions: single rows of ``serve`` over REST (base64 bodies, asyncio keep-alive
  connections) and gRPC (pre-serialized PredictRequests on one grpc.aio channel), each
  paced at a fixed rate, open loop: requests go out on schedule whether or not the earlier
  ones were answered (at most MAX_IN_FLIGHT unanswered per transport: a request due
  beyond that is skipped and counted as an error, "client backlog full"). Latency counts
  from when the client started each request; how late it started them (its lag) and its
  own CPU are reported beside it.

The rate comes from a short ramp run first, with the training already going: the soak's
mix (the same rate on both transports, at once) in open-loop steps at rising rates, until
a step falls behind or queues; the peak is the last rate both kept up with, and the soak
sends ``--load`` x peak on each. (One process serves both transports, so their costs do not
simply add up: the peak is measured on the mix itself.) A few seconds at the soak's rates,
off the record, separate the ramp's last (overloaded) step from the first interval.

Every interval (a minute by default) it reports requests and p50/p99 latency per transport,
errors by code, training steps, saves and label moves, and the server's resident memory,
open file descriptors and CPU. Targets, judged at the end:

- errors: none, of any code, on any path;
- latency: no upward trend; for each transport, the median p50 of the last third of the
  intervals <= 1.25x that of the first third, and the same for p99 within 1.5x (the first
  interval, a warm-up, left out; needs 3 intervals after it);
- memory: the server's RSS in every later interval <= 1.10x in the first (each interval's
  median of samples every SAMPLE_EVERY_S);
- file descriptors: flat, each later interval's median at most FD_SLACK above the first's.

It exits 1 when a target is missed. Every loop is bounded in time, every request has a
deadline, and the server is stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from numpy.typing import NDArray

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import load, procs, report
from bench.common import BLAS_THREADS, DIMS_A, SPEC_A
from bench.payloads import PREDICT_METHOD, make_payloads, predict_path
from propserve.clients import AsyncGrpcClient, ClientError, RetryPolicy

SERVE = "serve"
LEARN = "learn"
LABEL = "stable"
TRANSPORTS = ("rest", "grpc")
TRAIN_BATCH = 32
SAVE_EVERY = 100
LABEL_EVERY_S = 30.0
PROBE_EVERY_S = 1.0
SAMPLE_EVERY_S = 5.0
REQUEST_TIMEOUT_S = 10.0
#: The ramp's open-loop steps: from RAMP_START requests/s on each transport, RAMP_FACTOR
#: higher each step, until a step falls behind or queues, or RAMP_LIMIT.
RAMP_START = 50.0
RAMP_FACTOR = 1.5
RAMP_LIMIT = 50_000.0
RAMP_STEP_S = 1.5
RAMP_P50_LIMIT_S = 0.005
#: An upper bound of the ramp's length (its steps are bounded by RAMP_LIMIT).
RAMP_BOUND_S = 300.0
#: Seconds at the soak's rates between the ramp and the soak's first interval.
SETTLE_S = 5.0
MAX_IN_FLIGHT = 256
REST_CONNECTIONS = 16
TREND_LIMIT = {"p50": 1.25, "p99": 1.5}
RSS_LIMIT = 0.10
FD_SLACK = 8


# -- what each interval saw ------------------------------------------------------------------


@dataclass
class Interval:
    """What happened between two interval boundaries (from the soak's start)."""

    latencies: dict[str, list[float]] = field(default_factory=dict)  # by transport
    errors: Counter[str] = field(default_factory=Counter)  # "path: code"
    train_steps: int = 0
    saves: int = 0
    label_moves: int = 0
    probes: int = 0
    rss_kib: list[int] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    lags: list[float] = field(default_factory=list)
    full_collections: int = 0  # the server's collector, generation 2
    slow_collections: int = 0  # of them, over 10 ms
    calibrations: list[float] = field(default_factory=list)  # seconds of a fixed task


@dataclass(frozen=True)
class Sent:
    """When a paced request was due, and when this client got to start it."""

    intended: float
    started: float


class Recorder:
    """Events of the soak, filed by the interval they happened in (those before the start,
    during the ramp, are dropped)."""

    def __init__(self, start: float, interval_s: float, count: int) -> None:
        self.start = start
        self.interval_s = interval_s
        self.intervals = [Interval() for _ in range(count)]

    def at(self, when: float) -> Interval | None:
        index = int((when - self.start) // self.interval_s)
        if index < 0:
            return None
        return self.intervals[min(index, len(self.intervals) - 1)]

    def outcome(self, transport: str, sent: Sent, code: str | None) -> None:
        """A prediction's latency, or its error ``code``."""
        if (interval := self.at(sent.started)) is None:
            return
        interval.lags.append(sent.started - sent.intended)
        if code is not None:
            interval.errors[f"{transport}: {code}"] += 1
        else:
            interval.latencies.setdefault(transport, []).append(time.perf_counter() - sent.started)

    def error(self, path: str, code: str, when: float | None = None) -> None:
        if (interval := self.at(time.perf_counter() if when is None else when)) is not None:
            interval.errors[f"{path}: {code}"] += 1

    def now(self) -> Interval | None:
        return self.at(time.perf_counter())


def error_code(exc: BaseException) -> str:
    """A short code for a failed call: the gRPC status, the client's code, or the kind."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code().name
    if isinstance(exc, ClientError):
        return exc.code.name
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError):
        return "connection"
    return type(exc).__name__


# -- the load ----------------------------------------------------------------------------------


@dataclass
class Soak:
    """The running soak: the server, its clients and what they have done."""

    server: procs.Child
    recorder: Recorder
    end: float
    versions: list[int] = field(default_factory=list)
    #: the versions the label was moved to, the newest while its move is in flight too
    labelled: list[int] = field(default_factory=list)
    label_set: bool = False
    background: set[asyncio.Future[Any]] = field(default_factory=set)

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self.background.add(task)
        task.add_done_callback(self.background.discard)


def train_data(count: int) -> list[tuple[NDArray[np.float32], NDArray[np.int64]]]:
    rng = np.random.default_rng(11)
    return [
        (
            rng.standard_normal((TRAIN_BATCH, DIMS_A[0]), dtype=np.float32),
            rng.integers(0, DIMS_A[-1], TRAIN_BATCH, dtype=np.int64),
        )
        for _ in range(count)
    ]


async def train(soak: Soak, client: AsyncGrpcClient, steps_per_s: float) -> None:
    """One Train stream at a steady pace until the end, a save every SAVE_EVERY batches;
    a stream that fails is counted and opened again."""
    data = train_data(50)
    sent = 0

    async def batches() -> AsyncIterator[tuple[NDArray[np.float32], NDArray[np.int64]]]:
        nonlocal sent
        start = time.perf_counter()
        count = 0
        while time.perf_counter() < soak.end:
            count += 1
            delay = start + count / steps_per_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            yield data[sent % len(data)]
            sent += 1
            if (interval := soak.recorder.now()) is not None:
                interval.train_steps += 1
            if sent % SAVE_EVERY == 0:
                soak.spawn(save(soak, client))

    while time.perf_counter() < soak.end:
        try:
            await client.train(LEARN, batches())
        except Exception as exc:
            soak.recorder.error("train", error_code(exc))
            await asyncio.sleep(1.0)


async def save(soak: Soak, client: AsyncGrpcClient) -> None:
    try:
        version = await client.save_version(LEARN)
    except Exception as exc:
        soak.recorder.error("save", error_code(exc))
        return
    soak.versions.append(version.version)
    if (interval := soak.recorder.now()) is not None:
        interval.saves += 1


async def move_labels(soak: Soak, client: AsyncGrpcClient) -> None:
    """Every LABEL_EVERY_S, the label to the newest saved version (when it is new)."""
    while (delay := min(LABEL_EVERY_S, soak.end - time.perf_counter())) > 0:
        await asyncio.sleep(delay)
        if not soak.versions or soak.labelled[-1:] == soak.versions[-1:]:
            continue
        newest = soak.versions[-1]
        # listed before the call, so that a probe answered by it meanwhile is not flagged
        soak.labelled.append(newest)
        try:
            await client.set_label(LEARN, LABEL, newest)
        except Exception as exc:
            soak.labelled.pop()
            soak.recorder.error("label", error_code(exc))
            continue
        soak.label_set = True
        if (interval := soak.recorder.now()) is not None:
            interval.label_moves += 1


async def probe(soak: Soak, client: AsyncGrpcClient) -> None:
    """Once a second, a prediction by the label, which must come from the labelled version
    or the one before it (a move may land while the probe is in flight)."""
    x = np.random.default_rng(3).standard_normal((1, DIMS_A[0]), dtype=np.float32)
    while time.perf_counter() < soak.end:
        await asyncio.sleep(PROBE_EVERY_S)
        if not soak.label_set:
            continue
        try:
            prediction = await client.predict(LEARN, x, label=LABEL)
        except Exception as exc:
            soak.recorder.error("probe", error_code(exc))
            continue
        if prediction.version not in soak.labelled[-2:]:
            soak.recorder.error("probe", f"version {prediction.version} not labelled")
        if (interval := soak.recorder.now()) is not None:
            interval.probes += 1


async def watch(soak: Soak) -> None:
    """The server's RSS, open fds, CPU and full collections every SAMPLE_EVERY_S."""
    pid = soak.server.pid
    port = soak.server.ports["rest_port"]
    last, last_cpu, last_own = time.perf_counter(), procs.cpu_seconds(pid), time.process_time()
    last_gc = await asyncio.to_thread(_full_collections, port)
    while True:
        now, cpu, own = time.perf_counter(), procs.cpu_seconds(pid), time.process_time()
        gc_now = await asyncio.to_thread(_full_collections, port)
        # filed by the middle of the period sampled, so each interval gets its own CPU time
        if (interval := soak.recorder.at((last + now) / 2)) is not None:
            interval.server_cpu_s += cpu - last_cpu
            interval.client_cpu_s += own - last_own
            interval.rss_kib.append(procs.rss_kib(pid))
            interval.fds.append(procs.open_fds(pid))
            interval.full_collections += gc_now[0] - last_gc[0]
            interval.slow_collections += gc_now[1] - last_gc[1]
            interval.calibrations.append(calibrate())
        last, last_cpu, last_own, last_gc = now, cpu, own, gc_now
        if now >= soak.end:
            return
        await asyncio.sleep(min(SAMPLE_EVERY_S, max(soak.end - now, 0.0) + 0.01))


def calibrate() -> float:
    """Seconds this process takes for a fixed bit of Python and NumPy work: the host's own
    speed, which drifts on a shared machine (a slower host makes the same load heavier)."""
    start = time.perf_counter()
    total = 0
    for i in range(20_000):
        total += i % 7
    np.sort(np.random.default_rng(total).standard_normal(20_000))
    return time.perf_counter() - start


def _full_collections(port: int) -> tuple[int, int]:
    """The server's generation-2 collections so far, and how many took over 10 ms."""
    runs, _, slow = procs.gc_pauses(procs.scrape(port)).get("2", (0, 0.0, 0))
    return runs, slow


class Predictions:
    """Single-row predictions of ``serve``, one call at a time: REST (base64 body) over a
    pool of keep-alive connections, gRPC (pre-serialized) over one channel."""

    def __init__(self, server: procs.Child, channel: grpc.aio.Channel) -> None:
        payload = make_payloads(SERVE, 1)
        port = server.ports["rest_port"]
        self.pool = load.RestPool(port, REST_CONNECTIONS)
        self.rest_request = load.http_request(port, predict_path(SERVE), payload.rest_b64)
        self.grpc_request = payload.grpc
        self.stub: Any = channel.unary_unary(PREDICT_METHOD)

    async def call(self, transport: str) -> str | None:
        """One prediction; None when it succeeded, else its error code."""
        try:
            if transport == "grpc":
                await self.stub(self.grpc_request, timeout=REQUEST_TIMEOUT_S)
                return None
            status = await self.pool.post(self.rest_request, REQUEST_TIMEOUT_S)
        except Exception as exc:
            return error_code(exc)
        return None if status == 200 else f"HTTP {status}"

    async def paced(
        self,
        transport: str,
        rate: float,
        seconds: float,
        outcome: Callable[[Sent, str | None], None],
    ) -> None:
        """Calls at ``rate`` for ``seconds``, open loop (load.paced); each one's outcome
        reported as ``outcome(when it was due and started, None or its error code)``."""

        async def send(intended: float) -> None:
            sent = Sent(intended, time.perf_counter())
            outcome(sent, await self.call(transport))

        def skipped(intended: float) -> None:
            outcome(Sent(intended, intended), "client backlog full")

        await load.paced(rate, seconds, send, MAX_IN_FLIGHT, skipped)

    def close(self) -> None:
        self.pool.close()


async def predictions(soak: Soak, clients: Predictions, rates: dict[str, float]) -> None:
    """Both transports, each at its rate, until the end."""
    recorder = soak.recorder
    seconds = soak.end - time.perf_counter()
    await asyncio.gather(
        *(
            clients.paced(
                transport, rates[transport], seconds, functools.partial(recorder.outcome, transport)
            )
            for transport in TRANSPORTS
        )
    )


def ignore(sent: Sent, code: str | None) -> None:
    """An outcome not recorded."""


async def ramp(clients: Predictions) -> tuple[float, list[dict[str, Any]]]:
    """The peak rate per transport of the soak's mix (the same rate on both, at once): the
    highest of open-loop steps at rising rates that both transports kept up with (no request
    skipped, 90% served within the step) without queueing (p50 within RAMP_P50_LIMIT_S); and
    the steps. The p99 is reported, not judged: a single save or collection moves it."""
    latencies: dict[str, list[float]] = {t: [] for t in TRANSPORTS}
    failures: list[str] = []

    def outcome(transport: str, sent: Sent, code: str | None) -> None:
        if code is None:
            latencies[transport].append(time.perf_counter() - sent.started)
        else:
            failures.append(code)

    rate, best = RAMP_START, 0.0
    steps: list[dict[str, Any]] = []
    while rate <= RAMP_LIMIT:
        for values in latencies.values():
            values.clear()
        failures.clear()
        start = time.perf_counter()
        await asyncio.gather(
            *(
                clients.paced(t, rate, RAMP_STEP_S, functools.partial(outcome, t))
                for t in TRANSPORTS
            )
        )
        elapsed = time.perf_counter() - start
        if failures and "client backlog full" not in failures:
            raise RuntimeError(f"failures in the ramp: {Counter(failures)}")
        step: dict[str, Any] = {"rate": rate, "skipped": len(failures)}
        kept_up = not failures
        for t, values in latencies.items():
            p50, p99 = _percentile(values, 0.5), _percentile(values, 0.99)
            step[t] = {"throughput": len(values) / elapsed, "p50_s": p50, "p99_s": p99}
            kept_up = kept_up and len(values) / elapsed >= 0.9 * rate
            kept_up = kept_up and p50 is not None and p50 <= RAMP_P50_LIMIT_S
        steps.append(step)
        if not kept_up:
            break
        best = rate
        rate *= RAMP_FACTOR
    return best, steps


async def soak_test(
    args: argparse.Namespace, work: Path
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    seconds = args.minutes * 60
    count = max(1, int(-(-seconds // args.interval_seconds)))
    server = procs.start_server(work, BLAS_THREADS)
    channel = load.grpc_channel(server.ports["grpc_port"])
    # No retries: the soak counts every failure, and a retry would hide one.
    client = AsyncGrpcClient(
        f"127.0.0.1:{server.ports['grpc_port']}",
        timeout=REQUEST_TIMEOUT_S,
        retry=RetryPolicy(attempts=1),
    )
    soak: Soak | None = None
    clients: Predictions | None = None
    try:
        await client.create_model(SERVE, SPEC_A)
        await client.create_model(LEARN, SPEC_A)
        await asyncio.wait_for(channel.channel_ready(), 10)
        # The ramp runs with the training going, so the peaks leave room for it; the soak's
        # clock (and so its intervals) starts after the ramp.
        recorder = Recorder(time.perf_counter() + 1e9, args.interval_seconds, count)
        # The training runs until the soak's end, which is set once the ramp is over.
        soak = Soak(server, recorder, end=time.perf_counter() + RAMP_BOUND_S + seconds)
        soak.spawn(train(soak, client, args.train_steps_per_s))
        await asyncio.sleep(1.0)
        clients = Predictions(server, channel)
        await clients.pool.open()
        peak, steps = await ramp(clients)
        if not peak:
            raise RuntimeError(f"the server did not keep up with the ramp's first step: {steps}")
        rates = {t: args.load * peak for t in TRANSPORTS}
        # The ramp ends overloaded; the backlog drains at the soak's rates, off the record.
        await asyncio.gather(*(clients.paced(t, rates[t], SETTLE_S, ignore) for t in TRANSPORTS))
        recorder.start = time.perf_counter()
        soak.end = recorder.start + seconds
        soak.spawn(move_labels(soak, client))
        soak.spawn(probe(soak, client))
        soak.spawn(watch(soak))
        await predictions(soak, clients, rates)
        if soak.background:
            await asyncio.wait(set(soak.background), timeout=30)
    finally:
        if soak is not None:
            for task in soak.background:
                task.cancel()
        if clients is not None:
            clients.close()
        await channel.close()
        await client.close()
        server.stop()
    info = report.machine()
    info.update(
        server_pid=server.pid,
        minutes=args.minutes,
        interval_s=args.interval_seconds,
        load=args.load,
        peak=peak,
        ramp=steps,
        rates=rates,
        train_steps_per_s=args.train_steps_per_s,
        train_batch=TRAIN_BATCH,
        versions_saved=len(soak.versions) if soak else 0,
    )
    rows = interval_rows(recorder)
    return info, rows, verdicts(rows)


# -- the figures ---------------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _median(values: list[int] | list[float]) -> float | None:
    return statistics.median(values) if values else None


def interval_rows(recorder: Recorder) -> list[dict[str, Any]]:
    rows = []
    for index, interval in enumerate(recorder.intervals):
        r: dict[str, Any] = {"interval": index + 1}
        for transport in TRANSPORTS:
            latencies = interval.latencies.get(transport, [])
            r[transport] = {
                "requests": len(latencies),
                "throughput": len(latencies) / recorder.interval_s,
                "p50_s": _percentile(latencies, 0.5),
                "p99_s": _percentile(latencies, 0.99),
            }
        r.update(
            errors=dict(interval.errors),
            train_steps=interval.train_steps,
            saves=interval.saves,
            label_moves=interval.label_moves,
            probes=interval.probes,
            rss_kib=_median(interval.rss_kib),
            rss_max_kib=max(interval.rss_kib, default=None),
            fds=_median(interval.fds),
            fds_max=max(interval.fds, default=None),
            server_cpu=interval.server_cpu_s / recorder.interval_s,
            client_cpu=interval.client_cpu_s / recorder.interval_s,
            client_lag_p99_s=_percentile(interval.lags, 0.99),
            full_collections=interval.full_collections,
            slow_collections=interval.slow_collections,
            calibration_s=_median(interval.calibrations),
        )
        rows.append(r)
    return rows


def _verdict(target: str, value: Any, unit: str, met: bool | None) -> dict[str, Any]:
    """A target's verdict: ``value`` in ``unit`` (errors, ratio, fraction, count); ``met``
    None where the run was too short to judge."""
    return {"target": target, "value": value, "unit": unit, "met": met}


def verdicts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    errors: Counter[str] = Counter()
    for r in rows:
        errors.update(r["errors"])
    out.append(_verdict("errors: none", dict(errors), "errors", not errors))
    later = rows[1:]
    third = len(later) // 3
    for transport in TRANSPORTS:
        for q in ("p50", "p99"):
            limit = TREND_LIMIT[q]
            target = f"{transport} {q}: last third <= {limit}x first third"
            values = [r[transport][f"{q}_s"] for r in later]
            if third == 0 or None in values:
                out.append(_verdict(target, None, "ratio", None))
                continue
            ratio = statistics.median(values[-third:]) / statistics.median(values[:third])
            out.append(_verdict(target, ratio, "ratio", ratio <= limit))
    # medians of each interval's samples: one sample taken mid-burst does not decide
    rss_target = f"RSS growth after the first interval <= {RSS_LIMIT:.0%}"
    fds_target = f"open fds flat (<= +{FD_SLACK})"
    first_rss, first_fds = rows[0]["rss_kib"], rows[0]["fds"]
    if not later or not first_rss or first_fds is None:
        out.append(_verdict(rss_target, None, "fraction", None))
        out.append(_verdict(fds_target, None, "count", None))
        return out
    growth = max(r["rss_kib"] for r in later) / first_rss - 1
    out.append(_verdict(rss_target, growth, "fraction", growth <= RSS_LIMIT))
    extra = max(r["fds"] for r in later) - first_fds
    out.append(_verdict(fds_target, extra, "count", extra <= FD_SLACK))
    return out


def _errors(r: dict[str, Any]) -> str:
    return ", ".join(f"{code} x{n}" for code, n in sorted(r["errors"].items())) or "0"


COLUMNS = [
    report.Column("int", 3, report.cell_of("interval")),
    report.Column("rest/s", 7, report.cell_in("rest", "throughput", report.rate)),
    report.Column("p50 ms", 7, report.cell_in("rest", "p50_s", report.ms)),
    report.Column("p99 ms", 7, report.cell_in("rest", "p99_s", report.ms)),
    report.Column("grpc/s", 7, report.cell_in("grpc", "throughput", report.rate)),
    report.Column("p50 ms", 7, report.cell_in("grpc", "p50_s", report.ms)),
    report.Column("p99 ms", 7, report.cell_in("grpc", "p99_s", report.ms)),
    report.Column("steps", 6, report.cell_of("train_steps")),
    report.Column("saves", 5, report.cell_of("saves")),
    report.Column("labels", 6, report.cell_of("label_moves")),
    report.Column("RSS MiB", 7, report.cell_of("rss_kib", lambda v: f"{v / 1024:.1f}")),
    report.Column("fds", 4, report.cell_of("fds", lambda v: f"{v:.0f}")),
    report.Column("srv cpu", 7, report.cell_of("server_cpu", lambda v: f"{v:.2f}")),
    report.Column("cli cpu", 7, report.cell_of("client_cpu", lambda v: f"{v:.2f}")),
    report.Column("lag p99", 7, report.cell_of("client_lag_p99_s", report.ms)),
    report.Column("gc2", 4, report.cell_of("full_collections")),
    report.Column(">10ms", 5, report.cell_of("slow_collections")),
    report.Column("host", 5, report.cell_of("calibration_s", lambda v: f"{v * 1e3:.1f}")),
    report.Column("errors", 0, _errors, left=True),
]


def _value(v: dict[str, Any]) -> str:
    value = v["value"]
    if value is None:
        return "-"
    if v["unit"] == "errors":
        return ", ".join(f"{code} x{n}" for code, n in sorted(value.items())) if value else "0"
    if v["unit"] == "fraction":
        return report.percent(value)
    if v["unit"] == "count":
        return f"{value:+g}"
    return report.ratio(value)


def print_results(
    info: dict[str, Any], rows: list[dict[str, Any]], judged: list[dict[str, Any]]
) -> None:
    print(report.machine_line(info))
    rates = ", ".join(f"{t} {report.rate(r)}/s" for t, r in info["rates"].items())
    print(
        f"server pid {info['server_pid']}; ramp peak {report.rate(info['peak'])}/s per "
        f"transport; soak rates {rates} (load {info['load']:g}); training "
        f"{info['train_steps_per_s']:g} steps/s of {info['train_batch']} rows; "
        f"{info['minutes']:g} min in intervals of {info['interval_s']:g} s"
    )
    print("ramp (offered req/s per transport: p50/p99 ms of rest, grpc):")
    for st in info["ramp"]:
        shown = ", ".join(
            f"{t} {report.ms(st[t]['p50_s'])}/{report.ms(st[t]['p99_s'])}" for t in TRANSPORTS
        )
        skipped = f", {st['skipped']} skipped" if st["skipped"] else ""
        print(f"  {report.rate(st['rate'])}: {shown}{skipped}")
    report.print_table(COLUMNS, rows)
    print(
        "(latency from when this client started each request; lag: how late it started them,"
        " in ms;\n cpu: cores busy, the server's and this client's; gc2: the server's full"
        " collections, >10ms: of them\n over 10 ms; host: ms this client takes for a fixed"
        " task, the host's own speed)"
    )
    for v in judged:
        met = "n/a (run too short)" if v["met"] is None else report.verdict(v["met"])
        print(f"{v['target']}: {_value(v)} -> {met}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="soak length (default 10)")
    parser.add_argument(
        "--interval-seconds", type=float, default=60.0, help="report interval (default 60)"
    )
    parser.add_argument(
        "--load", type=float, default=0.8, help="fraction of the ramp's peak (default 0.8)"
    )
    parser.add_argument(
        "--train-steps-per-s", type=float, default=10.0, help="training pace (default 10)"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.interval_seconds <= 0 or not 0 < args.load <= 1:
        parser.error("--minutes and --interval-seconds must be > 0, --load in (0, 1]")
    import uvloop  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="propserve-soak-") as tmp:
        info, rows, judged = uvloop.run(soak_test(args, Path(tmp)))
    if args.json:
        report.print_json_lines(info, [*rows, *({"verdict": v} for v in judged)])
    else:
        print_results(info, rows, judged)
    return 0 if all(v["met"] is not False for v in judged) else 1


if __name__ == "__main__":
    sys.exit(main())

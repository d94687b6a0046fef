"""Prometheus metrics, on a registry of the server's own (so tests can run many servers).

The four families touched by every prediction (requests, request latency, rows predicted,
rows per forward pass) are plain numbers here, rendered at scrape time: prometheus_client's
Counter and Histogram cost a noticeable share of a single-row prediction (locks, checks, and
a histogram's linear walk over its buckets in Python; see docs/performance.md#metrics). The
rest, updated once per training step or save, use prometheus_client.
"""

from __future__ import annotations

import contextlib
import threading
import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (
    0.0002,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
)
BATCH_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
GC_PAUSE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
REPLICA_LAG_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0, 10.0, 30.0)


class _Histogram:
    """Counts per bucket of ``bounds`` (the last one +Inf) and the sum of the values seen."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bound >= value
        self.total += value


class _HotFamilies(Collector):
    """Per-request counters and histograms as plain numbers under one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str, str, str], int] = {}
        self.latency: dict[tuple[str, str, str], _Histogram] = {}
        self.predictions: dict[str, int] = {}
        self.batch_rows: dict[str, _Histogram] = {}

    def collect(self) -> Iterator[Metric]:
        with self.lock:
            requests = dict(self.requests)
            latency = {k: (list(h.counts), h.total) for k, h in self.latency.items()}
            predictions = dict(self.predictions)
            batch_rows = {k: (list(h.counts), h.total) for k, h in self.batch_rows.items()}
        family = CounterMetricFamily(
            "propserve_requests",
            "Requests answered.",
            labels=["method", "transport", "protocol", "code"],
        )
        for labels, count in requests.items():
            family.add_metric(labels, count)
        yield family
        yield _histogram(
            "propserve_request_seconds",
            "Time to answer a request.",
            ["method", "transport", "protocol"],
            LATENCY_BUCKETS,
            latency,
        )
        family = CounterMetricFamily("propserve_predictions", "Rows predicted.", labels=["model"])
        for model, rows in predictions.items():
            family.add_metric([model], rows)
        yield family
        yield _histogram(
            "propserve_predict_batch_rows",
            "Rows per forward pass of batched predictions.",
            ["model"],
            BATCH_ROWS_BUCKETS,
            {(model,): value for model, value in batch_rows.items()},
        )


def _le(bound: float) -> str:
    """A bucket's ``le`` label, written as prometheus_client writes it."""
    text: str = floatToGoString(bound)  # type: ignore[no-untyped-call]
    return text


def _histogram(
    name: str,
    documentation: str,
    labels: list[str],
    bounds: Sequence[float],
    values: dict[Any, tuple[list[int], float]],
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=labels)
    edges = [_le(b) for b in bounds] + ["+Inf"]
    for key, (counts, total) in values.items():
        cumulative, running = [], 0
        for edge, count in zip(edges, counts, strict=True):
            running += count
            cumulative.append((edge, running))
        family.add_metric(list(key), cumulative, total)
    return family


class _CollectorPauses(Collector):
    """How long each run of Python's cyclic garbage collector took, by generation.

    NOTE: no lock here, on purpose. A collection starts inside whatever allocation set it
    off, also one made while its thread holds a lock, and prometheus_client's locks are not
    reentrant: a callback that took one could wait for itself. Collections never overlap
    and run with the GIL held, and a callback only updates a list's ints and a float; a
    scrape may read one pause half-recorded.
    """

    def __init__(self) -> None:
        self.generations = [_Histogram(GC_PAUSE_BUCKETS) for _ in range(3)]
        self._started = 0.0

    def callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.generations[info["generation"]].observe(time.perf_counter() - self._started)

    def collect(self) -> Iterator[Metric]:
        yield _histogram(
            "propserve_gc_pause_seconds",
            "Runs of Python's cyclic garbage collector by generation, and how long each held "
            "the interpreter (every thread's Python code waits meanwhile). Generation 2 "
            "includes the full collection after each burst (see propserve_heap_trims).",
            ["generation"],
            GC_PAUSE_BUCKETS,
            {
                (str(generation),): (list(h.counts), h.total)
                for generation, h in enumerate(self.generations)
                if any(h.counts)
            },
        )


class Metrics:
    """Requests by method, transport and code; latencies; predictions and training samples;
    step, last loss and versions per model; the garbage collector's pauses."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._hot = _HotFamilies()
        r.register(self._hot)
        self.training_samples = Counter(
            "propserve_training_samples", "Rows trained on.", ["model"], registry=r
        )
        self.training_steps = Counter(
            "propserve_training_steps", "Training steps applied.", ["model"], registry=r
        )
        self.refused_steps = Counter(
            "propserve_refused_steps", "Training steps refused as diverging.", ["model"], registry=r
        )
        self.step = Gauge(
            "propserve_model_step", "Training steps of the model's head.", ["model"], registry=r
        )
        self.last_loss = Gauge(
            "propserve_model_last_loss", "Loss of the last training step.", ["model"], registry=r
        )
        #: API requests answered, on both transports (a cheap sign of activity); scrapes,
        #: health probes and other paths are not a burst to trim memory after.
        self.answered = 0
        self.heap_trims = Counter(
            "propserve_heap_trims",
            "Times the server handed freed heap memory back to the system after a burst.",
            registry=r,
        )
        self.versions = Gauge(
            "propserve_model_versions", "Saved versions on disk.", ["model"], registry=r
        )
        # A read-only replica's (propserve.service.replica).
        self.replica_lag = Histogram(
            "propserve_replica_lag_seconds",
            "From a version or label change written to the store to this replica serving it.",
            buckets=REPLICA_LAG_BUCKETS,
            registry=r,
        )
        self.replica_versions = Gauge(
            "propserve_replica_versions_loaded",
            "Saved versions a replica holds in memory to serve (the newest and labelled ones).",
            registry=r,
        )
        self.follow_errors = Counter(
            "propserve_replica_follow_errors",
            "Versions a replica refused (failed verification) and store reads that failed.",
            registry=r,
        )
        self._gc = _CollectorPauses()
        r.register(self._gc)

    def gc_callback(self, phase: str, info: dict[str, Any]) -> None:
        """For ``gc.callbacks``: times each run of the cyclic garbage collector."""
        self._gc.callback(phase, info)

    def observe(
        self,
        method: str,
        transport: str,
        code: str,
        seconds: float,
        *,
        protocol: str = "propserve",
        api: bool = True,
    ) -> None:
        """A request answered; ``protocol``: propserve's own API or ``oip`` (the Open
        Inference Protocol); ``api``: a call of an API (not a probe, a scrape, the
        documentation or an unknown path), which counts in ``answered``."""
        hot = self._hot
        with hot.lock:
            if api:
                self.answered += 1
            key = (method, transport, protocol, code)
            hot.requests[key] = hot.requests.get(key, 0) + 1
            histogram = hot.latency.get(key[:3])
            if histogram is None:
                histogram = hot.latency[key[:3]] = _Histogram(LATENCY_BUCKETS)
            histogram.observe(seconds)

    def predicted(self, model: str, rows: int, batch_rows: int) -> None:
        """``rows`` answered by one forward pass over ``batch_rows``."""
        hot = self._hot
        with hot.lock:
            hot.predictions[model] = hot.predictions.get(model, 0) + rows
            histogram = hot.batch_rows.get(model)
            if histogram is None:
                histogram = hot.batch_rows[model] = _Histogram(BATCH_ROWS_BUCKETS)
            histogram.observe(batch_rows)

    def forget_model(self, name: str) -> None:
        with self._hot.lock:
            self._hot.predictions.pop(name, None)
            self._hot.batch_rows.pop(name, None)
        for family in (
            self.training_samples,
            self.training_steps,
            self.refused_steps,
            self.step,
            self.last_loss,
            self.versions,
        ):
            with contextlib.suppress(KeyError):
                family.remove(name)

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""Prometheus metrics, on a registry of the server's own (so tests can run many servers)."""

from __future__ import annotations

import contextlib
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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


class Metrics:
    """Requests by method, transport and code; latencies; predictions and training samples;
    step, last loss and versions per model."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "propserve_requests", "Requests answered.", ["method", "transport", "code"], registry=r
        )
        self.latency = Histogram(
            "propserve_request_seconds",
            "Time to answer a request.",
            ["method", "transport"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.predictions = Counter(
            "propserve_predictions", "Rows predicted.", ["model"], registry=r
        )
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
        self.batch_rows = Histogram(
            "propserve_predict_batch_rows",
            "Rows per forward pass of batched predictions.",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
            registry=r,
        )
        self._request_children: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        #: Requests answered, on both transports (a cheap sign of activity).
        self.answered = 0
        self._prediction_children: dict[str, tuple[Any, Any]] = {}
        self.versions = Gauge(
            "propserve_model_versions", "Saved versions on disk.", ["model"], registry=r
        )

    def observe(self, method: str, transport: str, code: str, seconds: float) -> None:
        # NOTE: labels() costs a few microseconds per call (a lock and a dict lookup); the
        # labelled children are cached here, once per (method, transport, code).
        self.answered += 1
        key = (method, transport, code)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self.requests.labels(method, transport, code),
                self.latency.labels(method, transport),
            )
        children[0].inc()
        children[1].observe(seconds)

    def predicted(self, model: str, rows: int, batch_rows: int) -> None:
        """``rows`` answered by one forward pass over ``batch_rows``."""
        children = self._prediction_children.get(model)
        if children is None:
            children = self._prediction_children[model] = (
                self.predictions.labels(model),
                self.batch_rows.labels(model),
            )
        children[0].inc(rows)
        children[1].observe(batch_rows)

    def forget_model(self, name: str) -> None:
        self._prediction_children.pop(name, None)
        for family in (
            self.predictions,
            self.batch_rows,
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

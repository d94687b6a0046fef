"""service.metrics: the per-request families, kept as plain numbers, render exactly as
prometheus_client's own Counter and Histogram render the same observations."""

from __future__ import annotations

import gc
import random
import re
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from propserve.service.metrics import BATCH_ROWS_BUCKETS, LATENCY_BUCKETS, Metrics
from tests.service.test_dataplane import passes

OBSERVATIONS = 400


def observations(seed: int) -> list[tuple[str, str, str, float, str, int, int]]:
    r = random.Random(seed)
    out = []
    for _ in range(OBSERVATIONS):
        seconds = r.choice([*LATENCY_BUCKETS, 0.0, 1e-5, 0.00021, 11.0, r.random()])
        out.append(
            (
                r.choice(["Predict", "TrainStep", "Train"]),
                r.choice(["rest", "grpc"]),
                r.choice(["200", "OK", "400", "INVALID_ARGUMENT"]),
                seconds,
                r.choice(["a", "b", "c"]),
                r.randint(1, 9),
                r.choice([*BATCH_ROWS_BUCKETS, 3, 300, 5000]),
            )
        )
    return out


def reference(seen: list[tuple[str, str, str, float, str, int, int]]) -> str:
    registry = CollectorRegistry()
    requests = Counter(
        "propserve_requests",
        "Requests answered.",
        ["method", "transport", "protocol", "code"],
        registry=registry,
    )
    latency = Histogram(
        "propserve_request_seconds",
        "Time to answer a request.",
        ["method", "transport", "protocol"],
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )
    predictions = Counter("propserve_predictions", "Rows predicted.", ["model"], registry=registry)
    batch_rows = Histogram(
        "propserve_predict_batch_rows",
        "Rows per forward pass of batched predictions.",
        ["model"],
        buckets=BATCH_ROWS_BUCKETS,
        registry=registry,
    )
    for method, transport, code, seconds, model, rows, batch in seen:
        requests.labels(method, transport, "propserve", code).inc()
        latency.labels(method, transport, "propserve").observe(seconds)
        predictions.labels(model).inc(rows)
        batch_rows.labels(model).observe(batch)
    predictions.remove("b")
    batch_rows.remove("b")
    return generate_latest(registry).decode()


def lines(text: str, names: tuple[str, ...]) -> list[str]:
    return sorted(
        line for line in text.splitlines() if line.startswith(names) and "_created" not in line
    )


def test_hot_families_render_as_prometheus_client_would() -> None:
    seen = observations(1)
    metrics = Metrics()
    for method, transport, code, seconds, model, rows, batch in seen:
        metrics.observe(method, transport, code, seconds)
        metrics.predicted(model, rows, batch)
    metrics.forget_model("b")
    names = ("propserve_requests", "propserve_request_seconds", "propserve_predict")
    ours = lines(metrics.render().decode(), names)
    assert ours == lines(reference(seen), names)
    assert len(ours) > 100
    assert metrics.answered == OBSERVATIONS
    count, total_rows = passes(metrics, "a")
    assert count == sum(1 for s in seen if s[4] == "a")
    assert total_rows == sum(s[6] for s in seen if s[4] == "a")
    assert passes(metrics, "b") == (0, 0)


def test_updates_from_many_threads_are_all_counted() -> None:
    metrics = Metrics()

    def work() -> None:
        for _ in range(2000):
            metrics.predicted("a", 1, 1)
            metrics.observe("Predict", "grpc", "OK", 0.001)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert passes(metrics, "a") == (8000, 8000)
    assert metrics.answered == 8000
    line = (
        'propserve_requests_total{code="OK",method="Predict",protocol="propserve",transport="grpc"}'
    )
    assert f"{line} 8000.0" in metrics.render().decode()


def test_scrapes_and_probes_are_not_activity() -> None:
    metrics = Metrics()
    metrics.observe("Metrics", "rest", "ok", 0.001, api=False)  # scrapes, probes, docs
    metrics.observe("other", "rest", "not_found", 0.001, api=False)  # unknown paths
    assert metrics.answered == 0
    metrics.observe("ListModels", "rest", "ok", 0.001)
    assert metrics.answered == 1
    line = (
        'propserve_requests_total{code="ok",method="Metrics",protocol="propserve",transport="rest"}'
    )
    assert f"{line} 1.0" in metrics.render().decode()
    assert "propserve_heap_trims_total 0.0" in metrics.render().decode()


def test_collector_pauses_are_timed_by_generation() -> None:
    metrics = Metrics()
    metrics.gc_callback("start", {"generation": 1})
    time.sleep(0.003)
    metrics.gc_callback("stop", {"generation": 1, "collected": 0, "uncollectable": 0})
    text = metrics.render().decode()
    assert 'propserve_gc_pause_seconds_count{generation="1"} 1.0' in text
    assert 'propserve_gc_pause_seconds_bucket{generation="1",le="0.002"} 0.0' in text
    total = re.search(r'^propserve_gc_pause_seconds_sum\{generation="1"\} (\S+)$', text, re.M)
    assert total is not None and float(total.group(1)) >= 0.003
    assert 'generation="0"' not in text and 'generation="2"' not in text


def test_scrapes_complete_while_collections_run_at_nearly_every_allocation() -> None:
    """The callback runs inside whatever allocation set a collection off, scrapes included."""
    metrics = Metrics()
    gc.callbacks.append(metrics.gc_callback)
    threshold = gc.get_threshold()
    rendered: list[bytes] = []
    try:
        gc.set_threshold(1)  # a collection at nearly every allocation of a container

        def scrape() -> None:
            for _ in range(50):
                rendered.append(metrics.render())

        thread = threading.Thread(target=scrape, daemon=True)
        thread.start()
        thread.join(timeout=30)
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(metrics.gc_callback)
    assert not thread.is_alive(), "the scrape is stuck"
    assert len(rendered) == 50
    assert b'propserve_gc_pause_seconds_count{generation="0"}' in rendered[-1]

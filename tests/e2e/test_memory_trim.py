"""The server hands freed heap memory back once after a burst of API requests, and scrapes and
probes are no burst (service.memory; counted by propserve_heap_trims_total); the full
collection before each trim shows among the collector's pauses."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from propserve.service.memory import malloc_trim
from tests.support.server import ServerProcess


def sample(client: httpx.Client, name: str) -> float | None:
    """The value of one sample (name and labels as rendered) at /metrics, or None."""
    text = client.get("/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def trims(client: httpx.Client) -> float:
    value = sample(client, "propserve_heap_trims_total")
    assert value is not None, "the metrics lack propserve_heap_trims_total"
    return value


def full_collections(client: httpx.Client) -> float:
    return sample(client, 'propserve_gc_pause_seconds_count{generation="2"}') or 0.0


def settled(client: httpx.Client, *, scrape_every: float = 0.5, quiet: float = 3.0) -> float:
    """The trim count once it has not changed for ``quiet`` seconds of scraping."""
    last, since = trims(client), time.monotonic()
    deadline = since + 20
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, "the trim count kept changing"
        time.sleep(scrape_every)
        now = trims(client)
        if now != last:
            last, since = now, time.monotonic()
    return last


def test_a_burst_of_requests_is_followed_by_one_trim(server: ServerProcess) -> None:
    if malloc_trim() is None:
        pytest.skip("malloc_trim needs glibc")
    with httpx.Client(base_url=f"http://127.0.0.1:{server.rest_port}", timeout=10) as client:
        before = settled(client)  # scraping every 0.5 s for 3 s: no trim
        collections = full_collections(client)
        for _ in range(20):
            assert client.get("/v1/models").status_code == 200
            assert client.get("/healthz").status_code == 200
        deadline = time.monotonic() + 10
        while trims(client) == before:
            assert time.monotonic() < deadline, "no trim after the burst"
            time.sleep(0.2)
        assert settled(client) == before + 1  # one per burst; the scrapes since are none
        assert full_collections(client) >= collections + 1

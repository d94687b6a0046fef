"""Batched predictions: queries for the same model and source share forward passes.

A query joins its lane (model, source) and the lane's next pass starts at the end of the
current turn of the event loop, so every query that arrived in the same wake-up shares it;
nothing waits for a batch to fill. Small passes run on the loop's thread, where a hop to a
worker would cost more than the pass; larger ones in a worker, while the next queries
gather for the pass after it (see docs/performance.md#batching).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from propserve.service.errors import TooBusy, Unavailable
from propserve.service.models import Models, Prediction, PredictQuery
from propserve.service.workers import Workers

log = logging.getLogger("propserve.batching")

#: A pass of up to this many multiply-adds (rows x parameters) runs on the loop's thread:
#: about 60 rows of a 0.5M-parameter model, well under a millisecond.
INLINE_MULTIPLY_ADDS = 1 << 25

#: Lanes kept when idle, for the next queries on the same weights.
MAX_IDLE_LANES = 64

Waiter = asyncio.Future[Prediction]


@dataclass
class _Lane:
    """Queued queries of one (model, source) and how many of its passes are computing."""

    queue: deque[tuple[PredictQuery, Waiter]] = field(default_factory=deque)
    queued_rows: int = 0
    running: int = 0
    scheduled: bool = False


class Batcher:
    """Groups prediction queries into forward passes. A lane runs at most ``max_running``
    passes at once; queries arriving meanwhile wait for the next, so passes grow with the
    load. At most ``max_queued_rows`` rows wait per lane (TooBusy beyond)."""

    def __init__(
        self,
        models: Models,
        workers: Workers,
        *,
        max_rows: int,
        max_queued_rows: int,
        max_running: int,
    ) -> None:
        self.models = models
        self.workers = workers
        self.max_rows = max(1, max_rows)
        self.max_queued_rows = max(1, max_queued_rows)
        self.max_running = max(1, max_running)
        self._lanes: dict[Any, _Lane] = {}

    def submit(self, query: PredictQuery) -> Waiter:
        """A future of ``query``'s prediction (its weights must be loaded); raises TooBusy,
        queueing nothing, when the lane's queue is full."""
        key = query.key
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
        elif lane.queued_rows >= self.max_queued_rows:
            raise TooBusy(
                f"{lane.queued_rows:,} rows of predictions on model "
                f"{query.model.record.name!r} are waiting already (the limit is "
                f"{self.max_queued_rows:,}); try again later"
            )
        loop = asyncio.get_running_loop()
        waiter: Waiter = loop.create_future()
        lane.queue.append((query, waiter))
        lane.queued_rows += query.rows
        if not lane.scheduled and lane.running < self.max_running:
            lane.scheduled = True
            # NOTE: call_soon runs after the loop has handled everything that arrived in the
            # same wake-up, so those queries share the pass.
            loop.call_soon(self._flush, key, lane)
        return waiter

    def _take(self, lane: _Lane) -> tuple[list[tuple[PredictQuery, Waiter]], int]:
        """The next pass's queries from the lane's queue, and their rows."""
        batch = [lane.queue.popleft()]
        rows = batch[0][0].rows
        while lane.queue and rows + lane.queue[0][0].rows <= self.max_rows:
            batch.append(lane.queue.popleft())
            rows += batch[-1][0].rows
        lane.queued_rows -= rows
        return batch, rows

    def _flush(self, key: Any, lane: _Lane) -> None:
        lane.scheduled = False
        while lane.queue and lane.running < self.max_running:
            batch, rows = self._take(lane)
            queries = [query for query, _ in batch]
            if lane.running == 0 and rows * queries[0].model.spec.n_params <= INLINE_MULTIPLY_ADDS:
                _resolve(batch, self._compute(queries))
                continue
            try:
                work = self.workers.start(self._compute, queries)
            except Unavailable as exc:
                _resolve(batch, [exc] * len(batch))
                continue
            lane.running += 1
            work.add_done_callback(functools.partial(self._finished, key, lane, batch))
        self._forget_idle()

    def _compute(self, queries: list[PredictQuery]) -> list[Prediction | Exception]:
        try:
            return self.models.predict_batch(queries)
        except Exception as exc:
            return [exc] * len(queries)

    def _finished(
        self,
        key: Any,
        lane: _Lane,
        batch: list[tuple[PredictQuery, Waiter]],
        work: asyncio.Future[list[Prediction | Exception]],
    ) -> None:
        lane.running -= 1
        try:
            results = work.result()
        except BaseException as exc:
            results = [Unavailable(f"the prediction did not run: {exc!r}")] * len(batch)
        _resolve(batch, results)
        if lane.queue and not lane.scheduled:
            lane.scheduled = True
            asyncio.get_running_loop().call_soon(self._flush, key, lane)
        self._forget_idle()

    def _forget_idle(self) -> None:
        """Idle lanes are kept for the next queries on the same weights while there are few;
        beyond MAX_IDLE_LANES every idle one goes (their keys hold deleted models and
        versions no longer cached alive)."""
        if len(self._lanes) > MAX_IDLE_LANES:
            for idle in [k for k, v in self._lanes.items() if not _busy(v)]:
                del self._lanes[idle]


def _busy(lane: _Lane) -> bool:
    return bool(lane.queue or lane.running or lane.scheduled)


def _resolve(
    batch: list[tuple[PredictQuery, Waiter]], results: list[Prediction | Exception]
) -> None:
    """Hand each query of ``batch`` its result; a waiter whose caller went away is skipped."""
    for (_, waiter), result in zip(batch, results, strict=True):
        if waiter.done():
            continue
        if isinstance(result, Exception):
            waiter.set_exception(result)
        else:
            waiter.set_result(result)

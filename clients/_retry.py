"""Retries with exponential backoff, for idempotent calls only (predict and reads)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from propserve.clients.errors import ClientError, TooBusy, Unavailable

T = TypeVar("T")


#: What a retry can cure: a server that is away or stopping, or one too busy for now.
RETRYABLE = (Unavailable, TooBusy)


@dataclass(frozen=True)
class RetryPolicy:
    """Retry on Unavailable or TooBusy up to ``attempts`` times in all, waiting
    base * 2^k (+-50%), and at least what a busy server asks for (within ``max_delay``)."""

    attempts: int = 4
    base_delay: float = 0.1
    max_delay: float = 2.0

    def delay(self, attempt: int, error: ClientError | None = None) -> float:
        backoff = float(min(self.max_delay, self.base_delay * 2**attempt)) * random.uniform(
            0.5, 1.5
        )
        hint = getattr(error, "retry_after", None) or 0.0
        return max(backoff, min(float(hint), self.max_delay))

    def call(self, fn: Callable[[], T]) -> T:
        for attempt in range(self.attempts):
            try:
                return fn()
            except RETRYABLE as exc:
                if attempt == self.attempts - 1:
                    raise
                time.sleep(self.delay(attempt, exc))
        raise AssertionError("unreachable")  # pragma: no cover

    async def acall(self, fn: Callable[[], Awaitable[T]]) -> T:
        for attempt in range(self.attempts):
            try:
                return await fn()
            except RETRYABLE as exc:
                if attempt == self.attempts - 1:
                    raise
                await asyncio.sleep(self.delay(attempt, exc))
        raise AssertionError("unreachable")  # pragma: no cover


NO_RETRY = RetryPolicy(attempts=1)

"""Retries with exponential backoff, for idempotent calls only (predict and reads)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from clients.errors import Unavailable

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Retry on Unavailable up to ``attempts`` times in all, waiting base * 2^k (+-50%)."""

    attempts: int = 4
    base_delay: float = 0.1
    max_delay: float = 2.0

    def delay(self, attempt: int) -> float:
        return float(min(self.max_delay, self.base_delay * 2**attempt)) * random.uniform(0.5, 1.5)

    def call(self, fn: Callable[[], T]) -> T:
        for attempt in range(self.attempts):
            try:
                return fn()
            except Unavailable:
                if attempt == self.attempts - 1:
                    raise
                time.sleep(self.delay(attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    async def acall(self, fn: Callable[[], Awaitable[T]]) -> T:
        for attempt in range(self.attempts):
            try:
                return await fn()
            except Unavailable:
                if attempt == self.attempts - 1:
                    raise
                await asyncio.sleep(self.delay(attempt))
        raise AssertionError("unreachable")  # pragma: no cover


NO_RETRY = RetryPolicy(attempts=1)

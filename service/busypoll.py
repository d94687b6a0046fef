"""Busy polling: the event loop keeps polling for the next request for a while after each
prediction, instead of sleeping (opt-in: ``PROPSERVE_BUSY_POLL_US``, see docs/operations.md).

A core that sleeps between requests loses its caches, so the next request runs slower; a
loop that polls keeps them warm, at the price of burning up to a core for the window after
each request. It pays on an otherwise idle machine serving one client at a time, and costs
throughput when other processes (clients, other servers) share the cores.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class BusyPoll:
    """Keeps the event loop polling, instead of sleeping in it, for ``window`` seconds after
    each :meth:`extend`, while ``quiet()`` is true (the loop must not take the GIL from worker
    threads between their matrix products)."""

    def __init__(self, window: float, quiet: Callable[[], bool]) -> None:
        self.window = window
        self._quiet = quiet
        self._until = 0.0
        self._polling = False

    @property
    def polling(self) -> bool:
        """Whether the loop is polling now."""
        return self._polling

    def extend(self) -> None:
        """Poll for ``window`` seconds from now (nothing when the window is 0)."""
        if self.window <= 0:
            return
        self._until = time.perf_counter() + self.window
        if not self._polling:
            self._polling = True
            asyncio.get_running_loop().call_soon(self._poll)

    def _poll(self) -> None:
        # A callback that schedules itself: while one is pending the loop polls its sockets
        # with a zero timeout on every turn, and runs what arrives, instead of sleeping.
        if time.perf_counter() < self._until and self._quiet():
            asyncio.get_running_loop().call_soon(self._poll)
        else:
            self._polling = False

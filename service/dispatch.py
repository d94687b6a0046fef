"""Running core calls from the event loop, the same way for both transports.

Work that takes long enough to stall other requests (a forward pass over many rows, a
training step, anything touching the disk) runs in a worker thread; small forward passes run
inline, where a thread hop would cost more than the work itself. NumPy releases the GIL in its
matrix products, so worker threads compute in parallel with the loop.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from service.core import Core

T = TypeVar("T")

#: A forward pass of up to this many multiply-adds (rows x parameters) runs inline: about a
#: quarter of a millisecond on one core, less than the cost of handing it to a thread.
INLINE_MACS = 1 << 20


def default_threads() -> int:
    """One worker per core (at least 2, so that a long step never blocks everything else);
    with one BLAS thread each (see service.server), they fill the cores without
    oversubscribing them."""
    return max(2, min(os.cpu_count() or 2, 8))


class Dispatcher:
    """Calls into the core from async code: inline when cheap, else in a worker thread."""

    def __init__(self, core: Core, threads: int | None = None) -> None:
        self.core = core
        self.threads = threads or default_threads()
        self.executor = ThreadPoolExecutor(self.threads, thread_name_prefix="propserve-worker")

    async def offload(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))

    async def predict(self, name: str, inputs: Any, **source: Any) -> Any:
        rows = inputs.shape[0] if getattr(inputs, "ndim", 0) else 1
        if rows * self.core.parameter_count(name) <= INLINE_MACS:
            return self.core.predict(name, inputs, **source)
        return await self.offload(self.core.predict, name, inputs, **source)

    def close(self) -> None:
        self.executor.shutdown(wait=True)

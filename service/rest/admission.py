"""Admission control for large REST bodies.

A request whose body is large (or of unknown length) waits for a slot before its body is
read; meanwhile the HTTP server stops reading its socket once a little of the body is
buffered, so the rest waits in the kernel, not in Python. Without it, many concurrent large
predictions would hold every parsed body in memory while they queue for the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.types import Scope

#: Bodies over this many bytes go through admission control.
LARGE_BODY = 256 << 10


class Admission:
    """``slots`` large bodies read at once."""

    def __init__(self, slots: int) -> None:
        self._slots = asyncio.Semaphore(slots)

    @staticmethod
    def is_large(scope: Scope) -> bool:
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return False
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        return length is None or not length.isdigit() or int(length) > LARGE_BODY

    @contextlib.asynccontextmanager
    async def slot(self, scope: Scope) -> AsyncIterator[None]:
        """Hold a slot while reading a large body; nothing for a small one."""
        if not self.is_large(scope):
            yield
            return
        async with self._slots:
            yield

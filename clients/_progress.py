"""A one-line training progress display on stderr (no dependencies)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from propserve.clients.types import StepResult


class Progress:
    """Rewrites one line per update: step, loss, accuracy and samples per second."""

    def __init__(
        self, total: int | None = None, stream: TextIO | None = None, label: str = "train"
    ) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.label = label
        self.start = time.perf_counter()
        self.samples = 0
        self.count = 0
        self._last_draw = 0.0
        self._last: StepResult | None = None

    def update(self, result: StepResult) -> None:
        self.samples += result.batch_size
        self.count += 1
        self._last = result
        now = time.perf_counter()
        if now - self._last_draw >= 0.1 or (self.total and self.count == self.total):
            self._last_draw = now
            self.stream.write("\r" + self.line(result, now))
            self.stream.flush()

    def line(self, result: StepResult, now: float | None = None) -> str:
        elapsed = max((now or time.perf_counter()) - self.start, 1e-9)
        done = f"{self.count}/{self.total}" if self.total else str(self.count)
        accuracy = "" if result.accuracy is None else f" acc {result.accuracy:.4f}"
        return (
            f"{self.label} {done} step {result.step} loss {result.loss:.4f}{accuracy} "
            f"{self.samples / elapsed:,.0f} samples/s"
        )

    def close(self) -> None:
        if self._last is not None:
            self.stream.write("\r" + self.line(self._last) + "\n")
            self.stream.flush()

"""Saved versions' weights kept in memory for predictions, least recently used first out."""

from __future__ import annotations

import threading
from collections import OrderedDict

from propserve.engine import ModelSpec, Params

Weights = tuple[ModelSpec, Params]


class VersionCache:
    """Up to ``size`` versions' (spec, parameters), by (model, version); thread-safe."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[tuple[str, int], Weights] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, model: str, version: int) -> Weights | None:
        """The version's weights if they are in memory (marked as recently used)."""
        key = (model, version)
        with self._lock:
            weights = self._entries.get(key)
            if weights is not None:
                self._entries.move_to_end(key)
            return weights

    def put(self, model: str, version: int, weights: Weights) -> None:
        if not self.size:
            return
        with self._lock:
            self._entries[model, version] = weights
            self._entries.move_to_end((model, version))
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def keep_only(self, model: str, versions: set[int]) -> None:
        """Drop ``model``'s versions other than ``versions`` (the ones still stored)."""
        with self._lock:
            for key in [k for k in self._entries if k[0] == model and k[1] not in versions]:
                del self._entries[key]

    def forget(self, model: str) -> None:
        """Drop every version of ``model`` (deleted)."""
        with self._lock:
            for key in [k for k in self._entries if k[0] == model]:
                del self._entries[key]

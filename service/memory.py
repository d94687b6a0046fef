"""The server's heap, when ``PROPSERVE_TUNE_HEAP`` is on (docs/operations.md#memory): one
malloc arena, fixed malloc thresholds, and freed memory given back to the operating system
once a burst of requests is over.

- Freed blocks in the middle of glibc's heap stay resident until ``malloc_trim`` hands their
  pages back; glibc only trims the top of the heap by itself. So after each burst the
  server collects, freezes the survivors and trims.
- glibc gives each thread that contends for the heap an arena of its own, and a burst's
  fragments stay spread over all of them; one arena keeps the resident memory flat across
  loads (the GIL already keeps the interpreter's threads from allocating at once).
- With glibc's adaptive thresholds a training server trims and faults in its step buffers
  every step; fixed thresholds stop that, and the release after a burst still hands memory
  back (``malloc_trim`` ignores the thresholds).

docs/performance-log.md has the measurements.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
from collections.abc import Callable

log = logging.getLogger("propserve.memory")

#: Seconds without a request (and with no call in a worker) before memory is trimmed.
IDLE_SECONDS = 1.0

#: malloc arenas when MALLOC_ARENA_MAX is not set (see the module's note).
ARENAS = 1
#: Blocks from this size up get pages of their own (mmap): glibc's largest allowed value.
MMAP_THRESHOLD = 32 << 20
#: Free memory at the top of the heap kept between releases rather than trimmed at once.
TRIM_THRESHOLD = 64 << 20

#: mallopt's parameter numbers (glibc's malloc.h), with the environment variables and
#: GLIBC_TUNABLES names by which a deployment sets them itself.
_PARAMETERS = {
    "arena_max": (-8, "MALLOC_ARENA_MAX"),
    "mmap_threshold": (-3, "MALLOC_MMAP_THRESHOLD_"),
    "trim_threshold": (-1, "MALLOC_TRIM_THRESHOLD_"),
}


def configure_heap(
    arenas: int = ARENAS,
    mmap_threshold: int = MMAP_THRESHOLD,
    trim_threshold: int = TRIM_THRESHOLD,
) -> list[str]:
    """Set glibc's malloc parameters (call before the server's threads start): the arenas
    and fixed thresholds of the module's note. A parameter the environment sets (its
    MALLOC_* variable, or glibc.malloc.* in GLIBC_TUNABLES) is left alone. Returns the
    names of those set here; none where the C library has no ``mallopt``."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return []
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    values = {
        "arena_max": arenas,
        "mmap_threshold": mmap_threshold,
        "trim_threshold": trim_threshold,
    }
    done = []
    for name, value in values.items():
        number, variable = _PARAMETERS[name]
        if variable in os.environ or f"glibc.malloc.{name}" in tunables:
            continue
        if mallopt(number, value):
            done.append(name)
    return done


def malloc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)``, or None where the C library has none (musl, macOS)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


def collect_and_freeze() -> None:
    """A full collection over every object, frozen ones included, after which the survivors
    are frozen: moved where the collector's automatic runs no longer traverse them.

    NOTE: what is alive once start-up or a burst is over (modules, the web and gRPC
    frameworks, the models) mostly stays alive, and every automatic full collection would
    walk all of it with the GIL held, stalling every request and training step meanwhile.
    Nothing stays out of reach for good: the server calls this after every burst (see
    :func:`after_bursts`), and each call unfreezes everything first, so cyclic garbage among
    objects frozen earlier is found by the next call.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def collect_and_trim(
    trim: Callable[[], object] | None, trimmed: Callable[[], object] = lambda: None
) -> Callable[[], object]:
    """A release that first collects cyclic garbage (a burst's exceptions, tracebacks and
    futures can hold request buffers until the next full collection) and freezes the
    survivors (see :func:`collect_and_freeze`), then trims where there is a ``trim``
    (calling ``trimmed`` after it)."""

    def release() -> object:
        collect_and_freeze()
        if trim is None:
            return None
        result = trim()
        trimmed()
        return result

    return release


class IdleTrim:
    """Calls ``release`` (in a thread) once per burst: when ``activity()`` has not changed
    for ``idle`` seconds, and ``quiet()`` holds, after it changed since the last release."""

    def __init__(
        self,
        activity: Callable[[], int],
        quiet: Callable[[], bool],
        release: Callable[[], object],
        idle: float = IDLE_SECONDS,
    ) -> None:
        self._activity = activity
        self._quiet = quiet
        self._release = release
        self._idle = idle
        self._seen = self._released = activity()

    def due(self) -> bool:
        """One look (run() takes one every ``idle`` seconds): True when the burst seen is
        over and its memory not yet released."""
        now, quiet = self._activity(), self._quiet()
        if now != self._seen or not quiet:
            # Still busy: release only after a whole interval without requests or work
            # (activity counts from 0, so -1 makes the next look see a change).
            self._seen = now if quiet else -1
            return False
        if now == self._released:
            return False
        self._released = now
        return True

    async def run(self) -> None:
        """Until cancelled."""
        while True:
            await asyncio.sleep(self._idle)
            if not self.due():
                continue
            try:
                await asyncio.get_running_loop().run_in_executor(None, self._release)
            except Exception:  # never fatal: the memory just stays with the process
                log.exception("memory.trim_failed")


def after_bursts(
    activity: Callable[[], int],
    quiet: Callable[[], bool],
    trimmed: Callable[[], object],
    idle: float = IDLE_SECONDS,
) -> IdleTrim:
    """The server's release after each burst: collect, freeze and, with glibc, trim the heap
    (``trimmed`` is called after each trim).

    NOTE: the release runs where the C library cannot trim too (musl, macOS): start-up's
    freeze is undone only by a release, so without one cyclic garbage among the objects
    frozen at start-up would stay for the life of the process.
    """
    return IdleTrim(activity, quiet, collect_and_trim(malloc_trim(), trimmed), idle)

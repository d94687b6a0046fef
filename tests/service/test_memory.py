"""service.memory: the heap is trimmed once per burst of requests, when the server idles, and
what survives is frozen out of the collector's automatic runs."""

from __future__ import annotations

import asyncio
import gc
import platform
import subprocess
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from propserve.service import memory
from propserve.service.memory import (
    IdleTrim,
    after_bursts,
    collect_and_freeze,
    collect_and_trim,
    configure_heap,
    malloc_trim,
)

ROOT = Path(__file__).resolve().parents[2]


def looks(steps: list[tuple[int, bool]]) -> list[bool]:
    """IdleTrim.due() at each look, with (activity, quiet) as given before it."""
    state = [0, True]
    trim = IdleTrim(lambda: int(state[0]), lambda: bool(state[1]), lambda: None)
    out = []
    for count, calm in steps:
        state[:] = [count, calm]
        out.append(trim.due())
    return out


def test_nothing_is_released_without_activity() -> None:
    assert looks([(0, True)] * 3) == [False, False, False]


def test_one_release_per_burst_once_idle() -> None:
    steps = [(1, True), (5, True), (5, True), (5, True), (6, True), (6, True), (6, True)]
    assert looks(steps) == [False, False, True, False, False, True, False]


def test_no_release_while_a_worker_computes() -> None:
    steps = [(1, True), (1, False), (1, False), (1, True), (1, True)]
    assert looks(steps) == [False, False, False, False, True]


def test_run_releases_in_a_thread_and_survives_a_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[str] = []

    def fail() -> None:
        calls.append("release")
        raise OSError("no")

    async def main() -> tuple[int, bool]:
        activity = [0]
        trim = IdleTrim(lambda: activity[0], lambda: True, fail, 0.005)
        task = asyncio.create_task(trim.run())
        activity[0] = 1  # a burst
        for _ in range(6000):  # a bound for a broken run, not a speed
            await asyncio.sleep(0.005)
            if "memory.trim_failed" in caplog.text:
                break
        alive = not task.done()  # a failed release leaves the loop running
        task.cancel()
        return len(calls), alive

    assert asyncio.run(main()) == (1, True)
    assert calls == ["release"]
    assert "memory.trim_failed" in caplog.text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_malloc_trim_is_found_and_callable_here() -> None:
    trim = malloc_trim()
    assert trim is not None
    assert trim() in (0, 1)  # 1: memory was released, 0: there was none to release


def test_a_release_collects_and_freezes_before_it_trims(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def trim() -> int:
        calls.append("trim")
        return 1

    for name in ("unfreeze", "collect", "freeze"):
        monkeypatch.setattr(gc, name, lambda name=name: calls.append(name))
    assert collect_and_trim(trim)() == 1
    assert calls == ["unfreeze", "collect", "freeze", "trim"]


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """The test process's collector as it was: nothing frozen, before and after."""
    gc.unfreeze()
    yield
    gc.unfreeze()


@pytest.mark.usefixtures("unfrozen")
def test_survivors_are_frozen_and_later_garbage_among_them_is_still_found() -> None:
    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle: only the cyclic collector frees it
    alive = weakref.ref(a)
    collect_and_freeze()
    assert gc.get_freeze_count() > 0
    assert gc.is_tracked(a)
    del a, b
    gc.collect()
    assert alive() is not None  # frozen: the collector's runs no longer look at it
    collect_and_freeze()
    assert alive() is None  # the next release unfreezes first, and finds it


@pytest.mark.usefixtures("unfrozen")
def test_garbage_present_when_freezing_is_collected_not_frozen() -> None:
    a, b = Node(), Node()
    a.other, b.other = b, a
    alive = weakref.ref(a)
    del a, b
    collect_and_freeze()
    assert alive() is None


GLIBC = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")


@GLIBC
def test_heap_parameters_are_set_unless_the_environment_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for variable in ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    # glibc's own arena cap on 64-bit is 8 per core: harmless in the test process.
    everything = ["arena_max", "mmap_threshold", "trim_threshold"]
    assert configure_heap(8, memory.MMAP_THRESHOLD, memory.TRIM_THRESHOLD) == everything
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1048576")
    assert configure_heap(8) == ["mmap_threshold"]
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert configure_heap(8) == []


#: Page faults of 20 rounds of two 3 MiB blocks allocated, written and freed, after one 2 MiB
#: block had pages of its own: glibc's adaptive thresholds then trim the freed 6 MiB top
#: away each round (4 MiB is twice the largest such block), so every round faults anew.
HEAP_ROUNDS = """
import resource, sys
from propserve.service.memory import configure_heap
if sys.argv[1] == "configured":
    configure_heap()
block = bytearray(2 << 20)
del block
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for rounds in (3, 20):
    before = faults()
    for _ in range(rounds):
        a, b = bytearray(3 << 20), bytearray(3 << 20)
        del b, a
print(faults() - before)
"""


@GLIBC
@pytest.mark.parametrize("heap", ["configured", "glibc's own"])
def test_a_configured_heap_keeps_freed_blocks_instead_of_faulting_them_in_again(
    heap: str,
) -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    run = [sys.executable, "-c", HEAP_ROUNDS, heap]
    faults = int(subprocess.run(run, env=env, capture_output=True, text=True, check=True).stdout)
    if heap == "configured":
        assert faults < 100
    else:  # what the configuration prevents: 1,536 pages per round
        assert faults > 20 * 1000


def test_a_release_without_malloc_trim_still_collects_and_freezes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    for name in ("unfreeze", "collect", "freeze"):
        monkeypatch.setattr(gc, name, lambda name=name: calls.append(name))
    assert collect_and_trim(None)() is None
    assert calls == ["unfreeze", "collect", "freeze"]


@pytest.mark.parametrize("glibc", [True, False])
def test_the_release_after_bursts_collects_everywhere_and_counts_only_trims(
    monkeypatch: pytest.MonkeyPatch, glibc: bool
) -> None:
    """Where the C library cannot trim (musl, macOS) the release still runs: it is what
    unfreezes start-up's objects, so their cyclic garbage is found at last."""
    calls: list[str] = []

    def trim() -> int:
        calls.append("trim")
        return 1

    monkeypatch.setattr(memory, "malloc_trim", lambda: trim if glibc else None)
    monkeypatch.setattr(memory, "collect_and_freeze", lambda: calls.append("collect"))
    activity = [0]
    idle = after_bursts(
        lambda: activity[0], lambda: True, lambda: calls.append("counted"), idle=0.01
    )

    async def one_burst() -> int:
        task = asyncio.create_task(idle.run())
        activity[0] = 1
        last = "counted" if glibc else "collect"
        for _ in range(3000):  # a bound for a broken run, not a speed
            await asyncio.sleep(0.01)
            if calls and calls[-1] == last:
                break
        task.cancel()
        return calls.count("collect")

    assert asyncio.run(one_burst()) == 1
    assert calls == (["collect", "trim", "counted"] if glibc else ["collect"])

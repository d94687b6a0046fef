"""The store between processes: a reader process lists, resolves and loads versions while
a writer process saves them in a loop (with retention removing old ones and a label
moving), and the one-writer lock across processes.

A reader may find that a version it listed was removed since (NotFound): that is the
only failure it may ever see. It never sees a partial, unparsable or unverifiable
version, and what it loads is exactly what was saved (checked by regeneration)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from propserve.service.errors import FailedPrecondition
from propserve.service.store import ModelStore

REPO = Path(__file__).resolve().parents[2]
#: Reads the reader makes while the writer saves at least SAVES versions; BOUND_S only ends
#: a run that would otherwise never finish.
READS, SAVES, BOUND_S = 1000, 100, 120.0
TIMEOUT_S = BOUND_S + 30.0

HELPERS = f"""
READS, SAVES = {READS}, {SAVES}
import random
def make_state(step, size):
    return random.Random(step).randbytes(size)
"""

WRITER = (
    HELPERS
    + """
import os, sys, time
from propserve.service.store import ModelStore
root, stop, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
store = ModelStore(root)
store.create_model("m", {"units": [3]}, {"retain": 3})
store.save_version("m", make_state(0, 1000), step=0)
store.set_label("m", "stable", 1)
print("ready", flush=True)
deadline, saves = time.monotonic() + seconds, 0
for step in range(1, 100_000):
    if os.path.exists(stop) or time.monotonic() > deadline:  # the reader is done
        break
    meta = store.save_version("m", make_state(step, 1000 + 37 * step % 200_000), step=step)
    if step % 4 == 0:
        store.set_label("m", "stable", meta.version)
    saves += 1
store.close()
print(saves, flush=True)
"""
)

READER = (
    HELPERS
    + """
import json, random, sys, time
from propserve.service.errors import NotFound, PropserveError
from propserve.service.store import ModelStore
root, stop, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
store = ModelStore(root, read_only=True)
rng = random.Random(0)
reads = vanished = 0
errors = []
# Until enough reads have overlapped enough saves (counted, not timed: a busy machine only
# takes longer); the deadline only bounds a broken run.
deadline = time.monotonic() + seconds
for _ in range(1_000_000):
    if time.monotonic() > deadline or len(errors) > 20:
        break
    if reads >= READS and store.latest_version("m").version > SAVES:
        break
    try:
        listing = store.list_versions("m")
        if not listing:  # every version listed was removed before it was read: look again
            vanished += 1
            continue
        pick = rng.random()
        if pick < 0.4:
            version = listing[-1].version
        elif pick < 0.7:
            version = store.get_model("m").labels.get("stable") or listing[-1].version
        elif pick < 0.8:
            version = store.latest_version("m").version
        else:
            version = rng.choice(listing).version
        meta, data = store.load_version("m", version)
        if data != make_state(meta.step, meta.size_bytes):
            errors.append(f"version {version}: wrong bytes")
        reads += 1
    except NotFound:
        vanished += 1  # removed by retention (or the label moved) since we looked
    except PropserveError as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
open(stop, "w").close()
print(json.dumps({"reads": reads, "vanished": vanished, "errors": errors}), flush=True)
"""
)

HOLDER = """
import sys, time
from propserve.service.store import ModelStore
store = ModelStore(sys.argv[1])
store.create_model("m", {}, None)
print("ready", flush=True)
time.sleep(60)
"""


def _spawn(code: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def _kill(*procs: subprocess.Popen[str]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=TIMEOUT_S)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def _expect_ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        _kill(proc)
        pytest.fail(f"child did not start: {line!r}")


def test_reader_never_sees_a_partial_version(tmp_path: Path) -> None:
    root, stop = tmp_path / "store", tmp_path / "stop"
    writer = _spawn(WRITER, root, stop, BOUND_S)
    reader: subprocess.Popen[str] | None = None
    try:
        _expect_ready(writer)
        reader = _spawn(READER, root, stop, BOUND_S)
        out, err = reader.communicate(timeout=TIMEOUT_S)
        assert reader.returncode == 0, err[-3000:]
        result = json.loads(out)
        w_out, w_err = writer.communicate(timeout=TIMEOUT_S)
        assert writer.returncode == 0, w_err[-3000:]
    finally:
        _kill(writer, *([reader] if reader else []))
    assert result["errors"] == []
    assert result["reads"] >= READS, result
    assert int(w_out.split()[-1]) >= SAVES, "the writer barely ran: the test proved little"


def test_second_writer_process_is_refused_and_readers_allowed(tmp_path: Path) -> None:
    root = tmp_path / "store"
    holder = _spawn(HOLDER, root)
    try:
        _expect_ready(holder)
        with pytest.raises(FailedPrecondition, match=str(root)) as refused:
            ModelStore(root)
        assert f"pid {holder.pid}" in refused.value.message
        with ModelStore(root, read_only=True) as reader:
            assert [m.name for m in reader.list_models()] == ["m"]
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=TIMEOUT_S)
        # The kernel dropped the dead writer's lock: a new writer may open.
        deadline = time.monotonic() + 5
        while True:
            try:
                with ModelStore(root) as store:
                    assert store.get_model("m").name == "m"
                break
            except FailedPrecondition:
                assert time.monotonic() < deadline, "the lock outlived its holder"
                time.sleep(0.05)
    finally:
        _kill(holder)

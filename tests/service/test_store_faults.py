"""Crash safety of the model store: a writer in a child process is killed with SIGKILL,
at random moments and at every file-system step of each operation, and the store is
then reopened and checked.

After every kill: the writable reopen leaves no staging leftovers; every model.json and
meta.json parses; every visible version loads, verifies and holds the bytes that were
saved (checked against an independent regeneration, not only the checksum); labels name
visible versions; whatever the child had acknowledged is still there; and the next
version number is above every number ever seen (numbers never go back, never reused).

The default suite runs 60 random kills plus every crash point of five operations; the
`slow` marker adds a long random run (`pytest -m slow tests/service`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from propserve.service.errors import NotFound
from propserve.service.store import ModelStore

REPO = Path(__file__).resolve().parents[2]
CHILD_TIMEOUT_S = 20.0

# State bytes are a function of (step, size), so the parent can check a loaded version
# against an independent regeneration of what was saved.
HELPERS = """
import random
def make_state(step, size):
    return random.Random(step).randbytes(size)
"""

RANDOM_WRITER = (
    HELPERS
    + """
import sys, time
from propserve.service.errors import PropserveError
from propserve.service.store import ModelStore
root, seed, big = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
store = ModelStore(root)
def say(*words):
    print(*words, flush=True)
say("ready")
names = ["m0", "m1", "m2"]
sizes = [0, 1, 1000, 70_000, 300_000] + ([1_500_000, 4_000_000] if big else [])
deadline = time.monotonic() + 15
for _ in range(100_000):
    if time.monotonic() > deadline:
        break
    name, op = rng.choice(names), rng.random()
    try:
        if op < 0.10:
            say("begin create", name)
            store.create_model(name, {"units": [4, 2]}, {"retain": 3})
            say("ack create", name)
        elif op < 0.14:
            say("begin delete", name)
            store.delete_model(name)
            say("ack delete", name)
        elif op < 0.32:
            versions = [m.version for m in store.list_versions(name)]
            if versions:
                label, version = rng.choice(["stable", "canary"]), rng.choice(versions)
                say("begin label", name, label)
                store.set_label(name, label, version)
                say("ack label", name, label, version)
        elif op < 0.37:
            store.update_settings(name, {"retain": rng.randint(1, 4)})
        else:
            step, size = rng.randrange(10**9), rng.choice(sizes)
            say("begin save", name)
            meta = store.save_version(name, make_state(step, size), step=step, parent=None,
                                      metrics={"loss": rng.random()})
            say("ack save", name, meta.version)
    except PropserveError as exc:
        say("error", type(exc).__name__)
"""
)

CRASH_AT_STEP = (
    HELPERS
    + """
import os, signal, sys, threading
from propserve.service.store import ModelStore
root, op, crash_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = ModelStore(root)
calls = 0
def armed(fn):
    def wrapper(*args, **kwargs):
        global calls
        if threading.current_thread() is threading.main_thread():
            calls += 1
            if calls == crash_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)
    return wrapper
for fn in ("write", "fsync", "rename", "replace", "mkdir", "unlink", "rmdir"):
    setattr(os, fn, armed(getattr(os, fn)))
if op == "save":
    store.save_version("m", make_state(100, 300_000), step=100, parent=3, metrics={"loss": 1.0})
elif op == "label":
    store.set_label("m", "stable", 3)
elif op == "create":
    store.create_model("n", {"units": [1]}, {"retain": 2})
elif op == "delete":
    store.delete_model("m")
elif op == "settings":
    store.update_settings("m", {"retain": 1})
store.close()
print("done", flush=True)
"""
)


def make_state(step: int, size: int) -> bytes:
    return random.Random(step).randbytes(size)


def _spawn(code: str, *args: object) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait_ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the child prints "ready" or dies (then EOF)
    if line.strip() != "ready":
        proc.kill()
        _, err = proc.communicate(timeout=CHILD_TIMEOUT_S)
        pytest.fail(f"writer did not start: {line!r} {err[-2000:]}")


def _reap(proc: subprocess.Popen[str]) -> tuple[list[str], str]:
    try:
        out, err = proc.communicate(timeout=CHILD_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = out.split("\n")
    return lines[:-1], err  # the last piece is "" or a line cut short by the kill


def check_store(
    root: Path, high: dict[str, int], log: list[str] | None = None, *, probe: bool = True
) -> ModelStore:
    """Reopen `root` for writing and check every invariant that must survive a crash,
    then what the child acknowledged in `log`; then save a probe version in each model,
    which must be numbered above `high` (the largest number ever seen per model name,
    updated in place). Returns the open store; the caller closes it."""
    store = ModelStore(root)
    try:
        assert os.listdir(root / ".staging") == []
        for model_dir in root.iterdir():
            if model_dir.name.startswith("."):
                continue
            json.loads((model_dir / "model.json").read_bytes())
            for entry in (model_dir / "versions").iterdir():
                assert entry.name.isdigit(), f"stray entry {entry}"
                json.loads((entry / "meta.json").read_bytes())
        if log is not None:
            check_acknowledged(store, log)
        for record in store.list_models():
            visible = set()
            for meta in store.list_versions(record.name):
                loaded, data = store.load_version(record.name, meta.version)
                assert loaded == meta
                assert data == make_state(meta.step, meta.size_bytes), (record.name, meta)
                visible.add(meta.version)
            for label, version in record.labels.items():
                assert version in visible, (record.name, label, version, visible)
            if not probe:
                continue
            # The next number is above everything ever seen, deletions included.
            step = random.Random(len(visible)).randrange(10**9)
            probed = store.save_version(record.name, make_state(step, 10), step=step)
            assert probed.version > max(high.get(record.name, 0), *visible, 0)
            high[record.name] = probed.version
    except BaseException:
        store.close()
        raise
    return store


def check_acknowledged(store: ModelStore, log: list[str]) -> None:
    """What the child reported as done, and did not undo later, survived its death."""
    last_save: dict[str, int] = {}
    exists: dict[str, bool] = {}
    labels: dict[tuple[str, str], int | None] = {}
    pending: set[str] = set()  # a save began after the last acknowledged one
    for line in log:
        words = line.split()
        if words[:2] == ["ack", "save"]:
            last_save[words[2]] = int(words[3])
            pending.discard(words[2])
        elif words[:2] == ["begin", "save"]:
            pending.add(words[2])
        elif words[:2] == ["ack", "create"]:
            exists[words[2]] = True
        elif words[:2] == ["begin", "delete"]:
            exists.pop(words[2], None)
            last_save.pop(words[2], None)
            for key in [k for k in labels if k[0] == words[2]]:
                labels.pop(key)
        elif words[:2] == ["begin", "label"]:
            labels[(words[2], words[3])] = None
        elif words[:2] == ["ack", "label"]:
            labels[(words[2], words[3])] = int(words[4])
    for name in exists:
        store.get_model(name)
    for name, version in last_save.items():
        visible = {m.version for m in store.list_versions(name)}
        if name in pending:  # that save may have landed, and retention dropped ours
            assert max(visible) >= version, (name, version, visible)
        else:
            assert version in visible, (name, version, visible)
    for (name, label), target in labels.items():
        if target is not None:
            assert store.get_model(name).labels.get(label) == target, (name, label)


def run_random_kills(root: Path, trials: int, seed: int, big: bool) -> None:
    rng = random.Random(seed)
    high: dict[str, int] = {}
    deadline = time.monotonic() + 40 * trials  # a hard bound; normal runs are far below
    for trial in range(trials):
        assert time.monotonic() < deadline
        proc = _spawn(RANDOM_WRITER, root, seed * 1000 + trial, int(big))
        try:
            _wait_ready(proc)
            time.sleep(rng.uniform(0.0, 0.12 if not big else 0.4))
            proc.send_signal(signal.SIGKILL)
        finally:
            log, err = _reap(proc)
        assert proc.returncode == -signal.SIGKILL, err[-2000:]
        check_store(root, high, log).close()


def test_sigkill_at_random_moments(tmp_path: Path) -> None:
    run_random_kills(tmp_path / "store", trials=60, seed=1, big=False)


@pytest.mark.slow
def test_sigkill_at_random_moments_long(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("long run: select it with -m slow")
    trials = int(os.environ.get("PROPSERVE_FAULT_TRIALS", "400"))
    run_random_kills(tmp_path / "store", trials=trials, seed=2, big=True)


# --- a crash at every file-system step of each operation ----------------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Model m: retain 2, versions 1..3, `stable` -> 1 (so a save also runs retention)."""
    root = tmp_path_factory.mktemp("template") / "store"
    with ModelStore(root) as store:
        store.create_model("m", {"units": [4, 2]}, {"retain": 5})
        for step in (1, 2, 3):
            store.save_version("m", make_state(step, 200_000), step=step)
        store.set_label("m", "stable", 1)
        store.update_settings("m", {"retain": 2})
    return root


def crash_points(template: Path, work: Path, op: str) -> Iterator[tuple[int, Path, bool]]:
    """Yield (k, store, finished) for k = 1, 2, ...: the store after a child was killed
    at its k-th file-system call of `op`, until a child finishes `op` without a kill."""
    for k in range(1, 80):
        root = work / f"{op}-{k}"
        shutil.copytree(template, root)
        proc = _spawn(CRASH_AT_STEP, root, op, k)
        out, err = _reap(proc)
        finished = proc.returncode == 0
        assert finished or proc.returncode == -signal.SIGKILL, err[-2000:]
        assert finished == (out == ["done"])
        yield k, root, finished
        if finished:
            return
    pytest.fail(f"{op} did not finish within 80 file-system calls")


def _versions(store: ModelStore, name: str) -> set[int]:
    return {m.version for m in store.list_versions(name)}


@pytest.mark.parametrize("op", ["save", "label", "create", "delete", "settings"])
def test_sigkill_at_every_step(template: Path, tmp_path: Path, op: str) -> None:
    kills = 0
    for k, root, finished in crash_points(template, tmp_path, op):
        kills += not finished
        with check_store(root, {}, probe=False) as store:
            names = {r.name for r in store.list_models()}
            seen = _versions(store, "m") if "m" in names else set()
            if op == "save":
                # Before the rename, after it, after retention: nothing in between.
                assert seen in ({1, 2, 3}, {1, 2, 3, 4}, {1, 3, 4}), (k, seen)
                assert not finished or seen == {1, 3, 4}
                if 4 in seen:
                    assert store.load_version("m", 4)[0].parent == 3
            elif op == "label":
                stable = store.get_model("m").labels["stable"]
                assert stable in (1, 3) and (not finished or stable == 3), (k, stable)
            elif op == "create":
                assert names in ({"m"}, {"m", "n"}), (k, names)
                assert not finished or "n" in names
                if "n" in names:
                    assert store.get_model("n").settings["retain"] == 2
                    assert store.list_versions("n") == []
            elif op == "delete":
                # The model is whole or gone; gone, its numbers stay used.
                assert seen in (set(), {1, 2, 3}), (k, seen)
                assert not finished or "m" not in names
                if "m" not in names:
                    store.create_model("m", {"units": [1]})
            elif op == "settings":
                retain = store.get_model("m").settings["retain"]
                assert retain in (1, 2) and (not finished or retain == 1), (k, retain)
                assert seen == {1, 2, 3} or (retain == 1 and seen == {1, 3}), (k, seen)
                assert not finished or seen == {1, 3}
            probe = store.save_version("m", b"probe", step=0).version
            assert probe == (5 if 4 in seen else 4), (k, seen, probe)
        shutil.rmtree(root)
    assert kills >= 3, f"{op}: only {kills} crash points"


def test_missing_model_after_delete_is_not_found(template: Path, tmp_path: Path) -> None:
    root = tmp_path / "store"
    shutil.copytree(template, root)
    with ModelStore(root) as store:
        store.delete_model("m")
        with pytest.raises(NotFound, match="'m'"):
            store.load_version("m", 1)

"""Benchmark of the model store against plain file I/O of the same bytes, in one run.

    .venv/bin/python bench/store.py            # a table
    .venv/bin/python bench/store.py --json     # one JSON object per case

Cases (medians over interleaved repetitions, so that host noise hits both sides):
- save:  ModelStore.save_version of a 1M-parameter float32 model with adam state
         (params + exp_avg + exp_avg_sq = 3M float32, 12 MB) with retention running,
         against writing the same bytes to a new file + fsync.
- load:  ModelStore.load_version (reads and verifies sha256) against np.load of the same
         arrays from a .npy file; `load_vs_read` compares against a plain read instead.
- sha256: hashing the 12 MB alone, the floor of any verified load.
- open_list: open a store of 10 models x 100 versions read-only, list the models and
         every version's metadata, against reading the same JSON files in a plain loop.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import cpu_model
from propserve.service.store import ModelStore

N_PARAMS = 1_000_000


def _median_pair(
    case: Callable[[], object], base: Callable[[], object], repeats: int
) -> tuple[float, float]:
    ours: list[float] = []
    theirs: list[float] = []
    for _ in range(repeats):
        for fn, out in ((case, ours), (base, theirs)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(ours), statistics.median(theirs)


def _machine() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "kernel": platform.release(),
    }


def _fs_type(path: Path) -> str:
    best, kind = "", "?"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fs, *_ = line.split()
            if str(path).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fs
    except OSError:
        pass
    return kind


def run(work: Path, repeats: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    arrays = rng.standard_normal((3, N_PARAMS), dtype=np.float32)  # params, m, v
    state = arrays.tobytes()
    results: list[dict[str, Any]] = []

    def add(case: str, ours: float, base: float, baseline: str, target: float | None) -> None:
        results.append(
            {
                "case": case,
                "median_s": ours,
                "baseline": baseline,
                "baseline_s": base,
                "ratio": ours / base,
                "target_ratio": target,
                "bytes": len(state),
            }
        )

    store = ModelStore(work / "store")
    # "save" keeps every version (retention removes nothing while it is timed);
    # "save_with_retention" keeps 3, so each save also removes the oldest version.
    store.create_model("bench", {"params": N_PARAMS}, {"retain": 1_000_000})
    store.create_model("bench-retained", {"params": N_PARAMS}, {"retain": 3})
    plain = work / "plain"
    plain.mkdir()
    counter = iter(range(10**9))

    def plain_save() -> None:
        path = plain / f"{next(counter)}.bin"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, state)
            os.fsync(fd)
        finally:
            os.close(fd)

    step = iter(range(10**9))
    ours, base = _median_pair(
        lambda: store.save_version("bench", state, step=next(step), metrics={"loss": 0.5}),
        plain_save,
        repeats,
    )
    add("save", ours, base, "write+fsync", 1.5)
    ours, base = _median_pair(
        lambda: store.save_version("bench-retained", state, step=next(step), metrics={}),
        plain_save,
        repeats,
    )
    add("save_with_retention", ours, base, "write+fsync", None)

    version = store.latest_version("bench")
    assert version is not None
    npy = work / "state.npy"
    np.save(npy, arrays)
    weights = work / "store" / "bench" / "versions" / str(version.version)
    weights = weights / "weights.safetensors"
    loaded = np.load(npy)
    assert loaded.tobytes() == store.load_version("bench", version.version)[1]

    ours, base = _median_pair(
        lambda: store.load_version("bench", version.version), lambda: np.load(npy), repeats
    )
    add("load", ours, base, "np.load", 1.5)
    ours, base = _median_pair(
        lambda: store.load_version("bench", version.version), weights.read_bytes, repeats
    )
    add("load_vs_read", ours, base, "read", 1.5)
    ours, base = _median_pair(lambda: hashlib.sha256(state).digest(), lambda: np.load(npy), repeats)
    add("sha256_only", ours, base, "np.load", None)
    store.close()

    # 10 models x 100 versions; small states, since listing must never read weights.
    many = work / "many"
    with ModelStore(many) as writer:
        for m in range(10):
            writer.create_model(f"model-{m}", {"params": N_PARAMS}, {"retain": 1000})
            for v in range(100):
                writer.save_version(f"model-{m}", b"w" * 64, step=v, metrics={"loss": 1.0})

    def open_list() -> None:
        with ModelStore(many, read_only=True) as reader:
            models = reader.list_models()
            listed = sum(len(reader.list_versions(m.name)) for m in models)
        assert len(models) == 10 and listed == 1000

    def plain_list() -> None:
        docs = []
        for model in sorted(os.listdir(many)):
            if model.startswith("."):
                continue
            docs.append(json.loads((many / model / "model.json").read_bytes()))
            for v in sorted(os.listdir(many / model / "versions"), key=int):
                docs.append(json.loads((many / model / "versions" / v / "meta.json").read_bytes()))
        assert len(docs) == 1010

    ours, base = _median_pair(open_list, plain_list, max(repeats // 2, 3))
    add("open_list_10x100", ours, base, "plain json walk", None)
    results[-1]["target_s"] = 0.5
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--repeats", type=int, default=15, help="repetitions per case")
    parser.add_argument("--dir", type=Path, default=None, help="where to work (a temp dir)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="propserve-bench-", dir=args.dir))
    try:
        machine = _machine()
        machine["fs"] = _fs_type(work.resolve())
        results = run(work, args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        for row in results:
            print(json.dumps({**row, "machine": machine}))
        return
    print(" ".join(f"{k}={v}" for k, v in machine.items()))
    print(f"state: {results[0]['bytes']} bytes; medians of {args.repeats} interleaved runs")
    header = f"{'case':<18}{'median ms':>10}  {'baseline':<16}{'base ms':>9}{'ratio':>7}  target"
    print(header)
    print("-" * len(header))
    for row in results:
        target = (
            f"<= {row['target_ratio']}x"
            if row.get("target_ratio")
            else (f"< {row['target_s']} s" if "target_s" in row else "")
        )
        print(
            f"{row['case']:<18}{float(row['median_s']) * 1e3:>10.2f}  {row['baseline']:<16}"
            f"{float(row['baseline_s']) * 1e3:>9.2f}{float(row['ratio']):>7.2f}  {target}"
        )


if __name__ == "__main__":
    main()

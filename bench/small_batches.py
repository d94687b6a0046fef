"""Benchmark of prediction batches of a few rows: the engine's forward pass as it runs (small
batches cut into BLAS calls the small-matrix kernels take, see engine/rowsplit.py) against
the same forward pass with one BLAS call per layer, timed interleaved in one run.

    .venv/bin/python bench/small_batches.py            # a table
    .venv/bin/python bench/small_batches.py --json     # one JSON object per case

Cases: architectures A=[784,512,256,10], B=[64,128,10], C=[1024,2048,2048,1024,10] (as in
bench/engine.py), float32 and float64, 1-16 rows, one BLAS thread (the server's default).
speedup = one-call time / engine time. Where this process's BLAS has no small-matrix kernels
the engine makes one call per layer too, and every speedup reads ~1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common
from propserve.engine import ModelSpec, Network, forward
from propserve.engine import network as network_module
from propserve.engine.rowsplit import rows_per_call, small_kernels

ARCHS: dict[str, list[int]] = {
    "A": [784, 512, 256, 10],
    "B": [64, 128, 10],
    "C": [1024, 2048, 2048, 1024, 10],
}
ROWS = (1, 2, 3, 4, 6, 8, 12, 16)


def _network(arch: list[int], dtype: str) -> Network:
    layers: list[dict[str, Any]] = [{"units": n, "activation": "relu"} for n in arch[1:-1]]
    layers.append({"units": arch[-1], "activation": "softmax"})
    spec = {
        "input_dim": arch[0],
        "layers": layers,
        "loss": "softmax_cross_entropy",
        "dtype": dtype,
        "seed": 0,
    }
    return Network(ModelSpec.from_dict(spec))


def _one_call(rows: int, n_in: int, n_out: int, itemsize: int) -> int:
    return rows


def _time(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call, in alternating blocks of ~2 ms each."""
    calls = {}
    for name, fn in fns.items():
        fn()
        start = time.perf_counter()
        fn()
        calls[name] = max(1, int(2e-3 / max(time.perf_counter() - start, 1e-9)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            fn, k = fns[name], calls[name]
            start = time.perf_counter()
            for _ in range(k):
                fn()
            samples[name].append((time.perf_counter() - start) / k)
    return {name: statistics.median(values) for name, values in samples.items()}


def run_case(arch: str, dtype: str, rows: int, rounds: int) -> dict[str, Any]:
    net = _network(ARCHS[arch], dtype)
    spec, params = net.spec, net.params
    x = np.random.default_rng(rows).standard_normal((rows, ARCHS[arch][0])).astype(dtype)

    # NOTE: the baseline is the engine's own forward with the rule swapped for one call per
    # layer, so that the two differ in nothing else.
    def engine() -> object:
        setattr(network_module, "rows_per_call", rows_per_call)  # noqa: B010
        return forward(spec, params, x)

    def one_call() -> object:
        setattr(network_module, "rows_per_call", _one_call)  # noqa: B010
        return forward(spec, params, x)

    try:
        times = _time({"engine": engine, "one_call": one_call}, rounds)
    finally:
        setattr(network_module, "rows_per_call", rows_per_call)  # noqa: B010
    calls = [rows_per_call(rows, w.shape[0], w.shape[1], w.itemsize) for w in params.weights]
    return {
        "arch": arch,
        "dtype": dtype,
        "rows": rows,
        "rows_per_call": calls,
        "engine_s": times["engine"],
        "one_call_s": times["one_call"],
        "speedup": times["one_call"] / times["engine"],
    }


def machine() -> dict[str, Any]:
    from threadpoolctl import threadpool_info  # noqa: PLC0415

    blas = [
        {k: pool.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
        for pool in threadpool_info()
        if pool.get("user_api") == "blas"
    ]
    return {**common.machine(), "blas": blas, "small_kernels": small_kernels()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", choices=sorted(ARCHS), default=sorted(ARCHS))
    parser.add_argument("--dtype", nargs="+", default=["float32", "float64"])
    parser.add_argument("--rows", nargs="+", type=int, default=list(ROWS))
    parser.add_argument("--rounds", type=int, default=15, help="alternating blocks per case")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)
    from threadpoolctl import threadpool_limits  # noqa: PLC0415

    limiter = threadpool_limits(1, user_api="blas")
    info = machine()
    results = []
    for arch in args.arch:
        for dtype in args.dtype:
            for rows in args.rows:
                result = run_case(arch, dtype, rows, args.rounds)
                results.append(result)
                if args.json:
                    print(json.dumps({**result, "machine": info}), flush=True)
    del limiter
    if args.json:
        return
    print(f"cpu: {info['cpu']}; cores {info['cores']}; python {info['python']}, ", end="")
    print(f"numpy {info['numpy']}; one BLAS thread")
    for pool in info["blas"]:
        print("blas: " + ", ".join(f"{k}={v}" for k, v in pool.items()))
    print(f"small-matrix kernels detected: {info['small_kernels']}")
    print("medians of interleaved blocks; speedup = one call per layer / engine")
    header = (
        f"{'arch':<4} {'dtype':<7} {'rows':>4} {'rows per call':<16} "
        f"{'engine us':>10} {'one call us':>12} {'speedup':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        per_call = ",".join(str(c) for c in r["rows_per_call"])
        print(
            f"{r['arch']:<4} {r['dtype']:<7} {r['rows']:>4} {per_call:<16} "
            f"{r['engine_s'] * 1e6:>10.1f} {r['one_call_s'] * 1e6:>12.1f} {r['speedup']:>8.2f}"
        )


if __name__ == "__main__":
    main()

"""Benchmark of the engine's forward pass and training step against a GEMM-only floor and torch.

    .venv/bin/python bench/engine.py                      # a table, no torch column
    PYTHONPATH=. /path/to/torch-venv/bin/python bench/engine.py --arch A --dtype float32
    .venv/bin/python bench/engine.py --json --quick       # one JSON object per case

Cases: architectures A=[784,512,256,10], B=[64,128,10], C=[1024,2048,2048,1024,10] (relu
hidden layers, softmax cross-entropy on integer labels); float32 and float64; batch 1, 32, 256
and 1024; ``forward`` (Network.forward: validation, layers, softmax) and ``train`` steps
(Network.train_step: validation, forward, loss, accuracy, backward, update, finiteness check)
with sgd, adam and adamw (lr 1e-3, torch.optim's defaults otherwise: adamw's weight decay
0.01).

Each case times three implementations interleaved in one run, so that the host's noise hits
all of them alike, and reports medians:

- the engine;
- a GEMM-only floor: the same matrix products alone into preallocated outputs (forward:
  a @ W per layer; train: those, dW = a_prev^T dZ per layer and dA_prev = dZ W^T below the top
  layer), each in numpy's fastest form (see _gemm_floor);
- torch (when importable): nn.Sequential of nn.Linear/nn.ReLU with the engine's initial
  weights, nn.CrossEntropyLoss and torch.optim.SGD/Adam/AdamW, fed from the same numpy arrays.

GFLOP/s counts 2 x batch x params per forward and 6 x batch x params per train step.
frac_gemm_floor = floor time / engine time; ratio_torch = engine time / torch time (< 1: the
engine is faster). BLAS threads are set for numpy (threadpoolctl, or the environment before
numpy loads) and torch alike: --threads, default the machine's cores.

other_cpu is the CPU time other processes used while the case ran, in cores (from Linux's
/proc/stat, less this process's own time; None elsewhere), and steal the time the hypervisor
gave the machine's cores to others: on a shared 2-core machine a case measured beside
another process's work (other_cpu of a tenth of a core or more) stalls both libraries' thread
pools at random, and its ratios say more about that than about the code.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal


def _threads_from_argv(argv: list[str]) -> int:
    """--threads N, read before numpy loads so that the environment fallback takes effect."""
    for i, arg in enumerate(argv):
        if arg.startswith("--threads="):
            return int(arg.split("=", 1)[1])
        if arg == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
    return os.cpu_count() or 1


for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(_threads_from_argv(sys.argv[1:]))

import numpy as np  # noqa: E402 - after the thread count is in the environment

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import cpu_model  # noqa: E402
from propserve.engine import ModelSpec, Network  # noqa: E402

ARCHS: dict[str, list[int]] = {
    "A": [784, 512, 256, 10],
    "B": [64, 128, 10],
    "C": [1024, 2048, 2048, 1024, 10],
}
DTYPES = ("float32", "float64")
BATCHES = (1, 32, 256, 1024)
OPTIMIZERS = ("sgd", "adam", "adamw")
LR = 1e-3

Fn = Callable[[], object]


# -- machine and threads -----------------------------------------------------------------


def _set_threads(threads: int) -> tuple[Any, Any]:
    """Limit numpy's BLAS (threadpoolctl when installed) and torch to ``threads``.

    Returns (threadpoolctl limiter or None, torch module or None); keep the limiter alive.
    """
    limiter = None
    try:
        from threadpoolctl import threadpool_limits  # noqa: PLC0415 - optional

        limiter = threadpool_limits(limits=threads)
    except ImportError:
        pass
    try:
        import torch  # noqa: PLC0415 - optional reference, never a dependency
    except ImportError:
        return limiter, None
    torch.set_num_threads(threads)
    return limiter, torch


def _machine(threads: int, torch: Any) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "threads": threads,
    }
    try:
        from threadpoolctl import threadpool_info  # noqa: PLC0415 - optional

        info["blas"] = [
            {k: pool.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
            for pool in threadpool_info()
            if pool.get("user_api") == "blas"
        ]
    except ImportError:
        config: Any = np.show_config(mode="dicts")
        blas = config.get("Build Dependencies", {}).get("blas", {})
        info["blas"] = [{"name": blas.get("name"), "version": blas.get("version")}]
        info["blas_note"] = "threadpoolctl not installed: threads set via the environment"
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    else:
        info["torch"] = None
    return info


# -- timing ----------------------------------------------------------------------------------


class _Interference:
    """CPU time that other processes (other_cpu) and the hypervisor (steal) took, in cores,
    between entering and leaving the block; both None where /proc/stat is missing."""

    other_cpu: float | None = None
    steal: float | None = None

    def __enter__(self) -> _Interference:
        self._start = self._read()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._read()
        if self._start is None or end is None:
            return
        wall = end[0] - self._start[0]
        self.other_cpu = max(0.0, (end[1] - self._start[1]) / wall)
        self.steal = (end[2] - self._start[2]) / wall

    @staticmethod
    def _read() -> tuple[float, float, float] | None:
        """(wall seconds, busy CPU seconds of everything but this process, steal seconds)."""
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        except OSError:
            return None
        user, nice, system, _, _, irq, softirq, steal = (int(v) for v in fields[1:9])
        ticks = os.sysconf("SC_CLK_TCK")
        own = sum(os.times()[:2])  # every thread of this process, BLAS and torch pools included
        busy = (user + nice + system + irq + softirq) / ticks
        return time.perf_counter(), busy - own, steal / ticks


def _time_interleaved(
    fns: dict[str, Fn], pools: dict[str, str], budget_s: float, min_rounds: int, settle_s: float
) -> dict[str, float]:
    """Median seconds per call of each function, sampled in blocks of alternating rounds.

    A warm-up call of each sizes its block: k consecutive calls of about a millisecond or more,
    so that tiny operations are not dominated by the timer. Rounds continue until each
    function has ``min_rounds`` samples and ``budget_s`` has passed; heavy cases stop after 3
    rounds once ``3 * budget_s`` has passed.

    NOTE: numpy's OpenBLAS and torch's OpenMP each keep their worker threads spinning for a
    while after a call (OpenBLAS for up to ~0.1 s). On a 2-core machine a spinning pool halves
    the other library's speed and stalls its barriers by milliseconds, so whenever the thread
    pool (``pools[name]``) changes, the next function first runs untimed for ``settle_s``. A
    sleep would not do: on this virtual machine idle cores wake up slowly, and the first
    calls after one take 10-100x longer.

    Every block is timed warm, as a training or serving loop runs: one untimed call of the
    function comes first where no settle did. Without it, a function timed right after
    another one's settle ran with its data evicted by ``settle_s`` of the other's calls
    (docs/performance.md, "Engine", has what that did to the engine's figures).
    """
    names = list(fns)
    calls: dict[str, int] = {}
    for name in names:
        fns[name]()
        start = time.perf_counter()
        fns[name]()
        calls[name] = max(1, min(1000, int(1e-3 / max(time.perf_counter() - start, 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    rounds = 0
    pool = ""
    while True:
        elapsed = time.perf_counter() - start
        if rounds >= min_rounds and elapsed >= budget_s:
            break
        if rounds >= 3 and elapsed >= 3 * budget_s:
            break
        for name in names if rounds % 2 == 0 else names[::-1]:
            fn, k = fns[name], calls[name]
            if pools[name] != pool:
                pool = pools[name]
                settled = time.perf_counter()
                fn()
                while time.perf_counter() - settled < settle_s:
                    fn()
            else:
                fn()  # warm: see the docstring
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            samples[name].append((time.perf_counter() - t0) / k)
        rounds += 1
    return {name: statistics.median(values) for name, values in samples.items()}


# -- the three implementations ----------------------------------------------------------------


def _spec(arch: list[int], dtype: str, optimizer: str) -> ModelSpec:
    layers = [{"units": n, "activation": "relu"} for n in arch[1:-1]]
    layers.append({"units": arch[-1], "activation": "softmax"})
    return ModelSpec.from_dict(
        {
            "input_dim": arch[0],
            "layers": layers,
            "loss": "softmax_cross_entropy",
            "optimizer": {"name": optimizer, "lr": LR},
            "dtype": dtype,
            "seed": 0,
        }
    )


def _gemm_floor(arch: list[int], dtype: str, batch: int, op: str) -> Fn:
    """The forward (and for ``train`` the backward) matrix products alone, preallocated.

    Each product in its fastest numpy form, the one the engine uses too: hidden layers'
    (batch, units) arrays column-major, and at batch 1 the outer product dW = a_prev^T dZ as a
    product with inner dimension 2 (one zero row each), since numpy's matmul with an inner
    dimension of 1 is an order of magnitude slower.
    """
    rng = np.random.default_rng(1)
    pairs = list(itertools.pairwise(arch))
    n = len(pairs)

    def rows(units: int, layer: int) -> Any:
        order: Literal["C", "F"] = "C" if layer in (0, n) else "F"  # input, output: row-major
        return np.asarray(rng.standard_normal((batch, units)), dtype=dtype, order=order)

    weights = [rng.standard_normal((n_in, n_out)).astype(dtype) for n_in, n_out in pairs]
    acts = [rows(units, i) for i, units in enumerate(arch)]
    grads_z = [rows(n_out, i + 1) for i, (_, n_out) in enumerate(pairs)]
    grads_a = [rows(n_in, i) for i, (n_in, _) in enumerate(pairs)]
    grads_w = [np.empty_like(w) for w in weights]
    pad_a = [np.zeros((2, n_in), dtype) for n_in, _ in pairs]
    pad_z = [np.zeros((2, n_out), dtype) for _, n_out in pairs]

    def forward() -> None:
        for i in range(n):
            np.matmul(acts[i], weights[i], out=acts[i + 1])

    def train() -> None:
        forward()
        for i in range(n - 1, -1, -1):
            if i > 0:
                np.matmul(grads_z[i], weights[i].T, out=grads_a[i])
            if batch == 1:
                np.matmul(pad_a[i].T, pad_z[i], out=grads_w[i])
            else:
                np.matmul(acts[i].T, grads_z[i], out=grads_w[i])

    return forward if op == "forward" else train


def _torch_impl(torch: Any, net: Network, x: Any, y: Any, op: str, optimizer: str) -> Fn:
    """nn.Sequential + torch.optim with the engine's weights, fed from the same arrays."""
    nn = torch.nn
    modules: list[Any] = []
    for i, (w, b) in enumerate(zip(net.params.weights, net.params.biases, strict=False)):
        linear = nn.Linear(w.shape[0], w.shape[1], dtype=getattr(torch, str(w.dtype)))
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T)))
            linear.bias.copy_(torch.from_numpy(b.copy()))
        modules.append(linear)
        if i < len(net.params.weights) - 1:
            modules.append(nn.ReLU())
    model = nn.Sequential(*modules)
    if op == "forward":

        def forward() -> object:
            with torch.inference_mode():
                return torch.softmax(model(torch.from_numpy(x)), dim=1).numpy()

        return forward
    loss_fn = nn.CrossEntropyLoss()
    opt_cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[
        optimizer
    ]
    opt = opt_cls(model.parameters(), lr=LR)

    def train() -> object:
        opt.zero_grad()
        loss = loss_fn(model(torch.from_numpy(x)), torch.from_numpy(y))
        loss.backward()
        opt.step()
        return loss.item()

    return train


# -- the run ---------------------------------------------------------------------------------


def run_case(
    arch_name: str,
    dtype: str,
    batch: int,
    op: str,
    optimizer: str | None,
    torch: Any,
    budget_s: float,
    min_rounds: int,
    settle_s: float,
) -> dict[str, Any]:
    arch = ARCHS[arch_name]
    net = Network(_spec(arch, dtype, optimizer or "sgd"))
    rng = np.random.default_rng(2)
    x = rng.standard_normal((batch, arch[0])).astype(dtype)
    y = rng.integers(0, arch[-1], size=batch)
    fns: dict[str, Fn] = {}
    if op == "forward":
        fns["engine"] = lambda: net.forward(x)
    else:
        fns["engine"] = lambda: net.train_step(x, y)
    fns["floor"] = _gemm_floor(arch, dtype, batch, op)
    if torch is not None:
        fns["torch"] = _torch_impl(torch, net, x, y, op, optimizer or "sgd")
    pools = {name: "torch" if name == "torch" else "numpy" for name in fns}
    with _Interference() as interference:
        medians = _time_interleaved(fns, pools, budget_s, min_rounds, settle_s)
    params = net.spec.n_params
    flops = (2 if op == "forward" else 6) * batch * params
    median = medians["engine"]
    torch_s = medians.get("torch")
    return {
        "arch": arch_name,
        "sizes": arch,
        "params": params,
        "dtype": dtype,
        "batch": batch,
        "op": op,
        "optimizer": optimizer,
        "median_s": median,
        "samples_per_s": batch / median,
        "gflops": flops / median / 1e9,
        "floor_s": medians["floor"],
        "frac_gemm_floor": medians["floor"] / median,
        "torch_s": torch_s,
        "ratio_torch": None if torch_s is None else median / torch_s,
        "other_cpu": interference.other_cpu,
        "steal": interference.steal,
    }


def _print_table(machine: dict[str, Any], rows: list[dict[str, Any]], note: str) -> None:
    print(f"cpu: {machine['cpu']}; cores {machine['cores']} (usable {machine['usable_cores']})")
    print(f"python {machine['python']}, numpy {machine['numpy']}, threads {machine['threads']}")
    for pool in machine["blas"]:
        print("blas: " + ", ".join(f"{k}={v}" for k, v in pool.items()))
    if "blas_note" in machine:
        print(machine["blas_note"])
    if machine["torch"]:
        print(f"torch {machine['torch']}, threads {machine['torch_threads']}")
    else:
        print("torch: not importable (no ratio_torch)")
    print(note)
    header = (
        f"{'arch':<4} {'dtype':<7} {'batch':>5} {'op':<7} {'opt':<4} {'median ms':>10} "
        f"{'samples/s':>10} {'GFLOP/s':>8} {'floor ms':>9} {'frac floor':>10} "
        f"{'torch ms':>9} {'x torch':>8} {'other':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        torch_ms = "-" if r["torch_s"] is None else f"{r['torch_s'] * 1e3:.3f}"
        ratio = "-" if r["ratio_torch"] is None else f"{r['ratio_torch']:.2f}"
        other = "-" if r["other_cpu"] is None else f"{r['other_cpu']:.2f}"
        print(
            f"{r['arch']:<4} {r['dtype']:<7} {r['batch']:>5} {r['op']:<7} "
            f"{r['optimizer'] or '-':<4} {r['median_s'] * 1e3:>10.3f} "
            f"{r['samples_per_s']:>10.0f} {r['gflops']:>8.1f} {r['floor_s'] * 1e3:>9.3f} "
            f"{r['frac_gemm_floor']:>10.2f} {torch_ms:>9} {ratio:>8} {other:>6}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", choices=sorted(ARCHS), default=sorted(ARCHS))
    parser.add_argument("--dtype", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--batch", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument(
        "--op", nargs="+", choices=("forward", "train"), default=["forward", "train"]
    )
    parser.add_argument("--optimizer", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="BLAS threads for numpy and torch alike (default: the machine's cores)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats (about 2 minutes)")
    parser.add_argument("--budget", type=float, default=None, help="seconds of timing per case")
    parser.add_argument(
        "--settle",
        type=float,
        default=0.15,
        help="seconds of untimed calls after switching between numpy and torch",
    )
    parser.add_argument("--no-torch", action="store_true", help="skip torch even if importable")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)
    if args.threads < 1 or any(b < 1 for b in args.batch):
        parser.error("--threads and --batch must be >= 1")
    budget = args.budget if args.budget is not None else (0.25 if args.quick else 1.5)
    min_rounds = 3 if args.quick else 7
    limiter, torch = _set_threads(args.threads)
    if args.no_torch:
        torch = None
    machine = _machine(args.threads, torch)
    note = (
        f"medians of interleaved samples, >= {min_rounds} rounds and ~{budget:g} s per case "
        "(heavy cases: 3 rounds); frac floor = GEMM-only time / engine time; "
        "x torch = engine time / torch time; other = other processes' CPU, in cores"
    )
    rows: list[dict[str, Any]] = []
    for arch in args.arch:
        for dtype in args.dtype:
            for batch in args.batch:
                for op in args.op:
                    for optimizer in [None] if op == "forward" else args.optimizer:
                        row = run_case(
                            arch,
                            dtype,
                            batch,
                            op,
                            optimizer,
                            torch,
                            budget,
                            min_rounds,
                            args.settle,
                        )
                        rows.append(row)
                        if args.json:
                            print(json.dumps({**row, "machine": machine}), flush=True)
                        else:
                            print(
                                f"  {arch} {dtype} {batch} {op} {optimizer or ''}",
                                end="\r",
                                file=sys.stderr,
                                flush=True,
                            )
    del limiter
    if not args.json:
        _print_table(machine, rows, note)


if __name__ == "__main__":
    main()

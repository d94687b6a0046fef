"""What the benchmarks share: the machine's description and model A's spec."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

#: Model A = [784 -> 512 relu -> 256 relu -> 10 softmax], float32, as propserve's spec.
SPEC_A: dict[str, Any] = {
    "input_dim": 784,
    "layers": [
        {"units": 512, "activation": "relu"},
        {"units": 256, "activation": "relu"},
        {"units": 10, "activation": "softmax"},
    ],
    "loss": "softmax_cross_entropy",
    "optimizer": {"name": "sgd", "lr": 0.01},
    "dtype": "float32",
    "seed": 0,
}
#: Model A's widths, input first.
DIMS_A = (784, 512, 256, 10)
#: BLAS threads the benchmarks give a server and their in-process engine alike: set
#: explicitly, so that both sides match whatever the server's own default becomes.
BLAS_THREADS = 1


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def machine() -> dict[str, Any]:
    """What every benchmark reports of the machine: CPU, cores, Python and numpy versions."""
    import numpy as np  # noqa: PLC0415

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }

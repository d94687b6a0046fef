"""Produce PyTorch reference trajectories for the engine's optimizer tests.

Run it only where torch is installed (it is never a dependency of propserve):

    python tests/engine/reference/make_torch_reference.py

It writes ``tests/engine/data/torch_reference.json`` (next to this folder's parent),
which is committed; ``tests/engine/test_torch_reference.py`` compares the engine against
it, so CI needs no torch. The script imports nothing from the project.

Each case trains a small MLP (5 -> 7 -> 6 -> 3) in float64 for 20 steps with torch's own
``nn.Linear``, activation modules, losses and ``torch.optim``, on a fresh random batch
of 8 samples per step. For every case the JSON holds:

- ``spec``: the engine's ModelSpec dict describing the same network and optimizer;
- ``initial``: the starting weights and biases in the engine's layout, W of shape
  (n_in, n_out) so that a layer computes ``x @ W + b`` (torch's ``Linear.weight`` is
  (n_out, n_in) and is stored transposed);
- ``steps``: per step the batch (``x``, ``y``), the loss on the weights *before* that
  step's update (torch's ``loss.item()`` before ``optimizer.step()``), the global
  gradient norm before any clipping, and the weights and biases *after* the update;
- ``probe``: an extra input and the network's outputs on it after the last step
  (probabilities for the classification losses: sigmoid for bce, softmax for softmax
  cross-entropy).

Floats are written by ``json`` with ``repr``, so every value round-trips exactly.
Inputs and regression targets are rounded to 6 decimals before use (by torch and in the
file alike) only to keep the file small.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

OUT_PATH = Path(__file__).resolve().parent.parent / "data" / "torch_reference.json"

INPUT_DIM = 5
HIDDEN = (7, 6)
OUTPUTS = 3
BATCH = 8
STEPS = 20
PROBE_ROWS = 4

SGD_DEFAULTS: dict[str, Any] = {
    "name": "sgd",
    "lr": 0.1,
    "momentum": 0.0,
    "dampening": 0.0,
    "nesterov": False,
    "weight_decay": 0.0,
}
ADAM_DEFAULTS: dict[str, Any] = {
    "name": "adam",
    "lr": 0.01,
    "betas": [0.9, 0.999],
    "eps": 1e-8,
    "weight_decay": 0.0,
}


@dataclass(frozen=True)
class Case:
    """One reference trajectory: network, loss, target format and optimizer."""

    name: str
    hidden: tuple[str, str]  # activations of the two hidden layers
    loss: str
    target_kind: str  # real, real_large, binary, labels or one_hot (see make_batch)
    optimizer: dict[str, Any]
    grad_clip_norm: float | None = None


# Together the cases cover every hidden activation, every loss and both label forms of
# softmax cross-entropy.
CASES = [
    Case("sgd_plain", ("tanh", "relu"), "mse", "real", {**SGD_DEFAULTS}),
    Case(
        "sgd_momentum",
        ("sigmoid", "leaky_relu"),
        "binary_cross_entropy",
        "binary",
        {**SGD_DEFAULTS, "momentum": 0.9},
    ),
    Case(
        "sgd_momentum_dampening",
        ("gelu", "tanh"),
        "softmax_cross_entropy",
        "labels",
        {**SGD_DEFAULTS, "momentum": 0.9, "dampening": 0.1},
    ),
    Case(
        "sgd_nesterov",
        ("identity", "relu"),
        "softmax_cross_entropy",
        "one_hot",
        {**SGD_DEFAULTS, "momentum": 0.9, "nesterov": True},
    ),
    Case(
        "sgd_weight_decay_momentum",
        ("leaky_relu", "gelu"),
        "mse",
        "real",
        {**SGD_DEFAULTS, "momentum": 0.9, "weight_decay": 0.01},
    ),
    Case("adam", ("relu", "sigmoid"), "binary_cross_entropy", "binary", {**ADAM_DEFAULTS}),
    Case(
        "adam_weight_decay",
        ("tanh", "gelu"),
        "softmax_cross_entropy",
        "labels",
        {**ADAM_DEFAULTS, "weight_decay": 0.01},
    ),
    Case(
        "adamw",
        ("sigmoid", "identity"),
        "mse",
        "real",
        {**ADAM_DEFAULTS, "name": "adamw", "weight_decay": 0.1},
    ),
    Case(
        "sgd_momentum_clip",
        ("relu", "leaky_relu"),
        "mse",
        "real_large",
        {**SGD_DEFAULTS, "momentum": 0.9},
        grad_clip_norm=0.5,
    ),
]

OUTPUT_ACTIVATION = {
    "mse": "identity",
    "binary_cross_entropy": "sigmoid",
    "softmax_cross_entropy": "softmax",
}


def activation_module(name: str) -> nn.Module:
    """Torch module for one of the engine's hidden activations."""
    modules: dict[str, nn.Module] = {
        "identity": nn.Identity(),
        "relu": nn.ReLU(),
        "leaky_relu": nn.LeakyReLU(negative_slope=0.01),
        "sigmoid": nn.Sigmoid(),
        "tanh": nn.Tanh(),
        # The engine's gelu is the tanh approximation.
        "gelu": nn.GELU(approximate="tanh"),
    }
    return modules[name]


def loss_module(loss: str) -> nn.Module:
    """Torch loss on the network's raw outputs (logits for the classification losses)."""
    if loss == "mse":
        return nn.MSELoss(reduction="mean")
    if loss == "binary_cross_entropy":
        return nn.BCEWithLogitsLoss(reduction="mean")
    return nn.CrossEntropyLoss(reduction="mean")


def make_optimizer(params: list[nn.Parameter], opt: dict[str, Any]) -> torch.optim.Optimizer:
    """torch.optim optimizer with exactly the hyper-parameters of the engine spec."""
    if opt["name"] == "sgd":
        return torch.optim.SGD(
            params,
            lr=opt["lr"],
            momentum=opt["momentum"],
            dampening=opt["dampening"],
            nesterov=opt["nesterov"],
            weight_decay=opt["weight_decay"],
        )
    cls = torch.optim.Adam if opt["name"] == "adam" else torch.optim.AdamW
    return cls(
        params,
        lr=opt["lr"],
        betas=tuple(opt["betas"]),
        eps=opt["eps"],
        weight_decay=opt["weight_decay"],
    )


def make_batch(
    rng: np.random.Generator, kind: str, rows: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """A batch x: (rows, INPUT_DIM) and targets y in the engine's format for ``kind``.

    real / real_large: float (rows, OUTPUTS); binary: float {0, 1} (rows, OUTPUTS);
    labels: int64 (rows,); one_hot: float (rows, OUTPUTS) with one 1.0 per row.
    """
    x = np.round(rng.standard_normal((rows, INPUT_DIM)), 6)
    if kind == "real":
        y = np.round(rng.standard_normal((rows, OUTPUTS)), 6)
    elif kind == "real_large":
        # Targets far from the outputs so the global gradient norm exceeds the clip norm.
        y = np.round(3.0 + rng.standard_normal((rows, OUTPUTS)), 6)
    elif kind == "binary":
        y = rng.integers(0, 2, size=(rows, OUTPUTS)).astype(np.float64)
    elif kind == "labels":
        y = rng.integers(0, OUTPUTS, size=rows).astype(np.int64)
    elif kind == "one_hot":
        y = np.eye(OUTPUTS)[rng.integers(0, OUTPUTS, size=rows)]
    else:
        raise ValueError(kind)
    return x, y


def engine_params(model: nn.Sequential) -> dict[str, list[Any]]:
    """Weights (n_in, n_out) and biases (n_out,) of every Linear, engine layout."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    return {
        "weights": [m.weight.detach().T.contiguous().numpy().tolist() for m in linears],
        "biases": [m.bias.detach().numpy().tolist() for m in linears],
    }


def run_case(index: int, case: Case) -> dict[str, Any]:
    """Train one case for STEPS steps and record everything the engine test needs."""
    seed = 1000 + index
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    widths = [INPUT_DIM, *HIDDEN, OUTPUTS]
    modules: list[nn.Module] = []
    for i, act in enumerate(case.hidden):
        modules += [nn.Linear(widths[i], widths[i + 1]), activation_module(act)]
    # The last Linear emits logits; sigmoid/softmax are fused into the torch loss.
    modules.append(nn.Linear(widths[-2], widths[-1]))
    model = nn.Sequential(*modules)  # torch's default init: U(-1/sqrt(n_in), 1/sqrt(n_in))
    params = list(model.parameters())
    optimizer = make_optimizer(params, case.optimizer)
    criterion = loss_module(case.loss)

    spec = {
        "input_dim": INPUT_DIM,
        "layers": [
            {"units": HIDDEN[0], "activation": case.hidden[0]},
            {"units": HIDDEN[1], "activation": case.hidden[1]},
            {"units": OUTPUTS, "activation": OUTPUT_ACTIVATION[case.loss]},
        ],
        "loss": case.loss,
        "optimizer": case.optimizer,
        "dtype": "float64",
        "init": "he_uniform",
        "seed": 0,
        "grad_clip_norm": case.grad_clip_norm,
    }
    record: dict[str, Any] = {
        "name": case.name,
        "target_kind": case.target_kind,
        "spec": spec,
        "initial": engine_params(model),
        "steps": [],
    }

    for _ in range(STEPS):
        x, y = make_batch(rng, case.target_kind, BATCH)
        assert y is not None
        optimizer.zero_grad()
        out = criterion(model(torch.from_numpy(x)), torch.from_numpy(y))
        out.backward()
        grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        if case.grad_clip_norm is not None:
            nn.utils.clip_grad_norm_(params, max_norm=case.grad_clip_norm)
        optimizer.step()
        record["steps"].append(
            {
                "x": x.tolist(),
                "y": y.tolist(),
                "loss": out.item(),
                "grad_norm": grad_norm,
                **engine_params(model),
            }
        )

    x_probe, _ = make_batch(rng, "real", PROBE_ROWS)
    with torch.no_grad():
        logits = model(torch.from_numpy(x_probe))
        if case.loss == "binary_cross_entropy":
            outputs = torch.sigmoid(logits)
        elif case.loss == "softmax_cross_entropy":
            outputs = torch.softmax(logits, dim=1)
        else:
            outputs = logits
    record["probe"] = {"x": x_probe.tolist(), "outputs": outputs.numpy().tolist()}
    return record


def main() -> None:
    torch.set_default_dtype(torch.float64)
    torch.use_deterministic_algorithms(True)
    cases = [run_case(i, case) for i, case in enumerate(CASES)]
    doc = {
        "generator": "tests/engine/reference/make_torch_reference.py",
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "dtype": "float64",
        "steps": STEPS,
        "batch": BATCH,
        "cases": cases,
    }
    OUT_PATH.parent.mkdir(parents=True, exist_ok=True)
    OUT_PATH.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    for case in cases:
        losses = [s["loss"] for s in case["steps"]]
        norms = [s["grad_norm"] for s in case["steps"]]
        print(
            f"{case['name']:28s} loss {losses[0]:.4f} -> {losses[-1]:.4f}"
            f"  grad norm {min(norms):.3f}..{max(norms):.3f}"
        )
    print(f"wrote {OUT_PATH} ({OUT_PATH.stat().st_size} bytes)")


if __name__ == "__main__":
    main()

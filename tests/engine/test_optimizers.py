"""The optimizers' fused updates against a line-by-line transcription of torch.optim's.

``reference_step`` below follows torch.optim's single-tensor SGD, Adam and AdamW step, one
torch operation per line (lerp_, addcmul_, addcdiv_ in torch's own operand order); the
engine's updates reorder some of that arithmetic to take fewer passes over the parameters
(see engine/optimizers.py):

- Adam and AdamW move the bias correction sqrt(1 - beta2^t) from the denominator onto the
  scalars: (lr sqrt(c2) / c1) m / (sqrt(v) + eps sqrt(c2)) instead of
  (lr / c1) m / (sqrt(v) / sqrt(c2) + eps), and take (g g) (1 - beta2) rather than
  ((1 - beta2) g) g;
- SGD adds theta to -lr * g rather than -lr * g to theta, and dampens g before adding it to
  the buffer.

Each reordering changes a parameter by an ulp or two of its update per step, never of the
parameter itself: in float64 the trajectories below agree to 1.4e-16 of the parameters'
scale after 30 steps (SGD's to the bit), and RTOL_FLOAT64 holds them to 1e-14. The
committed torch trajectories (test_torch_reference.py) check the same end to end.
"""

from __future__ import annotations

import math
import tracemalloc
from typing import Any

import numpy as np
import pytest

from propserve.engine.optimizers import make_optimizer
from propserve.engine.spec import OptimizerSpec
from tests.numeric import assert_close

RTOL_FLOAT64 = 1e-14
RTOL_FLOAT32 = 1e-5
STEPS = 30
SIZE = 1000

CONFIGS: list[dict[str, Any]] = [
    {"name": "sgd", "lr": 0.1},
    {"name": "sgd", "lr": 0.1, "weight_decay": 0.01},
    {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    {"name": "sgd", "lr": 0.1, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.01},
    {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    {"name": "adam", "lr": 0.01},
    {"name": "adam", "lr": 0.01, "weight_decay": 0.1, "betas": [0.8, 0.99], "eps": 1e-6},
    {"name": "adamw", "lr": 0.01},
    {"name": "adamw", "lr": 0.01, "weight_decay": 0.0},
]


def _id(config: dict[str, Any]) -> str:
    return "-".join(f"{k}={v}" for k, v in config.items() if k != "lr")


def reference_step(
    spec: OptimizerSpec, theta: np.ndarray, grad: np.ndarray, state: dict[str, Any], t: int
) -> np.ndarray:
    """One step of torch.optim's single-tensor update (float64 numpy), t = 1, 2, ...;
    updates ``state`` in place and returns the new parameters."""
    lr, wd = spec.lr, spec.weight_decay
    if spec.name == "sgd":
        g = grad + wd * theta if wd else grad  # grad.add(param, alpha=wd)
        if spec.momentum:
            # torch.clone(grad) at first, then buf.mul_(momentum).add_(g, alpha=1 - dampening)
            buf = g.copy() if t == 1 else state["buf"] * spec.momentum + (1 - spec.dampening) * g
            state["buf"] = buf
            g = g + spec.momentum * buf if spec.nesterov else buf
        return theta + -lr * g  # param.add_(g, alpha=-lr)
    beta1, beta2 = spec.betas
    if spec.name == "adamw":
        theta = theta * (1 - lr * wd)  # param.mul_(1 - lr * weight_decay)
    elif wd:
        grad = grad + wd * theta  # grad.add(param, alpha=weight_decay)
    m = state.get("m", np.zeros_like(theta))
    v = state.get("v", np.zeros_like(theta))
    m = m + (1 - beta1) * (grad - m)  # exp_avg.lerp_(grad, 1 - beta1)
    v = v * beta2 + (1 - beta2) * grad * grad  # mul_(beta2).addcmul_(grad, grad, 1 - beta2)
    state["m"], state["v"] = m, v
    step_size = lr / (1 - beta1**t)
    denom = np.sqrt(v) / math.sqrt(1 - beta2**t) + spec.eps
    new: np.ndarray = theta + -step_size * m / denom  # param.addcdiv_(m, denom, -step_size)
    return new


def _spec(config: dict[str, Any]) -> OptimizerSpec:
    return OptimizerSpec.from_dict(config)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("config", CONFIGS, ids=_id)
def test_update_follows_torch_step_by_step(config: dict[str, Any], dtype: str) -> None:
    spec = _spec(config)
    rng = np.random.default_rng(3)
    theta = rng.normal(size=SIZE)
    optimizer = make_optimizer(spec, SIZE, np.dtype(dtype))
    ours = theta.astype(dtype)
    state: dict[str, Any] = {}
    rtol = RTOL_FLOAT64 if dtype == "float64" else RTOL_FLOAT32
    for t in range(1, STEPS + 1):
        # gradients of varied scale, some exactly 0, as a network's are
        grad = rng.normal(size=SIZE) * 10.0 ** rng.uniform(-4, 1, size=SIZE)
        grad[rng.uniform(size=SIZE) < 0.1] = 0.0
        grad = grad.astype(dtype)
        theta = reference_step(spec, theta, grad.astype(np.float64), state, t)
        out = np.empty_like(ours)
        optimizer.propose(ours, grad.copy(), spec.lr, out)
        optimizer.commit()
        ours = out
        assert_close(ours, theta, rtol=rtol, label=f"{spec.name} step {t}")
    for name, value in optimizer.slots.items():
        expected = {"momentum_buffer": "buf", "exp_avg": "m", "exp_avg_sq": "v"}[name]
        assert_close(value, state[expected], rtol=rtol, label=f"{name} after {STEPS} steps")


@pytest.mark.parametrize("config", CONFIGS, ids=_id)
def test_propose_reads_theta_and_slots_and_commit_alone_changes_state(
    config: dict[str, Any],
) -> None:
    """Two phases: propose writes only out, grad and the spares; without commit, the next
    proposal starts from the same state and gives the same bits."""
    spec = _spec(config)
    rng = np.random.default_rng(4)
    optimizer = make_optimizer(spec, SIZE, np.dtype("float32"))
    theta = rng.normal(size=SIZE).astype(np.float32)
    for _ in range(3):  # some state first
        out = np.empty_like(theta)
        optimizer.propose(theta, rng.normal(size=SIZE).astype(np.float32), spec.lr, out)
        optimizer.commit()
        theta = out
    theta.flags.writeable = False
    slots = {name: value.copy() for name, value in optimizer.slots.items()}
    grad = rng.normal(size=SIZE).astype(np.float32)
    first = np.empty_like(theta)
    optimizer.propose(theta, grad.copy(), spec.lr, first)  # refused: no commit
    assert optimizer.step == 3
    for name, value in optimizer.slots.items():
        assert np.array_equal(value, slots[name]), name
    second = np.empty_like(theta)
    optimizer.propose(theta, grad.copy(), spec.lr, second)
    assert first.tobytes() == second.tobytes()


@pytest.mark.parametrize("config", CONFIGS, ids=_id)
def test_update_allocates_nothing_parameter_sized(config: dict[str, Any]) -> None:
    """Every pass runs in place on grad, out and the spare slots: no temporaries."""
    spec = _spec(config)
    size = 200_000
    optimizer = make_optimizer(spec, size, np.dtype("float32"))
    rng = np.random.default_rng(5)
    theta = rng.normal(size=size).astype(np.float32)
    for step in range(2):  # sgd's momentum buffer starts differently at step 1
        grad = rng.normal(size=size).astype(np.float32)
        out = np.empty_like(theta)
        tracemalloc.start()
        try:
            optimizer.propose(theta, grad, spec.lr, out)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < size * 4 // 10, f"step {step + 1}: {peak} bytes allocated"
        optimizer.commit()

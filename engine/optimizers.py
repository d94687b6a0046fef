"""Optimizers with torch.optim's semantics, over one flat parameter vector.

Parameters, gradients and optimizer slots are each one flat array (the network lays every
layer's W and b out in one buffer), so an update is a handful of numpy calls whatever the
number of layers.

An update is two-phase so that a refused step changes nothing:

- ``propose(theta, grad, lr, out)`` writes the candidate parameters into ``out`` and the
  candidate slots into spare buffers; ``theta`` and the current slots are only read.
- ``commit()`` makes the candidate slots current and counts the step; skipping it discards
  them.

``grad`` and ``out`` are the update's scratch space: ``propose`` may overwrite ``grad``, and
uses ``out`` before it writes the result there. Every pass runs in place (``out=``) on those
arrays, the spare slots and nothing else, so an update allocates nothing and touches as few
parameter-sized arrays as the double-buffered slots allow.

NOTE: numpy's elementwise operations run on one core and each call is one pass over the
parameters; the passes that reach memory (the first touch of a slot, theta or out) cost
most. Each optimizer below takes the fewest passes its update rule allows in numpy.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from propserve.engine.errors import StateError
from propserve.engine.spec import OptimizerSpec

Array = NDArray[np.floating]


class Optimizer:
    """Common slot bookkeeping: named flat slots, their spares, and the step count."""

    slot_names: tuple[str, ...] = ()
    #: True when the update is theta - lr * grad with no state: the network then fuses it.
    plain_sgd = False

    def __init__(self, spec: OptimizerSpec, size: int, dtype: np.dtype[np.floating]) -> None:
        self.spec = spec
        self.step = 0
        self.slots: dict[str, Array] = {name: np.zeros(size, dtype) for name in self.slot_names}
        self._spare: dict[str, Array] = {name: np.empty(size, dtype) for name in self.slot_names}

    def propose(self, theta: Array, grad: Array, lr: float, out: Array) -> None:
        raise NotImplementedError

    def commit(self) -> None:
        for name in self.slot_names:
            self.slots[name], self._spare[name] = self._spare[name], self.slots[name]
        self.step += 1

    def load(self, slots: dict[str, Array], step: int) -> None:
        """Replace the slots and step count (copied), e.g. from serialised state."""
        if set(slots) != set(self.slot_names):
            raise StateError(
                f"optimizer {self.spec.name!r} expects slots "
                f"{sorted(self.slot_names)}, got {sorted(slots)}"
            )
        for name, value in slots.items():
            if value.shape != self.slots[name].shape:
                raise StateError(
                    f"optimizer slot {name!r} has shape {value.shape}, "
                    f"expected {self.slots[name].shape}"
                )
            np.copyto(self.slots[name], value)
        self.step = step

    def _add_weight_decay(self, theta: Array, grad: Array, scratch: Array) -> None:
        """L2 penalty as torch adds it: g <- g + weight_decay * theta (before momentum)."""
        if self.spec.weight_decay:
            np.multiply(theta, self.spec.weight_decay, out=scratch)
            grad += scratch


class SGD(Optimizer):
    """torch.optim.SGD (maximize=False), step t = 1, 2, ...:

    g  = grad + weight_decay * theta
    b  = g                                  if t == 1   (the buffer starts as g, not 0)
    b  = momentum * b + (1 - dampening) * g otherwise
    g  = g + momentum * b  if nesterov else b           (when momentum != 0)
    theta = theta - lr * g
    """

    def __init__(self, spec: OptimizerSpec, size: int, dtype: np.dtype[np.floating]) -> None:
        if spec.momentum:
            self.slot_names = ("momentum_buffer",)
        super().__init__(spec, size, dtype)
        self.plain_sgd = not spec.momentum and not spec.weight_decay

    def propose(self, theta: Array, grad: Array, lr: float, out: Array) -> None:
        spec = self.spec
        self._add_weight_decay(theta, grad, out)
        if spec.momentum:
            buf = self._spare["momentum_buffer"]
            if self.step == 0:
                np.copyto(buf, grad)
            else:
                np.multiply(self.slots["momentum_buffer"], spec.momentum, out=buf)
                if spec.dampening:  # never with nesterov (the spec refuses it), which reads g
                    grad *= 1.0 - spec.dampening
                buf += grad
            if spec.nesterov:
                np.multiply(buf, spec.momentum, out=out)
                grad += out
            else:
                grad = buf  # the new slot: read from here on, never written
        # theta + (-lr) * g, added in the other order (the same sum)
        np.multiply(grad, -lr, out=out)
        out += theta


class Adam(Optimizer):
    """torch.optim.Adam (amsgrad=False) and, with ``decoupled=True``, torch.optim.AdamW:

        adam:  g = grad + weight_decay * theta
        adamw: theta = theta * (1 - lr * weight_decay)       (decay applied to the weights)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g^2
        theta = theta - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    eps is added after the square root and after bias correction, as torch does.

    NOTE: the last line is computed as theta - (lr sqrt(1 - beta2^t) / (1 - beta1^t)) * m /
    (sqrt(v) + eps sqrt(1 - beta2^t)), the same value with the bias correction moved onto the
    scalars, which saves a pass over the parameters, and g^2 (1 - beta2) is squared in place
    before it is scaled; both round differently from torch by an ulp or two per step
    (tests/engine/test_optimizers.py states the tolerance). m is updated as torch's lerp does,
    m + (1 - beta1) (g - m).
    """

    slot_names = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        spec: OptimizerSpec,
        size: int,
        dtype: np.dtype[np.floating],
        *,
        decoupled: bool = False,
    ) -> None:
        super().__init__(spec, size, dtype)
        self.decoupled = decoupled

    def propose(self, theta: Array, grad: Array, lr: float, out: Array) -> None:
        spec = self.spec
        beta1, beta2 = spec.betas
        t = self.step + 1
        if not self.decoupled:
            self._add_weight_decay(theta, grad, out)
        m, v = self._spare["exp_avg"], self._spare["exp_avg_sq"]
        m_old, v_old = self.slots["exp_avg"], self.slots["exp_avg_sq"]
        # m = m_old + (1 - beta1) (g - m_old)
        np.subtract(grad, m_old, out=m)
        m *= 1.0 - beta1
        m += m_old
        # v = beta2 v_old + (1 - beta2) g^2, g^2 in place of g (out is first written last)
        np.multiply(v_old, beta2, out=v)
        grad *= grad
        grad *= 1.0 - beta2
        v += grad
        # the update, -step m / (sqrt(v) + eps'), into grad (see the class docstring)
        correction2 = math.sqrt(1.0 - beta2**t)
        np.sqrt(v, out=grad)
        grad += spec.eps * correction2
        np.divide(m, grad, out=grad)
        grad *= -lr * correction2 / (1.0 - beta1**t)
        if self.decoupled and spec.weight_decay:
            np.multiply(theta, 1.0 - lr * spec.weight_decay, out=out)
            out += grad
        else:
            np.add(theta, grad, out=out)


def make_optimizer(spec: OptimizerSpec, size: int, dtype: np.dtype[np.floating]) -> Optimizer:
    if spec.name == "sgd":
        return SGD(spec, size, dtype)
    if spec.name in ("adam", "adamw"):
        return Adam(spec, size, dtype, decoupled=spec.name == "adamw")
    raise StateError(f"unknown optimizer {spec.name!r}")

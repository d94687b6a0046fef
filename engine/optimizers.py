"""Optimizers with torch.optim's semantics, over one flat parameter vector.

Parameters, gradients and optimizer slots are each one flat array (the network lays every
layer's W and b out in one buffer), so an update is a handful of numpy calls whatever the
number of layers.

An update is two-phase so that a refused step changes nothing:

- ``propose(theta, grad, lr, out)`` writes the candidate parameters into ``out`` and the
  candidate slots into spare buffers; ``theta`` and the current slots are only read.
- ``commit()`` makes the candidate slots current and counts the step; skipping it discards
  them.

``grad`` is scratch space: ``propose`` may overwrite it.
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
        self._scratch = np.empty(size, dtype)

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

    def _add_weight_decay(self, theta: Array, grad: Array) -> None:
        """L2 penalty as torch adds it: g <- g + weight_decay * theta (before momentum)."""
        if self.spec.weight_decay:
            np.multiply(theta, self.spec.weight_decay, out=self._scratch)
            grad += self._scratch


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
        self._add_weight_decay(theta, grad)
        if spec.momentum:
            buf = self._spare["momentum_buffer"]
            if self.step == 0:
                np.copyto(buf, grad)
            else:
                np.multiply(self.slots["momentum_buffer"], spec.momentum, out=buf)
                if spec.dampening:
                    np.multiply(grad, 1.0 - spec.dampening, out=self._scratch)
                    buf += self._scratch
                else:
                    buf += grad
            if spec.nesterov:
                np.multiply(buf, spec.momentum, out=self._scratch)
                grad += self._scratch
            else:
                grad = buf
        np.multiply(grad, -lr, out=self._scratch)
        np.add(theta, self._scratch, out=out)


class Adam(Optimizer):
    """torch.optim.Adam (amsgrad=False) and, with ``decoupled=True``, torch.optim.AdamW:

        adam:  g = grad + weight_decay * theta
        adamw: theta = theta * (1 - lr * weight_decay)       (decay applied to the weights)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g^2
        theta = theta - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    eps is added after the square root and after bias correction, as torch does.
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
            self._add_weight_decay(theta, grad)
        m, v = self._spare["exp_avg"], self._spare["exp_avg_sq"]
        scratch = self._scratch
        np.multiply(self.slots["exp_avg"], beta1, out=m)
        np.multiply(grad, 1.0 - beta1, out=scratch)
        m += scratch
        np.multiply(self.slots["exp_avg_sq"], beta2, out=v)
        np.multiply(grad, grad, out=scratch)
        scratch *= 1.0 - beta2
        v += scratch
        # denominator sqrt(v) / sqrt(1 - beta2^t) + eps, into scratch
        np.sqrt(v, out=scratch)
        scratch *= 1.0 / math.sqrt(1.0 - beta2**t)
        scratch += spec.eps
        np.divide(m, scratch, out=scratch)
        scratch *= -lr / (1.0 - beta1**t)
        if self.decoupled and spec.weight_decay:
            np.multiply(theta, 1.0 - lr * spec.weight_decay, out=out)
            out += scratch
        else:
            np.add(theta, scratch, out=out)


def make_optimizer(spec: OptimizerSpec, size: int, dtype: np.dtype[np.floating]) -> Optimizer:
    if spec.name == "sgd":
        return SGD(spec, size, dtype)
    if spec.name in ("adam", "adamw"):
        return Adam(spec, size, dtype, decoupled=spec.name == "adamw")
    raise StateError(f"unknown optimizer {spec.name!r}")

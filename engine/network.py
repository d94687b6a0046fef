"""The network: parameters, forward propagation and training steps.

Consistency for concurrent readers
----------------------------------
A network's parameters are published as an immutable :class:`Params` snapshot: one read-only
flat array with every layer's W (n_in, n_out) and b (n_out,) as views into it, and the step that
produced it. A training step never writes into a published snapshot: it writes the updated
parameters into a fresh array and then publishes a new snapshot by swapping one reference.

So a reader gets a consistent view by taking ``net.params`` once (an attribute read, atomic in
Python) and computing with it, e.g. ``forward(net.spec, net.params, x)``: it sees the weights of
exactly one step however many steps finish meanwhile, and never blocks or is blocked. The cost
is one allocation of the parameter vector per step (the update writes it anyway, so no extra
pass over memory) and, while a reader holds an old snapshot, that snapshot's memory.

Training steps and state export serialise on an internal lock; optimizer slots and the
per-batch-size work buffers belong to the writer and are never seen by readers.
"""

from __future__ import annotations

import functools
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from propserve.engine.activations import (
    BACKWARD,
    BACKWARD_IN_PLACE,
    FORWARD,
    FROM_OUTPUT,
    Forward,
    relu_forward,
)
from propserve.engine.errors import DivergedError, InputError, StateError
from propserve.engine.initializers import INITIALIZERS
from propserve.engine.inputs import check_inputs, check_targets
from propserve.engine.losses import FUSED, LOSSES, accuracy
from propserve.engine.optimizers import Optimizer, make_optimizer
from propserve.engine.rowsplit import rows_per_call
from propserve.engine.spec import ModelSpec

Array = NDArray[Any]
_MAX_WORKSPACES = 4  # batch sizes whose training buffers are kept


@dataclass(frozen=True, slots=True)
class Params:
    """An immutable snapshot of a network's parameters after ``step`` training steps.

    flat: (n_params,) read-only; weights[l]: (n_in, n_out) and biases[l]: (n_out,) are views
    into it, laid out as W0, b0, W1, b1, ...
    """

    flat: Array
    weights: tuple[Array, ...]
    biases: tuple[Array, ...]
    step: int


@dataclass(frozen=True, slots=True)
class CheckedBatch:
    """A training batch validated by :meth:`Network.check_batch`, for that network's spec:
    x (batch, input_dim) and y in the form the loss takes, and the learning rate."""

    spec: ModelSpec
    x: Array
    y: Array
    lr: float


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What one training step reports: the loss on the batch before the update, the accuracy
    for classification losses (None for mse), and the step count after the update."""

    loss: float
    accuracy: float | None
    step: int


def layer_views(spec: ModelSpec, flat: Array) -> tuple[tuple[Array, ...], tuple[Array, ...]]:
    """Split a flat parameter (or gradient) vector into per-layer W and b views."""
    weights, biases, offset = [], [], 0
    for n_in, n_out in zip(spec.sizes, spec.sizes[1:], strict=False):
        weights.append(flat[offset : offset + n_in * n_out].reshape(n_in, n_out))
        offset += n_in * n_out
        biases.append(flat[offset : offset + n_out])
        offset += n_out
    return tuple(weights), tuple(biases)


def make_params(
    spec: ModelSpec,
    flat: Array,
    step: int,
    views: tuple[tuple[Array, ...], tuple[Array, ...]] | None = None,
) -> Params:
    """Freeze ``flat`` (it must not be written afterwards) and wrap it as a snapshot.

    ``views``: ``layer_views(spec, flat)`` if the caller made them already; they are frozen
    too (a view made before its base was frozen stays writeable otherwise).
    """
    flat.flags.writeable = False
    if views is None:
        views = layer_views(spec, flat)
    else:
        for view in (*views[0], *views[1]):
            view.flags.writeable = False
    return Params(flat, *views, step)


def initial_params(spec: ModelSpec) -> Array:
    """The spec's initial flat parameter vector: W drawn by spec.init from spec.seed, b = 0."""
    flat = np.zeros(spec.n_params, dtype=spec.dtype)
    weights, _ = layer_views(spec, flat)
    rng = np.random.default_rng(spec.seed)
    draw = INITIALIZERS[spec.init]
    for w in weights:
        w[...] = draw(rng, *w.shape)
    return flat


def forward(spec: ModelSpec, params: Params, x: Array) -> Array:
    """Outputs for x: (batch, input_dim) already validated and in spec.dtype.

    Returns (batch, outputs): probabilities for the cross-entropy losses, the output
    activation otherwise. Pure and allocation-only, so any number of threads may call it.
    Batches of a few rows may be multiplied a few rows at a time (see engine.rowsplit).
    """
    if x.shape[0] == 1:
        return _forward_row(spec, params, x)
    a = x
    last = len(spec.layers) - 1
    # NOTE: overflow to inf (huge inputs or weights) is the caller's to judge from the
    # outputs; numpy's warnings about it are noise here.
    with np.errstate(all="ignore"):
        for i, (w, b, layer) in enumerate(
            zip(params.weights, params.biases, spec.layers, strict=False)
        ):
            rows = a.shape[0]
            if (per_call := rows_per_call(rows, w.shape[0], w.shape[1], w.itemsize)) < rows:
                z = np.empty((rows, w.shape[1]), dtype=w.dtype)
                for start in range(0, rows, per_call):
                    np.matmul(a[start : start + per_call], w, out=z[start : start + per_call])
            else:
                z = np.empty((rows, w.shape[1]), dtype=w.dtype, order=_order(i, last))
                np.matmul(a, w, out=z)
            z += b
            if layer.activation != "identity":
                FORWARD[layer.activation](z, z)
            a = z
    return a


def _forward_row(spec: ModelSpec, params: Params, x: Array) -> Array:
    """:func:`forward` of a single row (1, input_dim), the case of online predictions.

    NOTE: np.dot takes a (1, n) @ (n, m) product to BLAS's matrix-vector kernel as matmul
    does, to the same bits, with less of the ufunc machinery around the call, and there is
    nothing else to decide per layer (docs/performance-log.md has the figures).
    """
    a = x
    with np.errstate(all="ignore"):  # see forward()
        for w, b, layer in zip(params.weights, params.biases, spec.layers, strict=False):
            a = np.dot(a, w)
            a += b
            if layer.activation != "identity":
                FORWARD[layer.activation](a, a)
    return a


def _order(layer: int, last: int) -> Literal["C", "F"]:
    """Memory order of a layer's (batch, units) buffers: column-major for hidden layers.

    NOTE: OpenBLAS through numpy runs a @ W and dZ @ W^T 1.2-2x faster when the (batch, units)
    operands and results are column-major (measured at batch 32 and 256 on A=[784,512,256,10]);
    a_prev^T @ dZ does not care. The output layer stays row-major for the row-wise softmax
    and callers. (The training workspace keeps its output column-major: see _Workspace.)
    """
    return "C" if layer == last else "F"


class _Workspace:
    """Training buffers for one batch size: z, a, dL/dz and dL/da per layer, (batch, units).

    Buffers are shared where the math allows: a is z for identity layers, for a fused output
    and for hidden activations computed in place (see activations.FROM_OUTPUT), and dL/dz is
    dL/da for identity layers and for activations whose backward may run in place (see
    activations.BACKWARD_IN_PLACE). Every buffer is column-major (see :func:`_order`), the
    output layer's too: the loss and accuracy reduce each row of (batch, outputs), which numpy
    does faster across the rows of a column-major array than row by row along a row-major one
    (docs/performance.md, "Engine"). ``activation[i]`` is layer i's forward (None where a is z
    unchanged) and ``apply_backward[i]`` whether its backward runs.
    """

    def __init__(self, spec: ModelSpec, batch: int) -> None:
        last = len(spec.layers) - 1
        self.z: list[Array] = []
        self.a: list[Array] = []
        self.dz: list[Array] = []
        self.da: list[Array] = []
        self.activation: list[Forward | None] = []
        self.apply_backward: list[bool] = []
        # db = ones @ dZ: a BLAS product, about twice as fast as a column sum of dZ.
        self.ones = np.ones(batch, dtype=spec.dtype)
        # NOTE: at batch 1, dW = a_prev^T dZ is an outer product, and numpy's matmul with an
        # inner dimension of 1 is ~15x slower than with 2 (and a broadcast multiply ~4x).
        # So batch 1 copies a_prev and dZ into the first rows of these two-row buffers, whose
        # second rows stay 0, and takes the product with inner dimension 2; adding 0 * 0 is
        # exact, so dW is unchanged.
        self.pad_a: list[Array] = []
        self.pad_dz: list[Array] = []
        if batch == 1:
            for n_in, n_out in zip(spec.sizes, spec.sizes[1:], strict=False):
                self.pad_a.append(np.zeros((2, n_in), dtype=spec.dtype))
                self.pad_dz.append(np.zeros((2, n_out), dtype=spec.dtype))
        # relu's forward against zeros laid out as z (see relu_forward): one read-only buffer
        # of zeros, viewed per layer.
        relu_units = [layer.units for layer in spec.layers if layer.activation == "relu"]
        zeros = np.zeros(batch * max(relu_units, default=0), dtype=spec.dtype)
        zeros.flags.writeable = False
        for i, layer in enumerate(spec.layers):
            z = np.empty((batch, layer.units), dtype=spec.dtype, order="F")
            plain = layer.activation == "identity" or (i == last and spec.loss in FUSED)
            # One buffer fewer per layer to stream through the caches wherever the
            # activation allows it: a in place of z (hidden layers only: the loss reads the
            # output's z and a), dL/dz in place of dL/da.
            in_place = plain or (i < last and layer.activation in FROM_OUTPUT)
            da = np.empty_like(z)
            self.z.append(z)
            self.a.append(z if in_place else np.empty_like(z))
            self.da.append(da)
            shared = plain or layer.activation in BACKWARD_IN_PLACE
            self.dz.append(da if shared else np.empty_like(z))
            self.apply_backward.append(not plain)
            if plain:
                self.activation.append(None)
            elif layer.activation == "relu":
                view = zeros[: z.size].reshape(z.shape, order="F")
                self.activation.append(functools.partial(relu_forward, zeros=view))
            else:
                self.activation.append(FORWARD[layer.activation])


def _forward_into(spec: ModelSpec, params: Params, x: Array, ws: _Workspace) -> tuple[Array, Array]:
    """Forward pass into the workspace; returns the output layer's (z, a)."""
    a_prev = x
    for i, (w, b) in enumerate(zip(params.weights, params.biases, strict=False)):
        z, a = ws.z[i], ws.a[i]
        np.matmul(a_prev, w, out=z)
        z += b
        if (activation := ws.activation[i]) is not None:
            activation(z, a)
        a_prev = a
    return ws.z[-1], ws.a[-1]


def evaluate(spec: ModelSpec, params: Params, x: Any, y: Any) -> tuple[float, float | None]:
    """Loss and accuracy (classification losses) of ``params`` on (x, y), validated as a
    training step's batch would be; nothing changes."""
    x = check_inputs(spec, x)
    y = check_targets(spec, y, x.shape[0])
    with np.errstate(all="ignore"):
        z, a = _forward_into(spec, params, x, _Workspace(spec, x.shape[0]))
        loss = LOSSES[spec.loss](z, a, y, np.empty_like(z))
        return loss, accuracy(spec.loss, z, y)


class Network:
    """A multi-layer perceptron with its optimizer state.

    ``Network(spec)`` starts from the spec's initial parameters; :meth:`from_params` from given
    ones. See the module docstring for how readers get a consistent view while it trains.
    """

    def __init__(self, spec: ModelSpec, flat: Array | None = None, *, step: int = 0) -> None:
        self.spec = spec
        dtype = np.dtype(spec.dtype)
        if flat is None:
            flat = initial_params(spec)
        elif flat.shape != (spec.n_params,):
            raise StateError(f"expected {spec.n_params} parameters, got shape {flat.shape}")
        self._params = make_params(spec, np.array(flat, dtype=dtype), step)
        self._optimizer: Optimizer = make_optimizer(spec.optimizer, spec.n_params, dtype)
        self._optimizer.step = step
        self._grad = np.zeros(spec.n_params, dtype=dtype)
        self._grad_w, self._grad_b = layer_views(spec, self._grad)
        self._workspaces: OrderedDict[int, _Workspace] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_params(
        cls, spec: ModelSpec, weights: Sequence[Array], biases: Sequence[Array], *, step: int = 0
    ) -> Network:
        """A network with the given W (n_in, n_out) and b (n_out,) per layer."""
        if len(weights) != len(spec.layers) or len(biases) != len(spec.layers):
            raise InputError(
                f"expected {len(spec.layers)} weight matrices and bias vectors, "
                f"got {len(weights)} and {len(biases)}"
            )
        flat = np.zeros(spec.n_params, dtype=spec.dtype)
        views_w, views_b = layer_views(spec, flat)
        for i, (given_w, given_b, vw, vb) in enumerate(
            zip(weights, biases, views_w, views_b, strict=True)
        ):
            w, b = np.asarray(given_w), np.asarray(given_b)
            if w.shape != vw.shape or b.shape != vb.shape:
                raise InputError(
                    f"layer {i}: expected W {vw.shape} and b {vb.shape}, got "
                    f"{w.shape} and {b.shape}"
                )
            vw[...] = w
            vb[...] = b
        if not np.isfinite(flat).all():
            raise InputError("parameters must be finite")
        return cls(spec, flat, step=step)

    @property
    def params(self) -> Params:
        """The current snapshot (immutable; see the module docstring)."""
        return self._params

    @property
    def step(self) -> int:
        return self._params.step

    def forward(self, x: Any, params: Params | None = None) -> Array:
        """Validated forward pass of x: (batch, input_dim) with ``params`` (default: current)."""
        x = check_inputs(self.spec, x)
        return forward(self.spec, params or self._params, x)

    def evaluate(self, x: Any, y: Any) -> tuple[float, float | None]:
        """Loss and accuracy of the current parameters on (x, y), without updating."""
        return evaluate(self.spec, self._params, x, y)

    def loss_and_gradient(self, x: Any, y: Any) -> tuple[float, Array]:
        """Loss on (x, y) and its gradient with respect to the flat parameters (a copy laid out
        as ``params.flat``), without clipping or updating anything."""
        x = check_inputs(self.spec, x)
        y = check_targets(self.spec, y, x.shape[0])
        with self._lock, np.errstate(all="ignore"):
            params = self._params
            ws = self._workspace(x.shape[0])
            z, a = self._forward_layers(params, x, ws)
            loss = LOSSES[self.spec.loss](z, a, y, ws.da[-1])
            self._backward(params, x, ws, self._grad_w, self._grad_b)
            return loss, self._grad.copy()

    def train_step(self, x: Any, y: Any, *, lr: float | None = None) -> TrainResult:
        """Forward, loss, backward and one optimizer update on the batch (x, y).

        x: (batch, input_dim); y: see :func:`engine.inputs.check_targets`. ``lr`` overrides the
        spec's learning rate for this step. Raises InputError for bad input and DivergedError
        when the loss or the new parameters are not finite; either way nothing changes. The
        same as :meth:`apply` of :meth:`check_batch`.
        """
        return self.apply(self.check_batch(x, y, lr=lr))

    def check_batch(self, x: Any, y: Any, *, lr: float | None = None) -> CheckedBatch:
        """(x, y, lr) validated for a training step: in the network's dtype, finite, the
        targets matching the loss (InputError otherwise). Nothing changes."""
        spec = self.spec
        x = check_inputs(spec, x)
        y = check_targets(spec, y, x.shape[0])
        if lr is None:
            lr = spec.optimizer.lr
        elif (
            isinstance(lr, bool)
            or not isinstance(lr, int | float)
            or not (math.isfinite(lr) and lr >= 0)
        ):
            raise InputError(f"learning rate must be a finite number >= 0, got {lr!r}")
        return CheckedBatch(self.spec, x, y, float(lr))

    def apply(self, batch: CheckedBatch) -> TrainResult:
        """One training step on a batch :meth:`check_batch` accepted (DivergedError, with
        nothing changed, when the loss or the new parameters are not finite)."""
        if batch.spec is not self.spec and batch.spec != self.spec:
            raise InputError("the batch was checked for another model spec")
        spec, x, y, lr = self.spec, batch.x, batch.y, batch.lr
        # NOTE: overflow and invalid operations are detected below from the loss and the new
        # parameters, and refused; numpy's warnings about them would only be noise.
        with self._lock, np.errstate(all="ignore"):
            params = self._params
            ws = self._workspace(x.shape[0])
            z, a = self._forward_layers(params, x, ws)
            last = len(spec.layers) - 1
            loss = LOSSES[spec.loss](z, a, y, ws.da[last])
            if not math.isfinite(loss):
                raise DivergedError(
                    f"step {params.step + 1} refused: the loss is {loss}; "
                    "the model is unchanged (lower the learning rate?)"
                )
            acc = accuracy(spec.loss, z, y)
            new_flat = np.empty_like(params.flat)
            views = None
            if spec.grad_clip_norm is None and self._optimizer.plain_sgd:
                # Plain sgd, theta - lr * grad, fused: backpropagation is linear in dL/da of
                # the output layer, so scaling that (batch, outputs) array by -lr makes the
                # backward pass write -lr * grad straight into the new parameters, and one
                # pass adds theta. This skips two passes over the parameters.
                ws.da[last] *= -lr
                views = layer_views(spec, new_flat)
                self._backward(params, x, ws, *views)
                np.add(new_flat, params.flat, out=new_flat)
            else:
                self._backward(params, x, ws, self._grad_w, self._grad_b)
                grad = self._grad
                if spec.grad_clip_norm is not None:
                    # torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) if < 1.
                    norm = math.sqrt(float(np.dot(grad, grad)))
                    coef = spec.grad_clip_norm / (norm + 1e-6)
                    if coef < 1.0:
                        grad *= coef
                self._optimizer.propose(params.flat, grad, float(lr), new_flat)
            # NOTE: a NaN or Inf anywhere makes the squared norm non-finite; so does a norm
            # beyond the dtype's range (~1.8e19 in float32), which is divergence too.
            if not math.isfinite(float(np.dot(new_flat, new_flat))):
                raise DivergedError(
                    f"step {params.step + 1} refused: the updated parameters "
                    "are not finite; the model is unchanged"
                )
            self._optimizer.commit()
            self._params = make_params(spec, new_flat, params.step + 1, views)
        return TrainResult(loss, acc, params.step + 1)

    def export_state(self) -> tuple[Params, dict[str, Array], int]:
        """Parameters, copies of the optimizer slots (flat), and the step: a consistent set."""
        with self._lock:
            slots = {name: value.copy() for name, value in self._optimizer.slots.items()}
            return self._params, slots, self._params.step

    def load_optimizer_slots(self, slots: dict[str, Array]) -> None:
        """Restore optimizer slots saved by :meth:`export_state` (at this network's step)."""
        with self._lock:
            self._optimizer.load(slots, self._params.step)

    @property
    def optimizer_slot_names(self) -> tuple[str, ...]:
        return self._optimizer.slot_names

    def to_bytes(self) -> bytes:
        """Parameters, optimizer state and step as safetensors bytes (see serialization)."""
        from propserve.engine.serialization import dump_network  # noqa: PLC0415 - mutual import

        return dump_network(self)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview, **limits: int) -> Network:
        from propserve.engine.serialization import load_network  # noqa: PLC0415 - mutual import

        return load_network(data, **limits)

    # -- internals ---------------------------------------------------------------------

    def _workspace(self, batch: int) -> _Workspace:
        ws = self._workspaces.get(batch)
        if ws is None:
            ws = self._workspaces[batch] = _Workspace(self.spec, batch)
            if len(self._workspaces) > _MAX_WORKSPACES:
                self._workspaces.popitem(last=False)
        else:
            self._workspaces.move_to_end(batch)
        return ws

    def _forward_layers(self, params: Params, x: Array, ws: _Workspace) -> tuple[Array, Array]:
        return _forward_into(self.spec, params, x, ws)

    def _backward(
        self,
        params: Params,
        x: Array,
        ws: _Workspace,
        grad_w: Sequence[Array],
        grad_b: Sequence[Array],
    ) -> None:
        """Write dL/dW and dL/db into grad_w and grad_b, from ws.da[last] = dL/da (or dL/dz
        for fused and identity outputs).

        Per layer, with a_prev its input: dZ = dA * f'(z); dA_prev = dZ W^T;
        dW = a_prev^T dZ; db = sum_rows dZ.
        """
        batch = x.shape[0]
        for i in range(len(self.spec.layers) - 1, -1, -1):
            dz = ws.dz[i]
            if ws.apply_backward[i]:
                BACKWARD[self.spec.layers[i].activation](ws.da[i], ws.z[i], ws.a[i], dz)
            if i > 0:
                np.matmul(dz, params.weights[i].T, out=ws.da[i - 1])
            a_prev = x if i == 0 else ws.a[i - 1]
            if batch == 1:
                # NOTE: see _Workspace.pad_a: an outer product taken as a product of rank 2.
                ws.pad_a[i][0] = a_prev[0]
                ws.pad_dz[i][0] = dz[0]
                np.matmul(ws.pad_a[i].T, ws.pad_dz[i], out=grad_w[i])
            else:
                np.matmul(a_prev.T, dz, out=grad_w[i])
            np.matmul(ws.ones, dz, out=grad_b[i])

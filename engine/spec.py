"""Model specs: plain data that fully determines a fresh network.

A spec is built from a JSON-like dict by :meth:`ModelSpec.from_dict`, validated once there,
and is immutable afterwards. ``ModelSpec.from_dict(spec.to_dict()) == spec`` always holds, and
the same spec (seed included) gives bit-identical initial parameters.

Example::

    {
        "input_dim": 784,
        "layers": [{"units": 512, "activation": "relu"},
                   {"units": 10, "activation": "softmax"}],
        "loss": "softmax_cross_entropy",
        "optimizer": {"name": "adam", "lr": 0.001},
        "dtype": "float32",
        "init": "he_uniform",
        "seed": 0,
        "grad_clip_norm": null
    }
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from propserve.engine.errors import SpecError
from propserve.engine.initializers import INITIALIZERS

HIDDEN_ACTIVATIONS = ("identity", "relu", "leaky_relu", "sigmoid", "tanh", "gelu")
OUTPUT_ACTIVATIONS = (*HIDDEN_ACTIVATIONS, "softmax")
#: Each loss and the output activation it requires (None: any activation but softmax).
LOSS_OUTPUTS: dict[str, str | None] = {
    "mse": None,
    "binary_cross_entropy": "sigmoid",
    "softmax_cross_entropy": "softmax",
}
OPTIMIZERS = ("sgd", "adam", "adamw")
DTYPES = ("float32", "float64")
DEFAULT_MAX_PARAMS = 50_000_000
MAX_LAYERS = 64
MAX_UNITS = 1 << 20

#: torch.optim's defaults, per optimizer: the fields each accepts and their default values.
OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0},
    "adam": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
    "adamw": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2},
}


def _fail(path: str, problem: str) -> SpecError:
    where = f"spec.{path}" if path else "spec"
    return SpecError(f"{where}: {problem}")


def _int(value: Any, path: str, *, minimum: int, maximum: int | None = None) -> int:
    # NOTE: bool is a subclass of int; True is not a width.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, f"expected an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise _fail(path, f"must be {bound}, got {value}")
    return value


def _float(value: Any, path: str, *, minimum: float = 0.0, below: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(path, f"expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < minimum or (below is not None and number >= below):
        bound = f">= {minimum}" if below is None else f"in [{minimum}, {below})"
        raise _fail(path, f"must be a finite number {bound}, got {value!r}")
    return number


def _choice(value: Any, path: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise _fail(path, f"unknown value {value!r}; expected one of {', '.join(choices)}")
    return value


def _mapping(value: Any, path: str, allowed: set[str], required: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(path, f"expected an object, got {type(value).__name__}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise _fail(
            path,
            f"unknown field(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(sorted(allowed))}",
        )
    missing = sorted(required - set(value))
    if missing:
        raise _fail(path, f"missing field(s) {', '.join(map(repr, missing))}")
    return value


@dataclass(frozen=True)
class LayerSpec:
    """One dense layer: ``units`` outputs followed by ``activation``."""

    units: int
    activation: str


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer and its hyper-parameters, with torch.optim's names and defaults.

    Fields that do not apply to ``name`` keep their defaults and are ignored.
    """

    name: str
    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    @classmethod
    def from_dict(cls, data: Any, path: str = "optimizer") -> OptimizerSpec:
        if isinstance(data, str):
            data = {"name": data}
        if not isinstance(data, dict) or "name" not in data:
            raise _fail(path, f"expected an object with a 'name' ({', '.join(OPTIMIZERS)})")
        name = _choice(data["name"], f"{path}.name", OPTIMIZERS)
        defaults = OPTIMIZER_DEFAULTS[name]
        fields = {**defaults, **_mapping(data, path, {"name", *defaults}, {"name"})}
        lr = _float(fields["lr"], f"{path}.lr")
        weight_decay = _float(fields["weight_decay"], f"{path}.weight_decay")
        if name == "sgd":
            momentum = _float(fields["momentum"], f"{path}.momentum")
            dampening = _float(fields["dampening"], f"{path}.dampening")
            nesterov = fields["nesterov"]
            if not isinstance(nesterov, bool):
                raise _fail(f"{path}.nesterov", f"expected true or false, got {nesterov!r}")
            if nesterov and (momentum <= 0.0 or dampening != 0.0):
                raise _fail(path, "nesterov momentum requires momentum > 0 and dampening 0")
            return cls(
                name,
                lr,
                momentum=momentum,
                dampening=dampening,
                nesterov=nesterov,
                weight_decay=weight_decay,
            )
        betas = fields["betas"]
        if not isinstance(betas, list | tuple) or len(betas) != 2:
            raise _fail(f"{path}.betas", f"expected two numbers [beta1, beta2], got {betas!r}")
        beta1 = _float(betas[0], f"{path}.betas[0]", below=1.0)
        beta2 = _float(betas[1], f"{path}.betas[1]", below=1.0)
        eps = _float(fields["eps"], f"{path}.eps")
        return cls(name, lr, weight_decay=weight_decay, betas=(beta1, beta2), eps=eps)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "lr": self.lr, "weight_decay": self.weight_decay}
        if self.name == "sgd":
            out |= {
                "momentum": self.momentum,
                "dampening": self.dampening,
                "nesterov": self.nesterov,
            }
        else:
            out |= {"betas": list(self.betas), "eps": self.eps}
        return out


@dataclass(frozen=True)
class ModelSpec:
    """A multi-layer perceptron: its shape, loss, optimizer, dtype, initialiser and seed."""

    input_dim: int
    layers: tuple[LayerSpec, ...]
    loss: str
    optimizer: OptimizerSpec
    dtype: str = "float32"
    init: str = "he_uniform"
    seed: int = 0
    grad_clip_norm: float | None = None
    sizes: tuple[int, ...] = field(init=False, repr=False, compare=False)
    n_params: int = field(init=False, repr=False, compare=False)
    """Number of trainable scalars: sum of n_in * n_out + n_out over layers."""

    def __post_init__(self) -> None:
        sizes = (self.input_dim, *(layer.units for layer in self.layers))
        object.__setattr__(self, "sizes", sizes)
        pairs = itertools.pairwise(sizes)
        object.__setattr__(self, "n_params", sum((n_in + 1) * n_out for n_in, n_out in pairs))

    @property
    def n_outputs(self) -> int:
        return self.layers[-1].units

    @property
    def output_activation(self) -> str:
        return self.layers[-1].activation

    @classmethod
    def from_dict(cls, data: Any, *, max_params: int = DEFAULT_MAX_PARAMS) -> ModelSpec:
        """Parse and validate a spec; raise :class:`SpecError` naming the offending field."""
        allowed = {
            "input_dim",
            "layers",
            "loss",
            "optimizer",
            "dtype",
            "init",
            "seed",
            "grad_clip_norm",
        }
        data = _mapping(data, "", allowed, {"input_dim", "layers", "loss"})
        input_dim = _int(data["input_dim"], "input_dim", minimum=1, maximum=MAX_UNITS)
        loss = _choice(data["loss"], "loss", tuple(LOSS_OUTPUTS))
        raw_layers = data["layers"]
        if not isinstance(raw_layers, list) or not raw_layers:
            raise _fail("layers", "expected a non-empty list of {units, activation} objects")
        if len(raw_layers) > MAX_LAYERS:
            raise _fail("layers", f"at most {MAX_LAYERS} layers, got {len(raw_layers)}")
        layers = []
        required_output = LOSS_OUTPUTS[loss]
        for i, entry in enumerate(raw_layers):
            path = f"layers[{i}]"
            last = i == len(raw_layers) - 1
            default = (required_output or "identity") if last else None
            raw = _mapping(
                entry,
                path,
                {"units", "activation"},
                {"units"} if default else {"units", "activation"},
            )
            units = _int(raw["units"], f"{path}.units", minimum=1, maximum=MAX_UNITS)
            activation = raw.get("activation", default)
            if not last:
                activation = _choice(activation, f"{path}.activation", HIDDEN_ACTIVATIONS)
            else:
                activation = _choice(activation, f"{path}.activation", OUTPUT_ACTIVATIONS)
                if required_output and activation != required_output:
                    raise _fail(
                        f"{path}.activation",
                        f"loss {loss!r} needs the output "
                        f"activation {required_output!r} (fused with the loss), got "
                        f"{activation!r}",
                    )
                if not required_output and activation == "softmax":
                    raise _fail(
                        f"{path}.activation",
                        "softmax is only available as the output of loss 'softmax_cross_entropy'",
                    )
            layers.append(LayerSpec(units, activation))
        if loss == "softmax_cross_entropy" and layers[-1].units < 2:
            raise _fail("layers[-1].units", "softmax_cross_entropy needs at least 2 classes")
        optimizer = OptimizerSpec.from_dict(data.get("optimizer", {"name": "sgd"}))
        dtype = _choice(data.get("dtype", "float32"), "dtype", DTYPES)
        init = _choice(data.get("init", "he_uniform"), "init", tuple(INITIALIZERS))
        seed = _int(data.get("seed", 0), "seed", minimum=0, maximum=2**63 - 1)
        clip = data.get("grad_clip_norm")
        if clip is not None:
            clip = _float(clip, "grad_clip_norm")
            if clip == 0.0:
                raise _fail("grad_clip_norm", "must be > 0 (or null for no clipping)")
        spec = cls(input_dim, tuple(layers), loss, optimizer, dtype, init, seed, clip)
        if spec.n_params > max_params:
            raise _fail(
                "layers", f"{spec.n_params:,} parameters exceed the limit of {max_params:,}"
            )
        return spec

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_dim": self.input_dim,
            "layers": [{"units": la.units, "activation": la.activation} for la in self.layers],
            "loss": self.loss,
            "optimizer": self.optimizer.to_dict(),
            "dtype": self.dtype,
            "init": self.init,
            "seed": self.seed,
            "grad_clip_norm": self.grad_clip_norm,
        }

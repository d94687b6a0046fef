"""A network's weights as safetensors bytes, in propserve's layout or torch's, and back.

Layouts (see docs/weights.md#layouts):

- ``propserve``: what :func:`~propserve.engine.serialization.dump_network` writes:
  ``layers.{i}.weight`` (n_in, n_out), ``layers.{i}.bias`` (n_out,), and the optimizer's
  slots as ``optimizer.{slot}.layers.{i}.weight|bias``.
- ``torch``: what ``torch.nn.Sequential(...).state_dict()`` holds: ``{k}.weight``
  (out_features, in_features) and ``{k}.bias`` (out_features,), where k is the Linear
  module's index in the Sequential; slots as ``optimizer.{slot}.{k}.weight|bias`` in the
  same shapes.

The module index rule (export): the Sequential is Linear, then the layer's activation
module unless the activation is identity, for each layer in order; softmax counts as a
module (nn.Softmax(dim=1)) like any activation. So relu, relu, identity layers are numbered
0, 2, 4 and identity, relu layers 0, 1. Import takes any indices: the ``{k}.weight`` and
``{k}.bias`` pairs sorted by integer k map to the spec's layers in order.

dtype: F16, F32 and F64 tensors are converted to the spec's dtype, as torch's
``load_state_dict`` copies into its parameters (F64 to float32 rounds to nearest).

Step: a file with all of the spec's optimizer slots starts the network at its metadata
``step``, which it then must have; a file with none of them starts at step 0 with fresh
optimizer state, whatever its metadata says. An optimizer without slots (sgd without
momentum) finds its whole state in any file: it takes the metadata ``step`` when there is
one, else 0.

Every refusal is an :class:`InputError` naming the tensor and what was expected.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from propserve.engine.errors import InputError, StateError
from propserve.engine.network import Network, layer_views
from propserve.engine.optimizers import make_optimizer
from propserve.engine.serialization import FORMAT, FORMAT_VERSION, decode, dump_network, encode
from propserve.engine.spec import ModelSpec

Array = NDArray[Any]

LAYOUTS = ("propserve", "torch")
#: How each layout lays out a layer's weight, for error messages.
_WEIGHT_SHAPE = {"propserve": "(n_in, n_out)", "torch": "(out_features, in_features)"}
# NOTE: no leading zeros, so that "01.weight" cannot stand for layer 1 beside "1.weight".
_INDEX = r"(?:0|[1-9][0-9]*)"
_TORCH_NAME = re.compile(rf"(?:optimizer\.\w+\.)?({_INDEX})\.(?:weight|bias)")
_PROPSERVE_NAME = re.compile(rf"(?:optimizer\.\w+\.)?layers\.{_INDEX}\.(?:weight|bias)")
_MAX_LISTED = 5  # tensor names quoted in one message


def torch_indices(spec: ModelSpec) -> list[int]:
    """Each layer's Linear index k in the torch Sequential that export numbers."""
    indices, k = [], 0
    for layer in spec.layers:
        indices.append(k)
        k += 1 if layer.activation == "identity" else 2
    return indices


def export_weights(net: Network, *, layout: str = "propserve", optimizer: bool = True) -> bytes:
    """The network's parameters (and, with ``optimizer``, its optimizer slots) in ``layout``.

    ``layout="propserve"`` with ``optimizer=True`` is exactly :func:`dump_network`'s bytes.
    Metadata: ``format``, ``spec`` (JSON) and ``step`` (kept without the slots too), plus
    ``format_version`` in propserve's layout and ``layout`` = "torch" in torch's.
    """
    _check_layout(layout)
    if layout == "propserve" and optimizer:
        return dump_network(net)
    spec = net.spec
    params, slots, step = net.export_state()
    keys = _layer_keys(spec, layout)
    tensors = _tensors(spec, params.flat, keys, layout, "")
    if optimizer:
        for slot, flat in slots.items():
            tensors |= _tensors(spec, flat, keys, layout, f"optimizer.{slot}.")
    metadata = {"format": FORMAT}
    if layout == "propserve":
        metadata["format_version"] = FORMAT_VERSION
    else:
        metadata["layout"] = layout
    metadata |= {"spec": json.dumps(spec.to_dict()), "step": str(step)}
    return encode(tensors, metadata)


def import_weights(
    spec: ModelSpec, data: bytes | bytearray | memoryview, *, layout: str = "propserve"
) -> Network:
    """A network of ``spec`` with the weights (and optionally optimizer slots) in ``data``.

    ``data``: safetensors bytes in ``layout``; the spec, not the data's metadata, decides
    the network. Raises InputError naming the tensor for anything that does not fit.
    """
    _check_layout(layout)
    try:
        tensors, metadata = decode(data)
    except StateError as exc:
        raise InputError(f"weights are not safetensors data: {exc}") from None
    stated = metadata.get("layout", layout)
    if stated != layout:
        advice = f"; import them with layout={stated!r}" if stated in LAYOUTS else ""
        raise InputError(f"the weights' metadata says layout {stated!r}, not {layout!r}{advice}")
    keys = _import_keys(spec, tensors, layout)
    slot_names = make_optimizer(spec.optimizer, 0, np.dtype(spec.dtype)).slot_names
    _check_names(spec, tensors, keys, slot_names, layout)
    given = [
        slot
        for slot in slot_names
        if any(name.startswith(f"optimizer.{slot}.") for name in tensors)
    ]
    if given and len(given) != len(slot_names):
        raise InputError(
            f"partial optimizer state: optimizer {spec.optimizer.name!r} keeps slots "
            f"{', '.join(slot_names)}, the weights have only {', '.join(given)}; "
            "give all of them or none"
        )
    for slot in given:
        _check_present(tensors, keys, f"optimizer.{slot}.")
    step = _step(metadata, required=bool(given))
    if slot_names and not given:
        step = 0  # parameters only: fresh optimizer state

    params = _gather(spec, tensors, keys, layout, "")
    net = Network(spec, params, step=step)
    if given:
        net.load_optimizer_slots(
            {slot: _gather(spec, tensors, keys, layout, f"optimizer.{slot}.") for slot in given}
        )
    return net


# -- names --------------------------------------------------------------------------------


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise InputError(f"unknown weights layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


def _layer_keys(spec: ModelSpec, layout: str) -> list[str]:
    """Per layer, the name stem of its weight and bias: ``layers.{i}`` or ``{k}``."""
    if layout == "torch":
        return [str(k) for k in torch_indices(spec)]
    return [f"layers.{i}" for i in range(len(spec.layers))]


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(repr(name) for name in names[:_MAX_LISTED])
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def _other_layout_hint(tensors: dict[str, Array], layout: str) -> str:
    """A hint when the names fit the other layout, else ''."""
    other, pattern = (
        ("torch", _TORCH_NAME) if layout == "propserve" else ("propserve", _PROPSERVE_NAME)
    )
    if tensors and all(pattern.fullmatch(name) for name in tensors):
        return f" (the names look like layout {other!r})"
    return ""


def _import_keys(spec: ModelSpec, tensors: dict[str, Array], layout: str) -> list[str]:
    """The data's layer stems, one per spec layer, in order (torch: sorted by integer k)."""
    if layout == "propserve":
        return _layer_keys(spec, layout)
    indices = sorted(
        {
            int(name.split(".")[0])
            for name in tensors
            if not name.startswith("optimizer.") and _TORCH_NAME.fullmatch(name)
        }
    )
    if len(indices) != len(spec.layers):
        raise InputError(
            f"the weights have {len(indices)} Linear module(s) in torch layout (tensors "
            f"'{{k}}.weight' and '{{k}}.bias' for k in {indices}), the spec has "
            f"{len(spec.layers)} layer(s){_other_layout_hint(tensors, layout)}"
        )
    return [str(k) for k in indices]


def _check_names(
    spec: ModelSpec,
    tensors: dict[str, Array],
    keys: list[str],
    slot_names: tuple[str, ...],
    layout: str,
) -> None:
    """Refuse names that fit no tensor of the spec, and layers lacking a weight or bias."""
    expected = {
        f"{prefix}{key}.{kind}"
        for prefix in ("", *(f"optimizer.{slot}." for slot in slot_names))
        for key in keys
        for kind in ("weight", "bias")
    }
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        slots = ", ".join(slot_names) or "none"
        raise InputError(
            f"unexpected tensor(s) {_listed(unexpected)} for a {len(keys)}-layer spec in "
            f"layout {layout!r}: expected {keys[0]}.weight, {keys[0]}.bias, ... and optimizer "
            f"slots (optimizer {spec.optimizer.name!r} keeps: {slots}) as "
            f"optimizer.{{slot}}.{keys[0]}.weight, ...{_other_layout_hint(tensors, layout)}"
        )
    _check_present(tensors, keys, "", hint=_other_layout_hint(tensors, layout))


def _check_present(tensors: dict[str, Array], keys: list[str], prefix: str, hint: str = "") -> None:
    missing = []
    for key in keys:
        weight, bias = f"{prefix}{key}.weight", f"{prefix}{key}.bias"
        if weight in tensors and bias not in tensors:
            raise InputError(
                f"tensor {weight!r} has no bias {bias!r}: every propserve layer has a bias "
                "(torch: Linear(..., bias=True))"
            )
        if bias in tensors and weight not in tensors:
            raise InputError(f"tensor {bias!r} has no weight {weight!r}")
        if weight not in tensors:
            missing += [weight, bias]
    if missing:
        raise InputError(f"the weights lack tensor(s) {_listed(missing)}{hint}")


def _step(metadata: dict[str, str], *, required: bool) -> int:
    raw = metadata.get("step")
    if raw is None:
        if required:
            raise InputError(
                "optimizer slots are given without a 'step' metadata entry: adam's bias "
                "correction and sgd's momentum start depend on it; add metadata "
                "step=<steps taken> or leave the slots out"
            )
        return 0
    if not (raw.isascii() and raw.isdigit()):
        raise InputError(f"metadata 'step' must be a non-negative integer, got {raw!r}")
    return int(raw)


# -- values -------------------------------------------------------------------------------


def _tensors(
    spec: ModelSpec, flat: Array, keys: list[str], layout: str, prefix: str
) -> dict[str, Array]:
    """Named per-layer tensors of a flat vector, in ``layout``'s shapes."""
    weights, biases = layer_views(spec, flat)
    named = {}
    for key, w, b in zip(keys, weights, biases, strict=True):
        named[f"{prefix}{key}.weight"] = w.T if layout == "torch" else w
        named[f"{prefix}{key}.bias"] = b
    return named


def _gather(
    spec: ModelSpec, tensors: dict[str, Array], keys: list[str], layout: str, prefix: str
) -> Array:
    """A flat vector in spec.dtype from the named tensors (all present), each checked."""
    flat = np.empty(spec.n_params, dtype=spec.dtype)
    views = _tensors(spec, flat, keys, layout, prefix)
    for layer, key in enumerate(keys):
        for kind in ("weight", "bias"):
            name = f"{prefix}{key}.{kind}"
            _convert(name, tensors[name], views[name], layer, layout)
    return flat


def _convert(name: str, saved: Array, view: Array, layer: int, layout: str) -> None:
    """Check one tensor's shape, dtype and values, and copy it into ``view``."""
    if saved.shape != view.shape:
        needed = f"{list(view.shape)}" + (
            f" {_WEIGHT_SHAPE[layout]}" if name.endswith(".weight") else ""
        )
        hint = ""
        if saved.ndim == 2 and saved.shape == view.shape[::-1]:
            other = "torch" if layout == "propserve" else "propserve"
            hint = f"; it is the transpose: are the weights in layout {other!r}?"
        raise InputError(
            f"tensor {name!r} has shape {list(saved.shape)}, layer {layer} of the spec needs "
            f"{needed} in layout {layout!r}{hint}"
        )
    if saved.dtype.kind != "f":
        raise InputError(
            f"tensor {name!r} has dtype {saved.dtype}; weights must be floating point "
            "(F16, F32 or F64)"
        )
    if not np.isfinite(saved).all():
        bad = int(saved.size - np.count_nonzero(np.isfinite(saved)))
        raise InputError(f"tensor {name!r} holds {bad} non-finite value(s) (NaN or Inf)")
    if saved.dtype.itemsize <= view.dtype.itemsize:
        view[...] = saved  # exact: the same dtype or a wider one
        return
    # NOTE: F64 values beyond float32's range become inf in the cast; refused below, so
    # numpy's overflow warning would only be noise.
    with np.errstate(over="ignore"):
        view[...] = saved
    if not np.isfinite(view).all():
        raise InputError(f"tensor {name!r} holds values beyond the range of {view.dtype}")

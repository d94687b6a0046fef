"""Produce the torch-layout weights fixture for the weight import/export tests.

Run it only where torch is installed (it is never a dependency of propserve), e.g. from a
separate virtual environment outside the repository:

    python3 -m venv /tmp/torch-venv
    /tmp/torch-venv/bin/pip install torch safetensors numpy
    /tmp/torch-venv/bin/python tests/engine/reference/make_torch_layout_fixture.py

It writes, next to this folder's parent, in ``tests/engine/data/``:

- ``torch_sequential.safetensors``: ``state_dict()`` of a seeded float32
  ``nn.Sequential(Linear(4, 5), ReLU(), Linear(5, 3), Tanh(), Linear(3, 2))``, saved with
  ``safetensors.torch.save_file``: tensors ``0.weight`` (5, 4), ``0.bias`` (5,),
  ``2.weight`` (3, 5), ``2.bias`` (3,), ``4.weight`` (2, 3), ``4.bias`` (2,);
- ``torch_sequential.json``: the propserve spec of the same network, a few input rows, the
  Sequential's outputs on them, and the torch version that made them.

Floats are written by ``json`` with ``repr`` (each float32 widened exactly to a Python
float), so every value round-trips exactly. The script imports nothing from the project;
``tests/engine/test_weights.py`` reads the two files without torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

DATA = Path(__file__).resolve().parent.parent / "data"
SEED = 0
ROWS = 4

SPEC = {
    "input_dim": 4,
    "layers": [
        {"units": 5, "activation": "relu"},
        {"units": 3, "activation": "tanh"},
        {"units": 2, "activation": "identity"},
    ],
    "loss": "mse",
    "dtype": "float32",
}


def main() -> None:
    torch.manual_seed(SEED)
    model = nn.Sequential(
        nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 2)
    ).to(torch.float32)
    # Biases drawn afresh so that none is small next to its weights' contribution.
    with torch.no_grad():
        for module in model:
            if isinstance(module, nn.Linear):
                module.bias.normal_(0.0, 0.5)
    inputs = torch.randn(ROWS, 4, dtype=torch.float32) * 2.0
    with torch.no_grad():
        outputs = model(inputs)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(DATA / "torch_sequential.safetensors"))
    fixture = {
        "torch_version": torch.__version__,
        "spec": SPEC,
        "tensors": list(state),
        "inputs": [[float(v) for v in row] for row in inputs.tolist()],
        "outputs": [[float(v) for v in row] for row in outputs.tolist()],
    }
    (DATA / "torch_sequential.json").write_text(json.dumps(fixture, indent=1) + "\n")


if __name__ == "__main__":
    main()

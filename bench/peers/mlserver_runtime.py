"""An MLServer runtime doing model A's forward pass in NumPy, for bench/peers/compare.py.

It runs inside MLServer's own virtual environment, never in propserve's: compare.py copies
it beside model-settings.json ("implementation": "mlserver_runtime.DenseMLP"). The weights come
from the .npz named by the model settings' ``parameters.uri`` (arrays W0, b0, W1, b1, ...,
W{i}: (n_in, n_out), b{i}: (n_out,)); hidden layers are relu, the last is softmax, as in
propserve's model A. It is written the way an MLServer user would write it: the NumPy work
runs in ``predict``, on MLServer's event loop, and the codecs are MLServer's own.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from mlserver import MLModel  # type: ignore[import-not-found]
from mlserver.codecs import NumpyCodec  # type: ignore[import-not-found]
from mlserver.types import InferenceRequest, InferenceResponse  # type: ignore[import-not-found]
from mlserver.utils import get_model_uri  # type: ignore[import-not-found]


class DenseMLP(MLModel):  # type: ignore[misc]
    """Dense layers with relu between them and softmax at the end, float32."""

    async def load(self) -> bool:
        path = await get_model_uri(self.settings)
        with np.load(path) as arrays:
            count = len(arrays.files) // 2
            self.layers: list[tuple[Any, Any]] = [
                (arrays[f"W{i}"].astype(np.float32), arrays[f"b{i}"].astype(np.float32))
                for i in range(count)
            ]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        """payload.inputs[0]: (batch, n_in) FP32; answers "probabilities": (batch, n_out)."""
        a = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        for W, b in self.layers[:-1]:
            a = np.maximum(a @ W + b, 0.0)
        W, b = self.layers[-1]
        z = a @ W + b
        # NOTE: subtract each row's max before exp, so large logits cannot overflow.
        z -= z.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)
        return InferenceResponse(
            model_name=self.name,
            outputs=[NumpyCodec.encode_output("probabilities", z)],
        )

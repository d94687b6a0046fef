"""Serialized Open Inference Protocol gRPC requests (inference.ModelInferRequest) for
bench/peers/compare.py, made inside MLServer's venv with MLServer's own dataplane modules.

    .venv-mlserver/bin/python bench/peers/mlserver_requests.py MODEL INPUTS.npz OUT [--raw]

For each array in INPUTS.npz, (rows, n_in) float32, it writes OUT/{name}.bin: one FP32 input
tensor "x" of that shape, its values in ``contents.fp32_contents``, or with --raw as bytes in
``raw_input_contents`` (MLServer then answers in raw bytes too).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
from mlserver.grpc import dataplane_pb2 as pb  # type: ignore[import-not-found]


def infer_request(model: str, x: Any, raw: bool) -> bytes:
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    if raw:
        request.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
    data: bytes = request.SerializeToString()
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("inputs", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--raw", action="store_true", help="values in raw_input_contents")
    args = parser.parse_args(argv)
    with np.load(args.inputs) as arrays:
        for name in arrays.files:
            data = infer_request(args.model, arrays[name], args.raw)
            (args.out / f"{name}.bin").write_bytes(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())

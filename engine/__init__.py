"""propserve's engine: multi-layer perceptrons in pure NumPy.

Forward propagation to predict, backward propagation to learn, optimizers with torch.optim's
semantics, state as safetensors bytes, weights in propserve's or torch's layout, and
ONNX export. No I/O, no threads of its own.

    spec = ModelSpec.from_dict({"input_dim": 64, "layers": [{"units": 64, "activation": "relu"},
                                {"units": 10}], "loss": "softmax_cross_entropy",
                                "optimizer": {"name": "adam", "lr": 1e-3}})
    net = Network(spec)
    result = net.train_step(x, labels)       # TrainResult(loss, accuracy, step)
    probabilities = net.forward(x)
"""

from propserve.engine.errors import DivergedError, EngineError, InputError, SpecError, StateError
from propserve.engine.inputs import all_finite, check_inputs, check_targets
from propserve.engine.network import CheckedBatch, Network, Params, TrainResult, evaluate, forward
from propserve.engine.onnxgraph import ONNX_OPSET, to_onnx
from propserve.engine.serialization import dump_network, load_network
from propserve.engine.spec import DEFAULT_MAX_PARAMS, LayerSpec, ModelSpec, OptimizerSpec
from propserve.engine.weights import LAYOUTS, export_weights, import_weights

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MAX_PARAMS",
    "LAYOUTS",
    "ONNX_OPSET",
    "CheckedBatch",
    "DivergedError",
    "EngineError",
    "InputError",
    "LayerSpec",
    "ModelSpec",
    "Network",
    "OptimizerSpec",
    "Params",
    "SpecError",
    "StateError",
    "TrainResult",
    "__version__",
    "all_finite",
    "check_inputs",
    "check_targets",
    "dump_network",
    "evaluate",
    "export_weights",
    "forward",
    "import_weights",
    "load_network",
    "to_onnx",
]

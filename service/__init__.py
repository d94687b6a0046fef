"""propserve's server: a transport-free core, the model store, and gRPC and REST adapters."""

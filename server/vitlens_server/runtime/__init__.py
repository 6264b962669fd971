"""The data plane: request resolution, batching, caching and scheduling (`runtime.plane`).

`runtime.api` (the domain requests and replies), `runtime.batcher` and `runtime.cache` never
import torch, so the RPC layer can depend on this package without it; import the torch-side
modules (`plane`, `worker`, `evaluation`) by their full names.
"""

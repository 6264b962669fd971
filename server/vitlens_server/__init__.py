"""vitlens server: timm Vision Transformers served over gRPC with explanation methods.

Layers, each importing only the ones below it::

    rpc (grpc.aio servicer) -> runtime (workers) -> explain (methods) -> models (timm)
"""

__all__ = ["__version__"]

__version__ = "0.2.0"

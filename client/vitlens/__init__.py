"""vitlens: a thin Python SDK for the vitlens Vision Transformer explanation service.

    import vitlens

    with vitlens.Client("localhost:50051") as client:
        result = client.explain("cat.jpg", method="generic")
        print(result[0].top.label, result[0].heatmap.shape)  # e.g. (14, 14)

The SDK needs grpcio, protobuf and numpy only; it never imports torch or PIL.
"""

from vitlens.aio import AsyncClient
from vitlens.client import Client
from vitlens.detection import Box, Detection
from vitlens.errors import (
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    FieldViolation,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    Resource,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    VitlensError,
    from_rpc_error,
)
from vitlens.evaluation import Curve, EvaluationResult, MetricResult, Progress, Statistic
from vitlens.images import to_image, to_images
from vitlens.results import (
    Classification,
    ExplainResult,
    Explanation,
    ImageExplanation,
    MethodInfo,
    MethodParameter,
    ModelInfo,
    Prediction,
    TextRelevance,
    Timing,
    Weights,
)
from vitlens.tensors import TensorFormatError, numpy_to_tensor, tensor_to_numpy
from vitlens.vqa import Answer, Regions

__all__ = [
    "Answer",
    "AsyncClient",
    "Box",
    "CancelledError",
    "Classification",
    "Client",
    "Curve",
    "DeadlineExceededError",
    "Detection",
    "EvaluationResult",
    "ExplainResult",
    "Explanation",
    "FailedPreconditionError",
    "FieldViolation",
    "ImageExplanation",
    "InternalError",
    "InvalidArgumentError",
    "MethodInfo",
    "MethodParameter",
    "MetricResult",
    "ModelInfo",
    "NotFoundError",
    "PermissionDeniedError",
    "Prediction",
    "Progress",
    "Regions",
    "Resource",
    "ResourceExhaustedError",
    "Statistic",
    "TensorFormatError",
    "TextRelevance",
    "Timing",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "VitlensError",
    "Weights",
    "__version__",
    "from_rpc_error",
    "numpy_to_tensor",
    "tensor_to_numpy",
    "to_image",
    "to_images",
]

__version__ = "0.2.0"

"""Object detectors on the relevance engine: DETR (seed 003's encoder-decoder)."""

from vitlens_server.models.detection.detr import (
    DETECTION,
    IMAGE,
    QUERIES,
    DetrDetector,
    DetrPass,
    detr_graph,
)
from vitlens_server.models.detection.loading import (
    DetrLoadError,
    Preprocessing,
    load_detr,
    preprocessing,
)

__all__ = [
    "DETECTION",
    "IMAGE",
    "QUERIES",
    "DetrDetector",
    "DetrLoadError",
    "DetrPass",
    "Preprocessing",
    "detr_graph",
    "load_detr",
    "preprocessing",
]

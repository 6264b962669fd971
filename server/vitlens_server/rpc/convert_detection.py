"""Protobuf ↔ domain for object detectors: the request's detection options, the detections.

Decoding keeps what the caller sent (the data plane judges it against the model: thresholds,
query indices); encoding turns each image's `Detections` into ``Detection`` messages.
"""

from __future__ import annotations

from collections.abc import Sequence

from vitlens.tensors import numpy_to_tensor
from vitlens.v1 import vitlens_pb2
from vitlens_server.domain_detection import DetectionQuery, DetectionResult, Detections

__all__ = ["detection_query", "detections", "image_detections", "threshold"]


def detection_query(request: vitlens_pb2.ExplainRequest) -> DetectionQuery | None:
    """ExplainRequest.detection, or None when it is unset."""
    if not request.HasField("detection"):
        return None
    options = request.detection
    return DetectionQuery(
        threshold=options.threshold if options.HasField("threshold") else None,
        max_detections=options.max_detections,
        queries=tuple(options.queries),
    )


def threshold(request: vitlens_pb2.PredictRequest) -> float | None:
    """PredictRequest.detection_threshold, or None when it is unset."""
    return request.detection_threshold if request.HasField("detection_threshold") else None


def detections(found: Detections, labels: Sequence[str]) -> list[vitlens_pb2.Detection]:
    """One image's detections as messages (heatmaps and query relevance when present)."""
    out = []
    for i in range(len(found)):
        label = int(found.labels[i])
        x1, y1, x2, y2 = (float(v) for v in found.boxes[i])
        message = vitlens_pb2.Detection(
            query=int(found.queries[i]),
            prediction=vitlens_pb2.Prediction(
                index=label,
                label=labels[label],
                probability=float(found.probabilities[i]),
                logit=float(found.logits[i]),
            ),
            box=vitlens_pb2.Box(x1=x1, y1=y1, x2=x2, y2=y2),
        )
        if found.heatmaps is not None:
            message.heatmap.CopyFrom(numpy_to_tensor(found.heatmaps[i]))
        if found.query_relevance is not None:
            message.query_relevance.extend(found.query_relevance[i].tolist())
        out.append(message)
    return out


def image_detections(
    result: DetectionResult, image_id: str, labels: Sequence[str]
) -> vitlens_pb2.ImageExplanation:
    """A B = 1 detection result as its image's message."""
    return vitlens_pb2.ImageExplanation(
        id=image_id, detections=detections(result.detections[0], labels)
    )

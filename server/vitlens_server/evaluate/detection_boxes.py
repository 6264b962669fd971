"""COCO box AP and AR of detections, by pycocotools' COCOeval (COCO's IoU thresholds and areas).

Used for the exemplar detector's held-out mAP (`training.detr_eval`) and Evaluate's
``detection`` metric (`evaluate.detection_run`).
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ["coco_boxes"]


def coco_boxes(
    truth: list[tuple[np.ndarray, np.ndarray]],
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    size: int | tuple[int, int],
) -> dict[str, float]:
    """COCO box AP and AR of detections against ground truth, image by image.

    Args:
        truth: per image (labels (K,), pixel boxes (K, 4) x1 y1 x2 y2).
        found: per image (scores (D,), labels (D,), pixel boxes (D, 4)).
        size: the images' (H, W) in pixels, or their side.

    Returns:
        ``map`` (AP at IoU 0.5:0.95), ``map50``, ``map75`` and ``mar100`` (AR, 100 detections).
    """
    height, width = (size, size) if isinstance(size, int) else size
    images = [{"id": i, "width": width, "height": height} for i in range(len(truth))]
    annotations, detections = [], []
    for image, (labels, boxes) in enumerate(truth):
        for label, box in zip(labels, boxes, strict=True):
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image,
                    "category_id": int(label),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    for image, (scores, labels, boxes) in enumerate(found):
        for score, label, box in zip(scores, labels, boxes, strict=True):
            x1, y1, x2, y2 = (float(v) for v in box)
            detections.append(
                {
                    "image_id": image,
                    "category_id": int(label),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(score),
                }
            )
    labels = {a["category_id"] for a in annotations} | {d["category_id"] for d in detections}
    categories = [{"id": i, "name": str(i)} for i in sorted(labels)]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        ground = COCO()
        ground.dataset = {"images": images, "annotations": annotations, "categories": categories}
        ground.createIndex()
        result = ground.loadRes(detections) if detections else COCO()
        evaluation = COCOeval(ground, result, "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = evaluation.stats
    return {"map": stats[0], "map50": stats[1], "map75": stats[2], "mar100": stats[8]}

"""Box mAP of a detector on held-out detection scenes, by pycocotools' COCOeval.

Every query's most probable object class is a detection, scored by that probability, as DETR's
own COCO evaluation does; ground truth is `scene_boxes` of each scene. COCO's area ranges and
its 100 detections per image are kept (a scene holds at most 4 objects, the model 8 queries).
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from transformers import DetrForObjectDetection

from vitlens_server.data import CLASSES, split_seeds
from vitlens_server.data.detection import detection_batch
from vitlens_server.training.accuracy import to_model_input
from vitlens_server.training.detr_model import MEAN, STD

__all__ = ["coco_boxes", "detection_map", "query_detections"]


def query_detections(
    logits: torch.Tensor, boxes: torch.Tensor, size: int
) -> tuple[np.ndarray, ...]:
    """DETR outputs → (scores (B, Q), labels (B, Q), pixel boxes (B, Q, 4) x1 y1 x2 y2).

    logits: (B, Q, C + 1), the last class "no object"; boxes: (B, Q, 4) normalised cx cy w h.
    """
    probs = logits.float().softmax(-1)[..., :-1]  # (B, Q, C)
    scores, labels = probs.max(-1)
    cx, cy, w, h = boxes.float().unbind(-1)
    corners = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * size
    return scores.numpy(), labels.numpy(), corners.numpy()


def coco_boxes(
    truth: list[tuple[np.ndarray, np.ndarray]],
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    size: int,
) -> dict[str, float]:
    """COCO box AP and AR of detections against ground truth, image by image.

    Args:
        truth: per image (labels (K,), pixel boxes (K, 4) x1 y1 x2 y2).
        found: per image (scores (D,), labels (D,), pixel boxes (D, 4)).
        size: the images' side in pixels.

    Returns:
        ``map`` (AP at IoU 0.5:0.95), ``map50``, ``map75`` and ``mar100`` (AR, 100 detections).
    """
    images = [{"id": i, "width": size, "height": size} for i in range(len(truth))]
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
    categories = [{"id": i, "name": name} for i, name in enumerate(CLASSES)]
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


@torch.inference_mode()
def detection_map(
    model: DetrForObjectDetection,
    split: str = "test",
    count: int = 500,
    *,
    batch_size: int = 32,
) -> dict[str, Any]:
    """COCO box metrics (`coco_boxes`) of ``model`` on the first ``count`` scenes of ``split``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    seeds = split_seeds(split, count)
    truth, found = [], []
    for start in range(0, count, batch_size):
        batch = detection_batch(seeds[start : start + batch_size])
        pixels = to_model_input(batch.images, MEAN, STD, device)
        out = model(pixel_values=pixels.to(next(model.parameters()).dtype))
        scores, labels, boxes = query_detections(
            out.logits.cpu(), out.pred_boxes.cpu(), pixels.shape[-1]
        )
        truth += list(zip(batch.labels, batch.boxes, strict=True))
        found += list(zip(scores, labels, boxes, strict=True))
    model.train(was_training)
    metrics = coco_boxes(truth, found, pixels.shape[-1])
    return {"count": count, **{k: round(float(v), 4) for k, v in metrics.items()}}

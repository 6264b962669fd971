"""Box mAP of a detector on held-out detection scenes, by pycocotools' COCOeval.

Every query's most probable object class is a detection, scored by that probability, as DETR's
own COCO evaluation does; ground truth is `scene_boxes` of each scene. COCO's area ranges and
its 100 detections per image are kept (a scene holds at most 4 objects, the model 8 queries).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import DetrForObjectDetection

from vitlens_server.data import split_seeds
from vitlens_server.data.detection import detection_batch
from vitlens_server.evaluate.detection_boxes import coco_boxes
from vitlens_server.training.accuracy import to_model_input
from vitlens_server.training.detr_model import MEAN, STD

__all__ = ["detection_map", "query_detections"]


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


@torch.inference_mode()
def detection_map(
    model: DetrForObjectDetection,
    split: str = "test",
    count: int = 500,
    *,
    batch_size: int = 32,
) -> dict[str, Any]:
    """COCO box metrics (`evaluate.detection_boxes.coco_boxes`) of ``model`` on the first
    ``count`` scenes of ``split``."""
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

"""Weakly supervised segmentation of a detector's explanations (METHODS.md
`detection_segmentation`; seed 003 Tab. 1).

Every detection whose class probability exceeds 0.5 is explained; its map becomes a mask

    M = minmax(upsample(map))        bilinear to the image's H x W, then scaled to [0, 1]
    Ŷ = M > t                        t = Otsu's threshold of M (`segmentation.threshold_maps`)

and the masks, scored by their detection's probability, are evaluated against the ground-truth
object masks as COCO instance segmentations (pycocotools' COCOeval, ``iouType="segm"``).

Choices the paper leaves open, fixed here:

- IoU thresholds: seed 003 lowers "the minimal IoU used for MSCOCO evaluation from 0.5 to 0.2".
  Its authors' code (their README) does this by replacing COCO's ``np.linspace(.5, .95, 10)`` with
  ``np.linspace(.2, .95, 16)``: 16 thresholds 0.20, 0.25, ..., 0.95, the step kept at 0.05. So
  ``ap`` and ``ar`` here are means over those 16 thresholds (``iou_low=0.5`` gives COCO's own
  10), ``ap20`` and ``ap50`` the AP at one threshold. A match needs IoU ≥ the threshold, as in
  COCOeval; thresholds are compared with COCOeval's float values, so an IoU exactly on a
  threshold may fall either side of it.
- Area ranges: COCO's small / medium / large cut at 32² and 96² pixels of COCO images, which are
  about 640 x 480. The vitlens scenes are 224 x 224, where every object would be "medium" and
  none "large" on those absolute cuts, and Tab. 1's AP_large / AR_large columns would be empty.
  With ``areas="image"`` (the default) the cuts are the same *fractions of the image area*
  (32² / (640·480) = 1/300 and 96² / (640·480) = 3 %: 167 px and 1,505 px at 224²), so a
  subset holds the objects it would hold in a COCO image shown at that size, and the medium and
  large columns compare with Tab. 1's. ``areas="coco"`` keeps COCO's absolute cuts. Tab. 1
  leaves out small objects (its footnote); ``ap_small`` and ``ar_small`` are reported anyway,
  and are NaN when no object is small (none of the scenes' objects is, at 224 px).
- "No data" is NaN: where COCOeval has nothing to average (no ground-truth object in a subset,
  or a threshold outside ``[iou_low, 0.95]``) its summary says -1; here that is NaN, so it can
  never be mistaken for a score or averaged in. Images without detections count as COCO counts
  them: their objects are misses (AP and AR 0 when no image has a detection). Detections of a
  class no image holds are ignored, as COCOeval ignores them.
- At most 100 detections per image count (COCO's ``maxDets``); ``ar`` is AR@100.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from vitlens_server.evaluate.primitives import min_max, upsample_maps
from vitlens_server.evaluate.segmentation import threshold_maps

__all__ = [
    "COCO_IMAGE_AREA",
    "DETECTION_SEGMENTATION_KEYS",
    "MIN_PROBABILITY",
    "class_ap",
    "coco_mask_scores",
    "detection_masks",
    "encode_masks",
    "mask_evaluation",
    "mask_ious",
    "masked_detections",
]

Areas = Literal["image", "coco"]
Array = np.ndarray | Tensor

MIN_PROBABILITY = 0.5  # seed 003: "the classification probability is higher than 50%"
COCO_IMAGE_AREA = 640 * 480  # the COCO image COCO's 32² / 96² area cuts are fractions of
IOU_STEP = 0.05
IOU_HIGH = 0.95
MAX_DETECTIONS = 100
DETECTION_SEGMENTATION_KEYS = (
    "ap", "ap20", "ap50", "ap_small", "ap_medium", "ap_large",
    "ar", "ar_small", "ar_medium", "ar_large",
)  # fmt: skip
_AREA_LABELS = ("all", "small", "medium", "large")


def detection_masks(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Foreground masks of explanation maps: (n, gh, gw) → (n, H, W) bool.

    Bilinear upsampling to ``size`` (H, W), min-max scaling of each map, then Otsu's threshold of
    each (`threshold_maps`). A constant map gives an empty mask.
    """
    if maps.shape[0] == 0:
        return torch.zeros((0, *size), dtype=torch.bool, device=maps.device)
    scaled = min_max(upsample_maps(maps.float(), tuple(size)))  # (n, H, W) in [0, 1]
    return threshold_maps(scaled, "otsu")


def masked_detections(
    scores: Array,
    labels: Array,
    maps: Tensor,
    size: tuple[int, int],
    *,
    min_probability: float = MIN_PROBABILITY,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's detections kept for the metric, with their maps' masks.

    Args:
        scores: (Q,) each query's class probability.
        labels: (Q,) each query's class index.
        maps: (Q, gh, gw) each query's explanation map.
        size: the image's (H, W).
        min_probability: queries with a probability above it are kept (seed 003: 0.5).

    Returns:
        ``found`` for `coco_mask_scores`: scores (D,) float64, labels (D,) int64 and masks
        (D, H, W) bool of the D kept queries.
    """
    scores, labels = _numpy(scores).astype(np.float64), _numpy(labels).astype(np.int64)
    keep = scores > min_probability  # (Q,)
    masks = detection_masks(maps[torch.from_numpy(keep).to(maps.device)], size)
    return scores[keep], labels[keep], _numpy(masks)


def mask_ious(found: Array, truth: Array) -> np.ndarray:
    """IoU of every found mask with every true mask of one image: (D, H, W) x (K, H, W) → (D, K)
    float64; 0 where both masks are empty."""
    f = _numpy(found).reshape(len(found), -1).astype(np.float64)  # (D, H·W)
    t = _numpy(truth).reshape(len(truth), -1).astype(np.float64)  # (K, H·W)
    inter = f @ t.T
    union = f.sum(1)[:, None] + t.sum(1)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def encode_masks(masks: Array) -> list[dict]:
    """(K, H, W) bool masks → K COCO compressed RLEs ``{"size": [H, W], "counts": bytes}``."""
    masks = _numpy(masks).astype(np.uint8)
    if len(masks) == 0:
        return []
    return mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))  # wants (H, W, K)


def mask_evaluation(
    truth: Sequence[tuple[Array, Array]],
    found: Sequence[tuple[Array, Array, Array]],
    size: tuple[int, int],
    *,
    iou_low: float = 0.2,
    areas: Areas = "image",
) -> COCOeval:
    """COCOeval of found masks against true masks, evaluated and accumulated (nothing printed).

    Args:
        truth: per image (labels (K,), masks (K, H, W) bool).
        found: per image (scores (D,), labels (D,), masks (D, H, W) bool); D may be 0.
        size: every image's (H, W).
        iou_low: the lowest IoU threshold; thresholds run from it to 0.95 in steps of 0.05
            (0.2: seed 003's 16 thresholds; 0.5: COCO's 10).
        areas: ``"image"`` COCO's small / medium / large cuts as fractions of the image area,
            ``"coco"`` COCO's absolute 32² / 96² pixels (see the module's notes).
    """
    if len(truth) != len(found):
        raise ValueError(f"{len(truth)} images of ground truth but {len(found)} of detections")
    height, width = size
    thresholds = _iou_thresholds(iou_low)
    images = [{"id": i, "height": height, "width": width} for i in range(len(truth))]
    annotations, detections = [], []
    for image, (labels, masks) in enumerate(truth):
        _check_masks(masks, labels, size, f"truth of image {image}")
        for label, rle, area in zip(
            _numpy(labels), encode_masks(masks), _numpy(masks).sum((1, 2)), strict=True
        ):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image,
                    "category_id": int(label),
                    "segmentation": rle,
                    "area": float(area),
                    "iscrowd": 0,
                }
            )
    for image, (scores, labels, masks) in enumerate(found):
        _check_masks(masks, labels, size, f"detections of image {image}")
        if len(scores) != len(labels):
            raise ValueError(
                f"detections of image {image}: {len(scores)} scores but {len(labels)} labels"
            )
        rles = encode_masks(masks)
        for score, label, rle in zip(_numpy(scores), _numpy(labels), rles, strict=True):
            detections.append(
                {
                    "image_id": image,
                    "category_id": int(label),
                    "segmentation": rle,
                    "score": float(score),
                }
            )
    categories = sorted({a["category_id"] for a in annotations + detections})
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        ground = COCO()
        ground.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": c, "name": str(c)} for c in categories],
        }
        ground.createIndex()
        result = ground.loadRes(detections) if detections else COCO()
        evaluation = COCOeval(ground, result, "segm")
        evaluation.params.iouThrs = thresholds
        evaluation.params.maxDets = [1, 10, MAX_DETECTIONS]
        evaluation.params.areaRng = _area_ranges(areas, height * width)
        evaluation.params.areaRngLbl = list(_AREA_LABELS)
        evaluation.evaluate()
        evaluation.accumulate()
    return evaluation


def coco_mask_scores(
    truth: Sequence[tuple[Array, Array]],
    found: Sequence[tuple[Array, Array, Array]],
    size: tuple[int, int],
    *,
    iou_low: float = 0.2,
    areas: Areas = "image",
) -> dict[str, float]:
    """COCO mask AP and AR of found masks against true masks (arguments as `mask_evaluation`).

    Returns, under `DETECTION_SEGMENTATION_KEYS` (NaN where COCOeval has no data):
        ``ap``: AP averaged over the IoU thresholds ``iou_low``:0.95 (seed 003's "AP");
        ``ap20``, ``ap50``: AP at IoU 0.2 and 0.5 (NaN if below ``iou_low``);
        ``ap_small``, ``ap_medium``, ``ap_large``: ``ap`` of each area subset;
        ``ar``: recall with at most 100 detections per image, averaged over the thresholds;
        ``ar_small``, ``ar_medium``, ``ar_large``: ``ar`` of each area subset.
    """
    evaluation = mask_evaluation(truth, found, size, iou_low=iou_low, areas=areas)
    precision = evaluation.eval["precision"]  # (T, R, K, A, M): thresholds, recalls, classes...
    recall = evaluation.eval["recall"]  # (T, K, A, M)
    thresholds = evaluation.params.iouThrs
    last = len(evaluation.params.maxDets) - 1  # 100 detections

    def at(iou: float) -> list[int]:  # the index of threshold ``iou``; none if not evaluated
        return [int(i) for i in np.flatnonzero(np.isclose(thresholds, iou))]

    scores = {
        "ap": _mean(precision[:, :, :, 0, last]),
        "ap20": _mean(precision[at(0.2), :, :, 0, last]),
        "ap50": _mean(precision[at(0.5), :, :, 0, last]),
        "ar": _mean(recall[:, :, 0, last]),
    }
    for area, label in enumerate(_AREA_LABELS[1:], 1):
        scores[f"ap_{label}"] = _mean(precision[:, :, :, area, last])
        scores[f"ar_{label}"] = _mean(recall[:, :, area, last])
    return {key: scores[key] for key in DETECTION_SEGMENTATION_KEYS}


def class_ap(evaluation: COCOeval) -> dict[int, float]:
    """Each evaluated class's AP (all areas, 100 detections, averaged over the IoU thresholds),
    by class index; NaN for a class no image holds."""
    precision = evaluation.eval["precision"][:, :, :, 0, -1]  # (T, R, K)
    return {int(cat): _mean(precision[:, :, k]) for k, cat in enumerate(evaluation.params.catIds)}


def _iou_thresholds(iou_low: float) -> np.ndarray:
    """COCOeval's thresholds from ``iou_low`` to 0.95 in steps of 0.05, as COCO builds its own."""
    steps = (IOU_HIGH - iou_low) / IOU_STEP
    if not 0 < iou_low <= IOU_HIGH or abs(steps - round(steps)) > 1e-9:
        raise ValueError(f"iou_low must be one of 0.05, 0.10, ..., 0.95; got {iou_low}")
    return np.linspace(iou_low, IOU_HIGH, int(np.round(steps)) + 1, endpoint=True)


def _area_ranges(areas: Areas, image_area: int) -> list[list[float]]:
    """COCOeval's area ranges (all, small, medium, large) in pixels."""
    if areas == "coco":
        scale = 1.0
    elif areas == "image":
        scale = image_area / COCO_IMAGE_AREA
    else:
        raise ValueError(f"areas must be 'image' or 'coco'; got {areas!r}")
    small, large = 32**2 * scale, 96**2 * scale
    return [[0.0, 1e10], [0.0, small], [small, large], [large, 1e10]]


def _mean(values: np.ndarray) -> float:
    """The mean of the entries COCOeval filled (> -1); NaN where there are none."""
    filled = values[values > -1]
    return float(filled.mean()) if filled.size else float("nan")


def _check_masks(masks: Array, labels: Array, size: tuple[int, int], what: str) -> None:
    shape = tuple(_numpy(masks).shape)
    if len(shape) != 3 or shape[1:] != tuple(size) or shape[0] != len(labels):
        raise ValueError(
            f"{what}: masks must be (K, {size[0]}, {size[1]}) for {len(labels)} labels; got {shape}"
        )


def _numpy(values: Array) -> np.ndarray:
    if isinstance(values, Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)

"""Weakly supervised segmentation of detections (seed 003 Tab. 1) on hand-made masks.

Every expected number is counted by hand: with one object and one detection that overlaps it
with IoU u, the detection is a true positive at each of the 16 thresholds 0.20, 0.25, ..., 0.95
that u reaches and a miss at the others, so AP = AR = (thresholds ≤ u) / 16.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vitlens_server.evaluate.detection_segmentation import (
    DETECTION_SEGMENTATION_KEYS,
    class_ap,
    coco_mask_scores,
    detection_masks,
    mask_evaluation,
    mask_ious,
    masked_detections,
)

SIZE = (32, 32)
NONE = (np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros((0, *SIZE), dtype=bool))


def _box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """(H, W) bool mask of rows y0:y1 and columns x0:x1."""
    mask = np.zeros(SIZE, dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


SQUARE = _box(5, 15, 5, 15)  # 100 pixels


def _one(found: np.ndarray, label: int = 0, **kwargs: object) -> dict[str, float]:
    """Scores of one detection ``found`` (H, W) against the one object SQUARE of class 0."""
    truth = [(np.array([0]), SQUARE[None])]
    found_one = (np.array([0.9]), np.array([label]), found[None])
    return coco_mask_scores(truth, [found_one], SIZE, **kwargs)


def test_a_perfect_mask_scores_one() -> None:
    scores = _one(SQUARE)
    assert tuple(scores) == DETECTION_SEGMENTATION_KEYS
    for key in ("ap", "ap20", "ap50", "ap_large", "ar", "ar_large"):
        assert scores[key] == pytest.approx(1.0), key


@pytest.mark.parametrize(
    ("found", "iou", "passed"),
    [
        (_box(5, 15, 7, 17), 80 / 120, 10),  # shifted 2 px: IoU 2/3 reaches 0.20 ... 0.65
        (_box(6, 14, 6, 14), 64 / 100, 9),  # shrunk to 8 x 8: 0.20 ... 0.60
        (_box(5, 12, 5, 11), 42 / 100, 5),  # shrunk to 7 x 6: 0.20 ... 0.40
        (_box(5, 15, 5, 8), 30 / 100, 2),  # IoU 0.3: 0.20, 0.25 (COCOeval's "0.3" is 0.3 + 4e-17)
    ],
)
def test_shifted_or_shrunk_masks_score_less(found: np.ndarray, iou: float, passed: int) -> None:
    np.testing.assert_allclose(mask_ious(found[None], SQUARE[None]), [[iou]])
    scores = _one(found)
    assert scores["ap"] == pytest.approx(passed / 16)
    assert scores["ar"] == pytest.approx(passed / 16)


def test_iou_threshold_two_tenths_accepts_what_one_half_rejects() -> None:
    third = _box(5, 15, 5, 8)  # 30 of SQUARE's 100 pixels: IoU exactly 0.3
    assert mask_ious(third[None], SQUARE[None])[0, 0] == 0.3
    low = _one(third)
    assert low["ap20"] == pytest.approx(1.0)
    assert low["ap50"] == 0.0
    coco = _one(third, iou_low=0.5)  # COCO's own thresholds 0.50 ... 0.95
    assert coco["ap"] == 0.0 and coco["ap50"] == 0.0 and coco["ar"] == 0.0
    assert math.isnan(coco["ap20"])  # not a threshold COCO evaluates


def test_a_detection_of_the_wrong_class_scores_zero_for_that_class() -> None:
    other = _box(20, 30, 20, 30)
    truth = [(np.array([0, 1]), np.stack([SQUARE, other]))]
    # the class-0 object found exactly; the class-1 object found exactly but called class 2
    found = [(np.array([0.9, 0.8]), np.array([0, 2]), np.stack([SQUARE, other]))]
    per_class = class_ap(mask_evaluation(truth, found, SIZE))
    assert per_class[0] == pytest.approx(1.0)
    assert per_class[1] == 0.0
    assert math.isnan(per_class[2])  # no object of class 2: COCO ignores its detections
    assert coco_mask_scores(truth, found, SIZE)["ap"] == pytest.approx(0.5)
    assert _one(SQUARE, label=1)["ap"] == 0.0


def test_a_confident_false_detection_lowers_precision() -> None:
    # image 0: one hit (score 0.9); image 1: a miss (score 0.95) before a hit (score 0.5).
    # Ranked: miss, hit, hit → precision 0, 1/2, 2/3 at recall 0, 1/2, 1; interpolated: 2/3.
    truth = [(np.array([0]), SQUARE[None]), (np.array([0]), SQUARE[None])]
    found = [
        (np.array([0.9]), np.array([0]), SQUARE[None]),
        (np.array([0.95, 0.5]), np.array([0, 0]), np.stack([_box(20, 30, 20, 30), SQUARE])),
    ]
    scores = coco_mask_scores(truth, found, SIZE)
    assert scores["ap"] == pytest.approx(2 / 3)
    assert scores["ar"] == pytest.approx(1.0)


def test_images_without_detections_and_no_data() -> None:
    truth = [(np.array([0]), SQUARE[None]), (np.array([0]), SQUARE[None])]
    half = coco_mask_scores(truth, [(np.array([0.9]), np.array([0]), SQUARE[None]), NONE], SIZE)
    # recall reaches 1/2 at precision 1: COCO's 101 recall points 0, 0.01, ..., 0.5 get 1
    assert half["ap"] == pytest.approx(51 / 101) and half["ar"] == pytest.approx(0.5)
    missed = coco_mask_scores(truth, [NONE, NONE], SIZE)
    assert missed["ap"] == 0.0 and missed["ar"] == 0.0
    empty = coco_mask_scores([(NONE[1], NONE[2])], [NONE], SIZE)  # no object anywhere
    assert all(math.isnan(value) for value in empty.values())


def test_area_ranges_are_coco_fractions_of_the_image() -> None:
    # at 32 x 32 the cuts are 1024 / 300 = 3.4 px and 3 % = 30.7 px: a 100-pixel object is
    # large, a 25-pixel one medium, a 3-pixel one small; COCO's absolute cuts make all three small
    masks = np.stack([SQUARE, _box(20, 25, 20, 25), _box(30, 31, 0, 3)])
    labels = np.array([0, 1, 2])
    truth, found = [(labels, masks)], [(np.array([0.9, 0.8, 0.7]), labels, masks)]
    image = coco_mask_scores(truth, found, SIZE)
    coco = coco_mask_scores(truth, found, SIZE, areas="coco")
    for key in ("ap_small", "ap_medium", "ap_large", "ar_small", "ar_medium", "ar_large"):
        assert image[key] == pytest.approx(1.0), key
    assert coco["ap_small"] == pytest.approx(1.0)
    assert math.isnan(coco["ap_medium"]) and math.isnan(coco["ar_large"])
    only_large = _one(SQUARE)
    assert math.isnan(only_large["ap_small"]) and math.isnan(only_large["ar_medium"])


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="iou_low must be one of"):
        _one(SQUARE, iou_low=0.22)
    with pytest.raises(ValueError, match="areas must be"):
        _one(SQUARE, areas="relative")
    with pytest.raises(ValueError, match=r"masks must be \(K, 32, 32\)"):
        coco_mask_scores([(np.array([0]), SQUARE[None, :16])], [NONE], SIZE)
    with pytest.raises(ValueError, match="1 images of ground truth but 2"):
        coco_mask_scores([(np.array([0]), SQUARE[None])], [NONE, NONE], SIZE)


def test_detection_masks_by_hand() -> None:
    # a 2 x 2 map, left column 1, right 0 → bilinear 4 x 4 columns 1, 0.75, 0.25, 0 → Otsu keeps
    # the two left columns; a constant map keeps nothing; a map already at size is only cut
    maps = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[3.0, 3.0], [3.0, 3.0]]])
    masks = detection_masks(maps, (4, 4))
    assert masks.dtype == torch.bool and masks.shape == (2, 4, 4)
    expected = torch.zeros(2, 4, 4, dtype=torch.bool)
    expected[0, :, :2] = True
    torch.testing.assert_close(masks, expected)
    one = torch.zeros(1, 4, 4)
    one[0, 1:3, 2] = 5.0
    torch.testing.assert_close(detection_masks(one, (4, 4)), one > 0)
    maps = torch.rand(3, 7, 7, generator=torch.Generator().manual_seed(0))
    single = [detection_masks(one_map[None], SIZE)[0] for one_map in maps]
    torch.testing.assert_close(detection_masks(maps, SIZE), torch.stack(single))
    assert detection_masks(torch.zeros(0, 7, 7), SIZE).shape == (0, *SIZE)


def test_masked_detections_keep_probabilities_above_one_half() -> None:
    maps = torch.zeros(3, 2, 2)
    maps[:, 0, 0] = 1.0  # each map marks its top-left quarter
    scores, labels, masks = masked_detections(
        torch.tensor([0.9, 0.5, 0.51]), torch.tensor([4, 5, 6]), maps, (8, 8)
    )
    np.testing.assert_allclose(scores, [0.9, 0.51], rtol=1e-6)  # 0.5 is not above 0.5
    np.testing.assert_array_equal(labels, [4, 6])
    assert masks.shape == (2, 8, 8) and masks.dtype == bool
    np.testing.assert_array_equal(masks, detection_masks(maps[[0, 2]], (8, 8)).numpy())
    truth = [(np.array([4, 6]), masks)]
    assert coco_mask_scores(truth, [(scores, labels, masks)], (8, 8))["ap"] == pytest.approx(1.0)

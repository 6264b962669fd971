"""Segmentation metrics on hand-made maps and masks with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.unit.test_metrics import _ap_reference
from vitlens_server.evaluate import (
    SEGMENTATION_KEYS,
    iou,
    otsu_masks,
    segmentation_scores,
    threshold_maps,
)


def _discs(size: int, centers: list[tuple[int, int]], radius: float) -> torch.Tensor:
    """(B, size, size) bool masks, one disc per image."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return torch.stack([(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2 for cy, cx in centers])


@pytest.mark.parametrize("threshold", ["otsu", "mean"])
def test_a_map_equal_to_the_mask_scores_one(threshold: str) -> None:
    masks = _discs(40, [(10, 12), (20, 20), (30, 25)], 7.0)
    maps = masks.double() * torch.tensor([1.0, 3.0, 0.5])[:, None, None] + 2.0  # any scale
    scores = segmentation_scores(maps, masks, threshold=threshold)
    assert set(scores) == set(SEGMENTATION_KEYS)
    for key in SEGMENTATION_KEYS:
        torch.testing.assert_close(scores[key], torch.ones(3, dtype=torch.float64), msg=key)


def test_scores_by_hand() -> None:
    # rows of the map: 1, 0.75, 0.25, 0 → Otsu (and the mean) keep rows 0 and 1; the mask is rows
    # 1 and 2: TP = FP = FN = TN = 4 pixels.
    maps = torch.tensor([4.0, 3.0, 1.0, 0.0], dtype=torch.float64)[None, :, None].expand(1, 4, 4)
    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    masks[0, 1:3] = True
    for threshold in ("otsu", "mean"):
        scores = {
            k: v.item() for k, v in segmentation_scores(maps, masks, threshold=threshold).items()
        }
        assert scores["pixel_accuracy"] == pytest.approx(8 / 16)
        assert scores["iou"] == pytest.approx(4 / 12)
        assert scores["iou_background"] == pytest.approx(4 / 12)
        assert scores["f1"] == pytest.approx(8 / 16)
        # ranking row 0 (4 negatives), row 1 (4 positives), row 2 (4 positives), row 3: precision
        # 4/8 at recall 1/2 and 8/12 at recall 1.
        assert scores["ap_foreground"] == pytest.approx(0.5 * 4 / 8 + 0.5 * 8 / 12)
        # pooled with the background channel 1 − M every score level holds 4 positives of 8
        assert scores["ap"] == pytest.approx(0.5)


def test_pooled_ap_is_chefers_two_channel_ap() -> None:
    rng = np.random.default_rng(3)
    masks = _discs(24, [(8, 8), (12, 15)], 6.0)
    maps = torch.from_numpy(rng.uniform(0, 1, (2, 24, 24))) + 0.8 * masks
    scores = segmentation_scores(maps, masks)
    for b in range(2):
        m = maps[b].numpy().ravel()
        scaled = (m - m.min()) / (m.max() - m.min())
        truth = masks[b].numpy().ravel()
        pooled = _ap_reference(
            np.concatenate([scaled, 1 - scaled]), np.concatenate([truth, ~truth])
        )
        assert scores["ap"][b].item() == pytest.approx(pooled, rel=1e-12)
        assert scores["ap_foreground"][b].item() == pytest.approx(
            _ap_reference(m, truth), rel=1e-12
        )


def test_masks_are_the_otsu_masks_of_the_upsampled_map() -> None:
    rng = np.random.default_rng(4)
    maps = torch.from_numpy(rng.gamma(1.0, 1.0, (3, 7, 7)))  # token grid, upsampled to 56 x 56
    masks = _discs(56, [(20, 20), (30, 40), (10, 45)], 12.0)
    expected = iou(otsu_masks(maps, (56, 56)), masks)
    torch.testing.assert_close(segmentation_scores(maps, masks)["iou"], expected)
    mean_masks = threshold_maps(torch.tensor([[[0.0, 0.2], [0.4, 1.0]]]), "mean")  # mean 0.4
    assert mean_masks.tolist() == [[[False, False], [False, True]]]


def test_a_token_grid_map_of_a_patch_aligned_mask() -> None:
    grid = torch.zeros(1, 8, 8, dtype=torch.float64)
    grid[0, 2:6, 1:4] = 1.0  # 4 x 3 patches of 8 x 8 pixels
    masks = grid.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2).bool()
    scores = segmentation_scores(grid, masks)
    # bilinear upsampling blurs the block edges over one patch, so Otsu cuts near their middle
    assert scores["iou"].item() > 0.85 and scores["f1"].item() > 0.9
    assert scores["ap_foreground"].item() > 0.95


def test_a_random_map_scores_chance() -> None:
    generator = torch.Generator().manual_seed(5)
    masks = _discs(256, [(128, 128), (100, 150)], 64.0)  # f ≈ 0.197 of the image each
    maps = torch.rand(2, 256, 256, generator=generator, dtype=torch.float64)
    scores = segmentation_scores(maps, masks)
    f = masks.flatten(1).double().mean(dim=1)
    q = otsu_masks(maps).flatten(1).double().mean(dim=1)  # predicted fraction, ≈ 0.5 (uniform)
    assert ((q - 0.5).abs() < 0.02).all()
    # a prediction independent of the mask: E[TP] = q·f·P and so on
    torch.testing.assert_close(scores["iou"], q * f / (q + f - q * f), atol=0.01, rtol=0)
    torch.testing.assert_close(scores["f1"], 2 * q * f / (q + f), atol=0.01, rtol=0)
    expected_accuracy = q * f + (1 - q) * (1 - f)
    torch.testing.assert_close(scores["pixel_accuracy"], expected_accuracy, atol=0.01, rtol=0)
    # the AP of random scores is the fraction of positives: f alone, 1/2 once pooled
    torch.testing.assert_close(scores["ap_foreground"], f, atol=0.01, rtol=0)
    torch.testing.assert_close(scores["ap"], torch.full_like(f, 0.5), atol=0.01, rtol=0)
    # and below the IoU of the trivial all-foreground prediction, which is f
    assert (scores["iou"] < f).all()


def test_an_empty_mask_scores_zero_not_nan() -> None:
    maps = torch.zeros(1, 6, 6, dtype=torch.float64)
    maps[0, :2] = 1.0
    scores = segmentation_scores(maps, torch.zeros(1, 6, 6, dtype=torch.bool))
    assert scores["iou"].item() == 0 and scores["f1"].item() == 0
    assert scores["ap_foreground"].item() == 0
    assert scores["pixel_accuracy"].item() == pytest.approx(24 / 36)
    assert scores["iou_background"].item() == pytest.approx(24 / 36)

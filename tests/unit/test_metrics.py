"""Metric building blocks against plain references and hand-computed numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from vitlens_server.evaluate import (
    auc,
    average_precision,
    iou,
    min_max,
    otsu_masks,
    otsu_thresholds,
    spearman,
)


def _otsu_reference(values: np.ndarray, bins: int = 256) -> float:
    """Exhaustive search: the cut between histogram bins maximising between-class variance."""
    quantised = np.minimum((values * bins).astype(int), bins - 1)
    centers = (quantised + 0.5) / bins
    best, best_cut = -1.0, 0
    for cut in range(bins - 1):  # background = bins 0..cut
        low, high = centers[quantised <= cut], centers[quantised > cut]
        if len(low) == 0 or len(high) == 0:
            continue
        w0, w1 = len(low) / len(centers), len(high) / len(centers)
        between = w0 * w1 * (low.mean() - high.mean()) ** 2
        if between > best + 1e-15:
            best, best_cut = between, cut
    return (best_cut + 1) / bins


def test_otsu_matches_an_exhaustive_search() -> None:
    rng = np.random.default_rng(0)
    maps = np.stack(
        [
            np.concatenate([rng.normal(0.2, 0.05, 300), rng.normal(0.7, 0.1, 100)]),
            rng.uniform(0, 1, 400),
            np.concatenate([rng.beta(2, 8, 350), rng.beta(9, 2, 50)]),
        ]
    ).clip(0, 1)
    got = otsu_thresholds(torch.from_numpy(maps)).numpy()
    expected = [_otsu_reference(m) for m in maps]
    np.testing.assert_allclose(got, expected)


def test_otsu_separates_two_levels() -> None:
    maps = torch.zeros(1, 8, 8)
    maps[0, 2:5, 2:5] = 3.0
    masks = otsu_masks(maps)
    assert masks.sum() == 9 and masks[0, 2:5, 2:5].all()
    upsampled = otsu_masks(maps, size=(32, 32))
    assert upsampled.shape == (1, 32, 32) and 100 < upsampled.sum() < 200


def test_min_max_and_constant_maps() -> None:
    maps = torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[4.0, 4.0], [4.0, 4.0]]])
    scaled = min_max(maps)
    torch.testing.assert_close(scaled[0], torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    assert (scaled[1] == 0).all()
    assert not otsu_masks(maps)[1].any()


def test_iou_by_hand() -> None:
    a = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    b = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(iou(a, b), torch.tensor([1 / 3, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("ties", [False, True])
def test_spearman_matches_scipy(ties: bool) -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(5, 49))
    b = a * 0.3 + rng.normal(size=(5, 49))
    if ties:  # ReLU'd maps: many exact zeros
        a, b = np.maximum(a, 0), np.round(np.maximum(b, 0), 1)
    got = spearman(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    expected = [stats.spearmanr(x, y).statistic for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_spearman_of_a_constant_map_is_zero() -> None:
    a = torch.ones(1, 10)
    assert spearman(a, torch.arange(10.0)[None]).item() == 0
    assert spearman(torch.arange(10.0)[None], -torch.arange(10.0)[None]).item() == pytest.approx(-1)


def _ap_reference(scores: np.ndarray, truth: np.ndarray) -> float:
    """sklearn's definition by a plain loop: Σ (R_n − R_{n−1}) P_n over the distinct scores as
    thresholds, highest first (predicted positive ⇔ score ≥ threshold)."""
    positives = truth.sum()
    ap, previous_recall = 0.0, 0.0
    for threshold in sorted(set(scores.tolist()), reverse=True):
        selected = scores >= threshold
        hits = (selected & truth).sum()
        recall, precision = hits / positives, hits / selected.sum()
        ap += (recall - previous_recall) * precision
        previous_recall = recall
    return ap


@pytest.mark.parametrize("ties", [False, True])
def test_average_precision_matches_a_threshold_loop(ties: bool) -> None:
    rng = np.random.default_rng(2)
    truth = rng.uniform(size=(6, 300)) < np.array([0.05, 0.2, 0.5, 0.8, 0.3, 0.5])[:, None]
    scores = truth * rng.uniform(0, 1, truth.shape) + rng.normal(0, 0.6, truth.shape)
    if ties:  # quantised scores: many tied groups that mix positives and negatives
        scores = np.round(scores, 1)
    got = average_precision(torch.from_numpy(scores), torch.from_numpy(truth)).numpy()
    expected = [_ap_reference(s, t) for s, t in zip(scores, truth, strict=True)]
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_average_precision_by_hand() -> None:
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.5, 0.5, 0.5, 0.1], [1.0, 2.0, 3.0, 4.0]])
    truth = torch.tensor([[1, 0, 1, 0], [1, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    # row 0: positives at ranks 1 and 3 → (1/1 + 2/3) / 2; row 1: the tied top three hold one
    # positive → precision 1/3 for it, then 2/4 for the last → (1/3 + 1/2) / 2; row 2: none → 0.
    expected = torch.tensor([(1 + 2 / 3) / 2, (1 / 3 + 1 / 2) / 2, 0.0], dtype=torch.float64)
    torch.testing.assert_close(average_precision(scores, truth), expected)
    perfect = average_precision(truth[:2].float(), truth[:2])
    torch.testing.assert_close(perfect, torch.ones(2, dtype=torch.float64))


def test_auc_of_known_curves() -> None:
    x = torch.tensor([0.0, 0.5, 1.0])
    curves = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.5, 1.0]])
    torch.testing.assert_close(auc(x, curves), torch.tensor([0.5, 1.0, 0.5], dtype=torch.float64))
    dense = torch.linspace(0, 1, 1001, dtype=torch.float64)  # ∫ x² = 1/3, trapezoid error h²/6
    assert auc(dense, dense**2).item() == pytest.approx(1 / 3 + 1e-6 / 6, abs=1e-12)
    uneven = torch.tensor([0.0, 0.1, 0.4])  # (0.1·(1+2) + 0.3·(2+0)) / 2
    assert auc(uneven, torch.tensor([1.0, 2.0, 0.0])).item() == pytest.approx(0.45)

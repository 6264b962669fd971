"""Perturbation metrics against hand-computed curves and plain per-image, per-step loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

from vitlens_server.evaluate import (
    CHEFER_STEPS,
    average_drop_increase,
    blur,
    deletion_curve,
    inpaint,
    insertion_curve,
    perturbation_auc,
    perturbation_curve,
    removal_ranks,
    upsample_maps,
)


class RegionClassifier:
    """Two classes; logit_1 − logit_0 = gain · (mean of channel 0 over ``region`` − threshold),
    so p(class 1) = sigmoid of that. Records the size of every batch it is called with."""

    def __init__(self, region: tuple[slice, slice], threshold: float, gain: float = 10.0) -> None:
        self.region, self.threshold, self.gain = region, threshold, gain
        self.calls: list[int] = []

    def __call__(self, images: Tensor) -> Tensor:
        self.calls.append(len(images))
        evidence = self.gain * (
            images[:, 0][:, self.region[0], self.region[1]].mean((1, 2)) - self.threshold
        )
        return torch.stack([-evidence / 2, evidence / 2], dim=1)


class LinearClassifier:
    """A fixed random linear map of the pixels to 5 classes (float64)."""

    def __init__(self, shape: tuple[int, ...], seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(math.prod(shape), 5, generator=generator, dtype=torch.float64)

    def __call__(self, images: Tensor) -> Tensor:
        return (images.flatten(1) - 0.5) @ self.weight


TOP_LEFT = (slice(0, 4), slice(0, 4))


def _region_maps(size: int, region: tuple[slice, slice]) -> Tensor:
    mask = torch.zeros(size, size, dtype=torch.float64)
    mask[region] = 1.0
    return mask


def _order(values: list[float], most_first: bool) -> list[int]:
    """Removal order written out: by relevance, ties to the lower pixel index."""
    return sorted(range(len(values)), key=lambda i: (-values[i] if most_first else values[i], i))


def test_removal_ranks_break_ties_by_pixel_index() -> None:
    maps = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[2.0, 2.0], [2.0, 2.0]]])
    assert removal_ranks(maps, (2, 2)).tolist() == [[0, 2, 1, 3], [0, 1, 2, 3]]
    assert removal_ranks(maps, (2, 2), descending=False).tolist() == [[2, 0, 3, 1], [0, 1, 2, 3]]


def test_chefer_curve_by_hand() -> None:
    # 8 x 8 white images; the classifier says 1 iff the mean of the top-left 4 x 4 region R
    # (16 pixels) is > 0.7; the map is R's indicator. Step p zeroes ⌊64·p⌋ = 6, 12, 19, 25,
    # 32, 38, 44, 51, 57 pixels.
    # positive: R goes first, at p = 0.1 its mean is 10/16 < 0.7 → class 0 from then on.
    # negative: the 48 pixels outside R go first; at p = 0.8 (51) R keeps 13/16 > 0.7, at
    # p = 0.9 (57) 7/16 → class 0 only at the last step.
    pixels = torch.ones(2, 3, 8, 8, dtype=torch.float64)
    maps = _region_maps(8, TOP_LEFT).expand(2, 8, 8)
    labels = torch.tensor([1, 0])
    classify = RegionClassifier(TOP_LEFT, threshold=0.7)
    positive = perturbation_curve(pixels, maps, labels, classify, positive=True)
    negative = perturbation_curve(pixels, maps, labels, classify, positive=False)
    assert positive.tolist() == [[True] + [False] * 9, [False] + [True] * 9]
    assert negative.tolist() == [[True] * 9 + [False], [False] * 9 + [True]]
    # trapezoid over x = 0, 0.1, ..., 0.9, x100: one half-step triangle = 5, the rest = 80 + 5
    torch.testing.assert_close(
        perturbation_auc(positive), torch.tensor([5.0, 85.0], dtype=torch.float64)
    )
    torch.testing.assert_close(
        perturbation_auc(negative), torch.tensor([85.0, 5.0], dtype=torch.float64)
    )


def _perturbation_reference(pixels, maps, labels, logits_fn, positive: bool) -> list[list[bool]]:
    """Chefer's protocol per image and per step: zero the first int(p·P) pixels, re-classify."""
    _, _, height, width = pixels.shape
    upsampled = upsample_maps(maps, (height, width))
    hits = []
    for b in range(len(pixels)):
        order = _order(upsampled[b].flatten().tolist(), most_first=positive)
        row = []
        for p in (0.0, *CHEFER_STEPS):
            image = pixels[b].clone()
            for index in order[: int(p * height * width)]:
                image[:, index // width, index % width] = 0.0
            row.append(logits_fn(image[None]).argmax(dim=1).item() == labels[b].item())
        hits.append(row)
    return hits


@pytest.mark.parametrize("grid", ["tokens", "ties"])
@pytest.mark.parametrize("positive", [True, False])
def test_perturbation_equals_a_plain_loop(grid: str, positive: bool) -> None:
    generator = torch.Generator().manual_seed(1)
    pixels = torch.rand(4, 3, 12, 12, generator=generator, dtype=torch.float64)
    if grid == "tokens":  # a 3 x 3 token map, upsampled to 12 x 12
        maps = torch.rand(4, 3, 3, generator=generator, dtype=torch.float64)
    else:  # full-resolution maps with many ties, and one constant map
        maps = torch.randint(0, 3, (4, 12, 12), generator=generator).double()
        maps[3] = 1.0
    classify = LinearClassifier((3, 12, 12))
    labels = classify(pixels).argmax(dim=1)
    labels[0] = (labels[0] + 1) % 5  # one image the model gets wrong
    hits = perturbation_curve(pixels, maps, labels, classify, positive=positive, batch_size=16)
    expected = _perturbation_reference(pixels, maps, labels, classify, positive)
    assert hits.tolist() == expected
    assert hits.any() and not hits.all()


def test_chunk_size_changes_nothing_and_chunks_mix_steps() -> None:
    generator = torch.Generator().manual_seed(2)
    pixels = torch.rand(5, 3, 12, 12, generator=generator, dtype=torch.float64)
    maps = torch.rand(5, 4, 4, generator=generator, dtype=torch.float64)
    classify = LinearClassifier((3, 12, 12), seed=3)
    labels = classify(pixels).argmax(dim=1)
    total = 5 * (len(CHEFER_STEPS) + 1)  # images x steps, step 0 included
    hits, probabilities = [], []
    for batch_size in (1, 7, 1000):
        calls: list[int] = []

        def counted(images: Tensor, calls: list[int] = calls) -> Tensor:
            calls.append(len(images))
            return classify(images)

        hits.append(
            perturbation_curve(pixels, maps, labels, counted, positive=True, batch_size=batch_size)
        )
        assert calls == [min(batch_size, total - s) for s in range(0, total, batch_size)]
        deletion = deletion_curve(pixels, maps, labels, classify, steps=6, batch_size=batch_size)
        probabilities.append(deletion.probabilities)
    assert torch.equal(hits[0], hits[1]) and torch.equal(hits[0], hits[2])
    torch.testing.assert_close(probabilities[0], probabilities[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(probabilities[0], probabilities[2], rtol=0, atol=1e-12)


def _causal_reference(start, finish, maps, labels, logits_fn, steps: int) -> np.ndarray:
    """RISE per image and per step: copy the first ⌊k·P/K⌋ pixels of finish onto start."""
    _, _, height, width = start.shape
    upsampled = upsample_maps(maps, (height, width))
    curves = np.zeros((len(start), steps + 1))
    for b in range(len(start)):
        order = _order(upsampled[b].flatten().tolist(), most_first=True)
        for k in range(steps + 1):
            image = start[b].clone()
            for index in order[: k * height * width // steps]:
                image[:, index // width, index % width] = finish[
                    b, :, index // width, index % width
                ]
            curves[b, k] = logits_fn(image[None]).softmax(dim=1)[0, labels[b]].item()
    return curves


@pytest.mark.parametrize("steps", [16, 10])
@pytest.mark.parametrize("mode", ["deletion", "insertion", "insertion-mean-colour"])
def test_deletion_and_insertion_equal_a_plain_loop(mode: str, steps: int) -> None:
    generator = torch.Generator().manual_seed(4)
    pixels = torch.rand(3, 3, 12, 12, generator=generator, dtype=torch.float64)
    maps = torch.rand(3, 3, 3, generator=generator, dtype=torch.float64)
    maps[2] = 0.0  # constant: reading order
    classify = LinearClassifier((3, 12, 12), seed=5)
    labels = classify(pixels).argmax(dim=1)
    if mode == "deletion":
        got = deletion_curve(pixels, maps, labels, classify, steps=steps, batch_size=8)
        start, finish = pixels, torch.zeros_like(pixels)
    elif mode == "insertion":
        got = insertion_curve(pixels, maps, labels, classify, steps=steps, batch_size=8)
        start, finish = blur(pixels), pixels
    else:
        colour = torch.tensor([0.485, 0.456, 0.406])
        got = insertion_curve(pixels, maps, labels, classify, steps=steps, baseline=colour)
        start, finish = colour.double().view(1, 3, 1, 1).expand_as(pixels), pixels
    expected = _causal_reference(start, finish, maps, labels, classify, steps)
    np.testing.assert_allclose(got.probabilities.numpy(), expected, rtol=1e-12)
    fractions = np.array([k * 144 // steps for k in range(steps + 1)]) / 144
    np.testing.assert_allclose(got.fractions.numpy(), fractions)
    np.testing.assert_allclose(
        got.auc.numpy(), np.trapezoid(expected, fractions, axis=1), rtol=1e-12
    )
    if 144 % steps == 0:  # RISE's normalised area: (Σ − first/2 − last/2) / K
        rise = (expected.sum(1) - expected[:, 0] / 2 - expected[:, -1] / 2) / steps
        np.testing.assert_allclose(got.auc.numpy(), rise, rtol=1e-12)


@pytest.mark.parametrize("baseline", ["zeros", "blur"])
def test_the_evidence_map_is_the_best_deletion_and_insertion_map(baseline: str) -> None:
    # The image is bright exactly on the region R the classifier reads; the map that ranks R
    # first removes (inserts) the evidence fastest, the inverted map slowest, random maps between.
    region = (slice(2, 8), slice(3, 9))
    evidence = _region_maps(12, region)
    generator = torch.Generator().manual_seed(6)
    maps = torch.cat(
        [
            evidence[None],
            1 - evidence[None],
            torch.rand(6, 12, 12, generator=generator, dtype=torch.float64),
        ]
    )
    pixels = evidence.expand(len(maps), 3, 12, 12).clone()
    labels = torch.ones(len(maps), dtype=torch.long)
    classify = RegionClassifier(region, threshold=0.5, gain=8.0)
    deletion = deletion_curve(pixels, maps, labels, classify, steps=12, baseline=baseline).auc
    insertion = insertion_curve(pixels, maps, labels, classify, steps=12, baseline=baseline).auc
    assert deletion[0] < deletion[2:].min() and deletion[2:].max() < deletion[1]
    assert insertion[0] > insertion[2:].max() and insertion[2:].min() > insertion[1]


def test_average_drop_and_increase_by_hand() -> None:
    # R (top-left 4 x 4 of 8 x 8) is 1, the rest 0.5; p(class 1) = sigmoid(4·(mean_R − 0.5)).
    # Keeping the top 32 pixels of R's map keeps R: O = Y. The inverted map keeps 32 pixels
    # outside R and zeroes R: p(class 1) falls from sigmoid(2) to sigmoid(−2), p(class 0) rises.
    pixels = torch.full((3, 3, 8, 8), 0.5, dtype=torch.float64)
    pixels[:, :, :4, :4] = 1.0
    region = _region_maps(8, TOP_LEFT)
    maps = torch.stack([region, 1 - region, 1 - region])
    labels = torch.tensor([1, 1, 0])
    scores = average_drop_increase(pixels, maps, labels, RegionClassifier(TOP_LEFT, 0.5, gain=4.0))
    high, low = 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2))
    expected_drop = torch.tensor([0.0, (high - low) / high * 100, 0.0], dtype=torch.float64)
    torch.testing.assert_close(scores["average_drop"], expected_drop)
    expected_increase = torch.tensor([0.0, 0.0, 100.0], dtype=torch.float64)
    torch.testing.assert_close(scores["average_increase"], expected_increase)


def test_blur_is_a_normalised_gaussian() -> None:
    constant = torch.full((1, 3, 9, 9), 0.3, dtype=torch.float64)
    torch.testing.assert_close(blur(constant), constant)
    delta = torch.zeros(1, 1, 21, 21, dtype=torch.float64)
    delta[0, 0, 10, 10] = 1.0
    taps = torch.exp(-(torch.arange(-5, 6, dtype=torch.float64) ** 2) / (2 * 5.0**2))
    taps = taps / taps.sum()
    expected = torch.zeros(21, 21, dtype=torch.float64)
    expected[5:16, 5:16] = taps[:, None] * taps[None, :]
    torch.testing.assert_close(blur(delta)[0, 0], expected)


class ShapeClassifier:
    """Class 1 when the pixels of ``region`` differ from the grey background (0.5), whatever
    colour they have: it sees an object's silhouette as well as the object."""

    def __init__(self, region: tuple[slice, slice]) -> None:
        self.region = region

    def __call__(self, images: Tensor) -> Tensor:
        inside = images[:, :, self.region[0], self.region[1]]
        evidence = 40 * ((inside - 0.5).abs().mean((1, 2, 3)) - 0.1)
        return torch.stack([-evidence / 2, evidence / 2], dim=1)


def test_inpainting_removes_what_zeroing_leaves_visible() -> None:
    # A white square on grey; the map that marks exactly the square (the oracle) removes it.
    # Zeroing leaves a black square, still class 1 at every step: the oracle looks useless
    # (AUC 90, the maximum). Inpainting fills it with grey: the prediction falls once the whole
    # square is gone, and random maps, which leave parts of it, keep it longer.
    region = (slice(4, 12), slice(4, 12))  # 64 of 256 pixels: gone after p = 0.3
    oracle = _region_maps(16, region)
    noise = torch.rand(4, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    maps = torch.cat([oracle[None], noise])
    pixels = torch.full((len(maps), 3, 16, 16), 0.5)
    pixels[:, :, region[0], region[1]] = 1.0
    labels = torch.ones(len(maps), dtype=torch.long)
    classify = ShapeClassifier(region)
    zeroed = perturbation_auc(perturbation_curve(pixels, maps, labels, classify, positive=True))
    filled = perturbation_curve(pixels, maps, labels, classify, positive=True, baseline="inpaint")
    assert zeroed.tolist() == pytest.approx([90.0] * len(maps))
    assert filled[0].tolist() == [True] * 3 + [False] * 7  # 0, 0.1, 0.2 hit; from 0.3 on, grey
    assert perturbation_auc(filled)[0] < perturbation_auc(filled)[1:].min()


def test_inpaint_keeps_known_pixels_and_fills_holes_from_their_surroundings() -> None:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(3, 3, 20, 13, generator=generator, dtype=torch.float64)
    holes = torch.rand(3, 1, 20, 13, generator=generator) < 0.6
    holes[2] = True  # nothing known: black
    filled = inpaint(pixels, holes)
    known = ~holes.expand_as(pixels)
    torch.testing.assert_close(filled[known], pixels[known], rtol=0, atol=0)
    torch.testing.assert_close(filled[2], torch.zeros_like(filled[2]))
    for b in (0, 1):  # every fill is a weighted average of known pixels of the same channel
        for c in range(3):
            values = pixels[b, c][~holes[b, 0]]
            assert values.min() - 1e-12 <= filled[b, c].min() <= filled[b, c].max()
            assert filled[b, c].max() <= values.max() + 1e-12
    uniform = torch.full((1, 3, 16, 16), 0.25)
    square = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    square[..., 3:11, 5:13] = True  # a hole in a uniform region becomes that colour
    torch.testing.assert_close(inpaint(uniform, square), uniform)


def test_bad_arguments_are_refused() -> None:
    pixels, maps, labels = torch.rand(1, 3, 4, 4), torch.rand(1, 4, 4), torch.tensor([0])
    classify = LinearClassifier((3, 4, 4))
    with pytest.raises(ValueError, match="baseline"):
        deletion_curve(pixels, maps, labels, classify, baseline="noise")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps"):
        insertion_curve(pixels, maps, labels, classify, steps=0)
    with pytest.raises(ValueError, match="empty canvas"):
        insertion_curve(pixels, maps, labels, classify, baseline="inpaint")
    with pytest.raises(ValueError, match="fraction"):
        perturbation_curve(pixels, maps, labels, classify, positive=True, steps=(0.5, 1.5))

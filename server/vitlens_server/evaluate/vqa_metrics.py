"""Quality metrics of bi-modal (VQA) explanations: token perturbation and question segmentation.

**Token perturbation** (METHODS.md "Multi-modal metrics", seed 003 §4, Figs. 3 and 5): the
tokens of one modality, text or image, are removed in the order of their relevance, highest
first (positive) or lowest first (negative), and the model answers again; a hit is its top-1
answer equal to the given answer. Seed 003 reports "the mean top-1 accuracy of the network" on
VQA validation questions, and its reference code scores the answer against the ground truth
(the VQA soft score of the predicted answer), so ``answers`` are the ground-truth answers by
default; pass the model's own unperturbed prediction to measure agreement with it instead.
The AUC over the steps is `perturbation.perturbation_auc` of the returned hits.

How a token is removed is the model's own "absent" input, `BimodalModel.remove_tokens`:

- ViLT: word token → text_mask 0; patch token → 0 in its (B, 1+L) image token mask
  (``BimodalInputs.patch_mask``), the mask of its padding slots; the image CLS stays.
- VisualBERT: region → region_mask 0; word token → dropped from the sequence, the rest
  closing up (its answer head gathers at ``text_mask.sum(1) - 2``, so an in-place mask would
  move the readout).
- LXMERT: word token → text_mask 0; region → region_mask 0.

CLS and SEP are never removed; only a modality's valid tokens (`BimodalTokens.text_valid`, word
tokens; ``image_valid``, real patches / regions) are ranked, counted and removed, padding never.

Choices the paper leaves open, fixed here:
- Steps are METHODS.md's 10 % steps (`CHEFER_STEPS`, 0.1 ... 0.9, plus the unperturbed 0).
  Seed 003's reference code uses 0, 0.25, 0.5, 0.75, 0.8, ..., 1 instead; any ``steps`` in
  [0, 1] can be given.
- Item b with n_b valid tokens loses ⌊p·n_b⌋ of them at step p (`perturbation` counts pixels
  so; the reference code keeps ⌊(1−p)·n_b⌋, i.e. removes ⌈p·n_b⌉).
- Ties in relevance go to the lower token position first, in both directions (a stable sort,
  as `perturbation.removal_ranks` orders pixels); the reference code uses ``topk``.
- Text is removed by masking (or, for VisualBERT, dropping) where the reference code drops
  tokens for every model (later tokens' positions shift there); image tokens are masked where
  it drops regions, which is the same thing for region models (boxes carry the position).

**Question segmentation**: a question's image map (on the patch grid) against the union of the
masks of the objects it is about (`data.questions.question_mask`), scored as
`segmentation.segmentation_scores` does (bilinear upsample → min-max → Otsu → IoU, pixel
accuracy, F1, AP). Questions about nothing (an existence "no", a count "zero") have an empty
mask and no segmentation score: they are flagged invalid, their scores NaN.

Region models whose regions are the patches of a ViT front-end (the exemplar LXMERT: one region
per patch in raster order, boxes the patch squares) get their map on the grid with
`regions_to_grid`; `patch_grid` recognises such boxes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from vitlens_server.data.questions import Question, question_mask
from vitlens_server.data.scenes import Scene
from vitlens_server.evaluate.perturbation import CHEFER_STEPS, _fraction_count
from vitlens_server.evaluate.segmentation import (
    SEGMENTATION_KEYS,
    Threshold,
    segmentation_scores,
)
from vitlens_server.models.bimodal.base import BimodalInputs, BimodalModel

__all__ = [
    "Modality",
    "QuestionSegmentation",
    "grid_to_regions",
    "patch_grid",
    "question_masks",
    "question_segmentation",
    "regions_to_grid",
    "token_perturbation",
    "token_ranks",
]

Modality = Literal["text", "image"]
MODALITIES = ("text", "image")


class QuestionSegmentation(NamedTuple):
    """`question_segmentation`'s result: ``scores`` (B,) float64 under `SEGMENTATION_KEYS`,
    NaN where ``valid`` (B,) bool is False (the question's mask is empty)."""

    scores: dict[str, Tensor]
    valid: Tensor


def token_ranks(relevance: Tensor, valid: Tensor, *, descending: bool = True) -> Tensor:
    """Position of every token in the removal order, (B, N) relevance → (B, N) long.

    Rank 0 is removed first: the most relevant valid token (``descending``) or the least
    relevant; ties go to the lower token position. Invalid tokens (``valid`` (B, N) bool False)
    rank after every valid one, so "remove the first k" (``ranks < k``, k ≤ the valid count)
    never touches them.
    """
    relevance = relevance if relevance.is_floating_point() else relevance.float()
    by_relevance = relevance.argsort(dim=1, descending=descending, stable=True)  # (B, N)
    valid_last = (~valid.to(relevance.device)).gather(1, by_relevance).long()
    order = by_relevance.gather(1, valid_last.argsort(dim=1, stable=True))  # valid ones first
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def token_perturbation(
    model: BimodalModel,
    inputs: BimodalInputs,
    relevance: Tensor,
    *,
    modality: Modality,
    positive: bool,
    answers: Tensor | None = None,
    steps: Sequence[float] = CHEFER_STEPS,
) -> Tensor:
    """Seed 003's perturbation test of one modality's token relevance (Figs. 3 and 5).

    Args:
        model: the bi-modal adapter.
        inputs: the batch of B questions and images.
        relevance: (B, T) text relevance aligned with the token ids, or (B, M) image relevance
            per patch slot / region (`BimodalModel.readout`'s two parts).
        modality: which tokens are removed, "text" (word tokens) or "image".
        positive: remove the most relevant first (positive perturbation) or the least.
        answers: (B,) answer indices a hit must match: the ground truth (seed 003); None: the
            model's own answer on the unperturbed batch.
        steps: fractions p in [0, 1] of each item's valid tokens of ``modality`` to remove.

    Returns:
        hits (B, S+1) bool on the model's device: the answer after removing ⌊p·n_b⌋ tokens,
        column 0 the unperturbed batch, column s the step ``steps[s-1]``. One forward pass per
        column for the whole batch, without gradients. ``perturbation_auc(hits, steps)`` is the
        AUC (positive: lower is better; negative: higher).
    """
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
    device = model.device
    inputs = inputs.to(device)
    tokens = model.tokens(inputs)
    valid = (tokens.text_valid if modality == "text" else tokens.image_valid).to(device)
    if tuple(relevance.shape) != tuple(valid.shape):
        raise ValueError(
            f"{modality} relevance must be {tuple(valid.shape)}; got {tuple(relevance.shape)}"
        )
    ranks = token_ranks(relevance.to(device), valid, descending=positive)  # (B, N)
    totals = valid.sum(dim=1).tolist()
    counts = [[0] * len(totals)] + [[_fraction_count(p, n) for n in totals] for p in steps]
    limits = torch.tensor(counts, device=device)  # (S+1, B)
    with torch.no_grad():
        predicted = model.forward(inputs).argmax(dim=1)  # (B,) unperturbed
        answers = predicted if answers is None else answers.to(device)
        hits = [predicted == answers]
        for limit in limits[1:]:
            remove = ranks < limit[:, None]  # (B, N), only valid tokens
            perturbed = model.remove_tokens(inputs, **{modality: remove})
            hits.append(model.forward(perturbed).argmax(dim=1) == answers)
    return torch.stack(hits, dim=1)


def question_segmentation(
    maps: Tensor,
    masks: Tensor,
    *,
    threshold: Threshold = "otsu",
) -> QuestionSegmentation:
    """Segmentation scores of the questions' image maps against their objects' masks.

    Args:
        maps: (B, gh, gw) image relevance on the patch grid (`BimodalTokens.to_grid`,
            `regions_to_grid`), or any (B, h, w) map.
        masks: (B, H, W) bool, the union of the masks of the objects each question is about
            (`question_masks`).
        threshold: the foreground cut, as in `segmentation.segmentation_scores`.

    Returns:
        `QuestionSegmentation`: `segmentation_scores` of the items with a non-empty mask; NaN
        and ``valid`` False for the others (a "no" or "zero" answer: nothing to find).
    """
    if maps.shape[0] != masks.shape[0]:
        raise ValueError(f"{maps.shape[0]} maps for {masks.shape[0]} masks")
    truth = masks.to(maps.device).bool()
    valid = truth.flatten(1).any(dim=1)  # (B,)
    scores = {
        key: torch.full((maps.shape[0],), float("nan"), dtype=torch.float64, device=maps.device)
        for key in SEGMENTATION_KEYS
    }
    if valid.any():
        found = segmentation_scores(maps[valid], truth[valid], threshold=threshold)
        for key in SEGMENTATION_KEYS:
            scores[key][valid] = found[key]
    return QuestionSegmentation(scores, valid)


def question_masks(scenes: Sequence[Scene], questions: Sequence[Question]) -> Tensor:
    """(B, H, W) bool: `question_mask` of each scene and its question."""
    if len(scenes) != len(questions):
        raise ValueError(f"{len(scenes)} scenes for {len(questions)} questions")
    pairs = zip(scenes, questions, strict=True)
    return torch.from_numpy(np.stack([question_mask(s, q) for s, q in pairs]))


def regions_to_grid(values: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, R) per-region values → (B, gh, gw) when the regions are the patches of a
    ``grid`` = (gh, gw) in raster order (R = gh·gw), as the exemplar LXMERT's front-end makes."""
    rows, cols = grid
    if values.dim() != 2 or values.shape[1] != rows * cols:
        raise ValueError(
            f"values must be (B, {rows * cols}) for a {rows} x {cols} grid; "
            f"got {tuple(values.shape)}"
        )
    return values.reshape(values.shape[0], rows, cols)


def grid_to_regions(maps: Tensor) -> Tensor:
    """(B, gh, gw) → (B, gh·gw) in raster order: the inverse of `regions_to_grid`."""
    return maps.flatten(1)


def patch_grid(boxes: Tensor, *, tolerance: float = 1e-3) -> tuple[int, int] | None:
    """The grid (gh, gw) whose patch squares, in raster order, are ``boxes`` ((R, 4) or
    (B, R, 4), x1, y1, x2, y2 in [0, 1], every item the same); None if they are not such
    squares (detector regions)."""
    boxes = boxes.double()
    if boxes.dim() == 3:
        if not bool((boxes - boxes[:1]).abs().le(tolerance).all()):
            return None
        boxes = boxes[0]
    if boxes.dim() != 2 or boxes.shape[0] == 0 or boxes.shape[1] != 4:
        return None
    width, height = (boxes[0, 2] - boxes[0, 0]).item(), (boxes[0, 3] - boxes[0, 1]).item()
    if width <= 0 or height <= 0:
        return None
    rows, cols = round(1 / height), round(1 / width)
    if rows * cols != boxes.shape[0]:
        return None
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    r, c = r.flatten().double(), c.flatten().double()
    squares = torch.stack([c / cols, r / rows, (c + 1) / cols, (r + 1) / rows], dim=1)
    return (rows, cols) if bool((boxes - squares).abs().le(tolerance).all()) else None

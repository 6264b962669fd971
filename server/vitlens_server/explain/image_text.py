"""Explanations of image-text similarities (CLIP-style dual encoders) on the attention-graph engine.

Each tower is its own self-attention graph (no attention crosses towers, METHODS.md "Dual
encoders (CLIP)"): ``image`` (N = P + gh·gw tokens, read at the tower's readout row) and
``text`` (L = the context length, read at each text's EOT row). For a pair (image b, text m) the
target is its similarity logit y = s · cos(image_b, text_m).

    generic         seed 003 Eq. 5-6 per tower: Ā = mean_h((∇A ⊙ A)⁺), R ← R + Ā·R, with
                    ∂y/∂A of the pair's own logit; image map = R^{image}'s readout row without
                    the prefix, text relevance = R^{text}'s EOT row
    rollout         §4 baseline per tower: R = Ã_L ··· Ã_1, Ã = norm_rows(mean_h A + I)
    raw_attention   §4 baseline per tower: the last layer's head-mean attention

Transformer Attribution is not offered: it needs LRP relevances R^A of both towers, which the
open_clip and Hugging Face towers do not provide.

Batching: one forward of all B images and all M texts (`capture`), then for ``generic`` one
``autograd.grad`` call per *round* of each tower (`side_rounds`): an image round sums the logits
of pairs holding each image once and back-propagates the image tower alone, a text round the
same for the text tower, so every pair's gradients are its own in both towers (a gradient of a
sum of logits gives an item the sum over its pairs). The full B x M grid takes M image rounds
over all B images and B text rounds over all M texts: the backward work of B x M single pairs,
in batches, after a single forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from vitlens_server.explain.graph import (
    AttentionGraph,
    LayerMaps,
    propagate,
    raw_attention,
    rollout,
    self_attention_graph,
)
from vitlens_server.explain.passes import raise_if_interrupted
from vitlens_server.models.image_text import ImageTextModel, TokenizedTexts, TowerRecording
from vitlens_server.models.image_text.recording import ImageTextCapture, capture

__all__ = [
    "IMAGE",
    "IMAGE_TEXT_METHODS",
    "TEXT",
    "PairMaps",
    "explain_pairs",
    "side_rounds",
    "text_positions",
    "tower_graph",
]

IMAGE, TEXT = "image", "text"
IMAGE_TEXT_METHODS = ("generic", "rollout", "raw_attention")
_GRADIENTS = frozenset({"generic"})


@dataclass(frozen=True)
class PairMaps:
    """What one pair's explanation is, on the model's device.

    Attributes:
        heatmap: (gh, gw) image relevance on the patch grid.
        text: (L,) relevance of every text position (the EOT row of R^{text}).
        matrix: (N, N) the image tower's relevance matrix, when asked for; else None.
    """

    heatmap: Tensor
    text: Tensor
    matrix: Tensor | None


@cache
def tower_graph(name: str, num_layers: int, prefix: int) -> AttentionGraph:
    """One tower's graph: ``num_layers`` self-attention layers over one set, rows given per read."""
    return self_attention_graph(name, num_layers, prefix=prefix, row=None, label=name + ".{}")


def side_rounds(pairs: Sequence[tuple[int, int]], side: int) -> list[list[int]]:
    """Group pair indices into rounds in which each item of one tower appears at most once.

    ``side`` 0 groups by image (round r holds every image's r-th pair: K rounds for K targets
    per image, M for the full B x M grid), 1 by text (round r holds every text's r-th pair).
    """
    rounds: list[list[int]] = []
    seen: dict[int, int] = {}
    for i, pair in enumerate(pairs):
        r = seen.get(pair[side], 0)
        seen[pair[side]] = r + 1
        if r == len(rounds):
            rounds.append([])
        rounds[r].append(i)
    return rounds


def text_positions(texts: TokenizedTexts, m: int) -> slice:
    """The positions of text ``m``'s readable tokens: after the start token, before the end."""
    return slice(1, len(texts.tokens[m]) - 1)


def explain_pairs(
    model: ImageTextModel,
    pixels: Tensor,
    texts: TokenizedTexts,
    choose: Callable[[Tensor], Sequence[tuple[int, int]]],
    *,
    method: str,
    matrix: bool = False,
    interrupted: Callable[[], bool] | None = None,
) -> tuple[Tensor, list[PairMaps]]:
    """Score every image against every text, choose pairs from the logits, explain them.

    Args:
        model: the adapter.
        pixels: (B, 3, H, W) normalised images.
        texts: M tokenized texts.
        choose: (B, M) float32 logits → the (image, text) pairs to explain.
        method: one of `IMAGE_TEXT_METHODS`.
        matrix: also return each pair's image-tower relevance matrix.

    Returns:
        (B, M) float32 logits on the model's device and one `PairMaps` per chosen pair.
    """
    if method not in IMAGE_TEXT_METHODS:
        raise ValueError(f"unknown image-text method {method!r}")
    gradients = method in _GRADIENTS
    captured = capture(model, pixels, texts, gradients=gradients)
    logits = captured.logits.detach().float()  # (B, M)
    pairs = list(choose(logits))
    raise_if_interrupted(interrupted)
    if gradients:
        return logits, _gradient_pairs(captured, pairs, matrix, interrupted)
    images, texts_rec = captured.recording.towers()
    baseline = rollout if method == "rollout" else raw_attention
    image_r = _relevance(images, baseline, with_gradients=False)  # (B, N, N)
    text_r = _relevance(texts_rec, baseline, with_gradients=False)  # (M, L, L)
    image_rows = _read(images, image_r)  # (B, N)
    text_rows = _read(texts_rec, text_r)  # (M, L)
    return logits, [
        _pair(images, image_rows[b], text_rows[m], image_r[b] if matrix else None) for b, m in pairs
    ]


def _gradient_pairs(
    captured: ImageTextCapture,
    pairs: list[tuple[int, int]],
    matrix: bool,
    interrupted: Callable[[], bool] | None,
) -> list[PairMaps]:
    """Eq. 5-6 on both towers for every pair: one backward pass per round of each tower."""
    images, texts = captured.recording.towers()
    image_rows: list[Tensor | None] = [None] * len(pairs)
    text_rows: list[Tensor | None] = [None] * len(pairs)
    matrices: list[Tensor | None] = [None] * len(pairs)
    work = [(images, members) for members in side_rounds(pairs, 0)]
    work += [(texts, members) for members in side_rounds(pairs, 1)]
    for n, (tower, members) in enumerate(work):
        raise_if_interrupted(interrupted)
        rows = _round_gradients(captured, tower, pairs, members, retain=n < len(work) - 1)
        side = 0 if tower is images else 1
        relevance = _relevance(rows, propagate, with_gradients=True)  # (P, N, N)
        read = _read(rows, relevance)  # (P, N)
        for j, i in enumerate(members):
            if side == 0:
                image_rows[i] = read[j]
                matrices[i] = relevance[j] if matrix else None
            else:
                text_rows[i] = read[j]
        del rows, relevance
    return [
        _pair(images, image_rows[i], text_rows[i], matrices[i])  # type: ignore[arg-type]
        for i in range(len(pairs))
    ]


def _round_gradients(
    captured: ImageTextCapture,
    tower: TowerRecording,
    pairs: list[tuple[int, int]],
    members: list[int],
    *,
    retain: bool,
) -> TowerRecording:
    """One tower's recording with ∂y/∂O_l for y = Σ of the round's pair logits, narrowed to the
    round's items (each appears once, so each gets its own pair's gradients). Only this tower
    is back-propagated: ``autograd.grad`` runs the part of the graph that leads to its inputs.
    """
    device = captured.logits.device
    image_index = torch.tensor([pairs[i][0] for i in members], device=device)
    text_index = torch.tensor([pairs[i][1] for i in members], device=device)
    chosen = captured.logits[image_index, text_index].sum()
    outs = tower.attention_outputs()
    grads = torch.autograd.grad(chosen, outs, retain_graph=retain, allow_unused=True)
    rows = image_index if tower is captured.recording.images else text_index
    return tower.with_gradients(grads).narrow(rows)  # type: ignore[arg-type]


def _maps(tower: TowerRecording, with_gradients: bool) -> Iterator[LayerMaps]:
    """A_l (and ∂y/∂A_l) of each layer, (B, h, N, N), one layer at a time."""
    for layer in range(tower.num_layers):
        grad = tower.attention_grad(layer) if with_gradients else None
        yield LayerMaps(tower.attention(layer), grad)


def _relevance(tower: TowerRecording, rule, *, with_gradients: bool) -> Tensor:
    """R^{xx} (B, N, N) of one tower under ``rule`` (`propagate`, `rollout`, `raw_attention`)."""
    g = tower.graph
    graph = tower_graph(g.tower, tower.num_layers, g.num_prefix_tokens)
    return rule(graph, _maps(tower, with_gradients)).matrix(g.tower, g.tower)


def _read(tower: TowerRecording, relevance: Tensor) -> Tensor:
    """The embedding's row of each relevance matrix: (B, N, N) → (B, N) (all columns)."""
    weights = tower.read_rows.to(relevance)  # (B, N)
    return torch.einsum("bn,bnm->bm", weights, relevance)


def _pair(images: TowerRecording, image_row: Tensor, text_row: Tensor, matrix) -> PairMaps:
    g = images.graph
    heatmap = image_row[g.num_prefix_tokens :].reshape(g.grid)  # (gh, gw)
    return PairMaps(heatmap, text_row, matrix)

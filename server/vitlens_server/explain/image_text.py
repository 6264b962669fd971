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
``autograd.grad`` call per *round* of pairs, a round holding each image and each text at most
once (`pair_rounds`), so every pair's gradients are its own (`ImageTextCapture.gradients` sums
an item's gradients over the pairs of one call). The full B x M grid takes max(B, M) rounds.
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
    "pair_rounds",
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


def pair_rounds(pairs: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Group pair indices into rounds where each image and each text appears at most once.

    Pairs are taken along diagonals ((m - b) mod max(B, M)), so the full B x M grid needs
    max(B, M) rounds; any other set of pairs gets a greedy assignment.
    """
    if not pairs:
        return []
    width = max(max(b for b, _ in pairs), max(m for _, m in pairs)) + 1
    order = sorted(range(len(pairs)), key=lambda i: ((pairs[i][1] - pairs[i][0]) % width, i))
    rounds: list[list[int]] = []
    used: list[tuple[set[int], set[int]]] = []
    for i in order:
        b, m = pairs[i]
        for members, (images, texts) in zip(rounds, used, strict=True):
            if b not in images and m not in texts:
                members.append(i)
                images.add(b)
                texts.add(m)
                break
        else:
            rounds.append([i])
            used.append(({b}, {m}))
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
    """Eq. 5-6 on both towers for every pair, one backward pass per round."""
    found: list[PairMaps | None] = [None] * len(pairs)
    rounds = pair_rounds(pairs)
    device = captured.logits.device
    for n, members in enumerate(rounds):
        raise_if_interrupted(interrupted)
        image_index = torch.tensor([pairs[i][0] for i in members], device=device)
        text_index = torch.tensor([pairs[i][1] for i in members], device=device)
        rec = captured.gradients(image_index, text_index, retain=n < len(rounds) - 1)
        images = rec.images.narrow(image_index)  # type: ignore[arg-type]  # rows of the round
        texts = rec.texts.narrow(text_index)  # type: ignore[arg-type]
        image_r = _relevance(images, propagate, with_gradients=True)  # (P, N, N)
        text_r = _relevance(texts, propagate, with_gradients=True)  # (P, L, L)
        image_rows, text_rows = _read(images, image_r), _read(texts, text_r)
        for j, i in enumerate(members):
            found[i] = _pair(images, image_rows[j], text_rows[j], image_r[j] if matrix else None)
        del rec, images, texts, image_r, text_r
    return found  # type: ignore[return-value]


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

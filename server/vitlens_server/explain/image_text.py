"""Explanations of image-text similarities (CLIP-style dual encoders) on the attention-graph engine.

Each tower is its own self-attention graph (no attention crosses towers, METHODS.md "Dual
encoders (CLIP)"): ``image`` (N = P + gh·gw tokens, read at the tower's readout row) and
``text`` (L = the context length, read at each text's EOT row). For a pair (image b, text m) the
target is its similarity logit y = s · cos(image_b, text_m). Image map / text relevance:

    generic           seed 003 Eq. 5-6 per tower: Ā = mean_h((∇A ⊙ A)⁺), R ← R + Ā·R, with
                      ∂y/∂A of the pair's own logit; image map = R^{image}'s readout row without
                      the prefix, text relevance = R^{text}'s EOT row
    transformer_attribution
                      Chefer CVPR 2021 per tower: LRP from the pair's logit (`image_text_lrp`),
                      Ā = mean_h((∇A ⊙ R^A)⁺), R ← R + Ā·R; read as generic's
    gradcam           Grad-CAM on each tower's last layer, its readout / EOT row (the ViT math)
    agcam             AG-CAM over each tower's layers, its readout / EOT row (the ViT math)
    saliency          image: max over channels of |∂y/∂x| (SmoothGrad, IG options) at input
                      resolution; text: max over the width of |∂y/∂e_j| of the token embeddings
    token_reflection  image: seed 004 on Transformer Attribution's image relevance R, masked
                      images scored against the pair's text; text: Transformer Attribution's
    rollout           §4 baseline per tower: R = Ã_L ··· Ã_1, Ã = norm_rows(mean_h A + I)
    raw_attention     §4 baseline per tower: the last layer's head-mean attention

(`image_text_methods` says how each reuses the single-modality code.) The two LRP methods
need both towers' LRP activations (`ImageTextModel.lrp_problem` says why a model has none,
e.g. an average-pooled image tower), and refuse the model otherwise.

Batching: one forward of all B images and all M texts (`capture`), then for the gradient
methods one ``autograd.grad`` call per *round* of each tower (`side_rounds`): an image round
sums the logits of pairs holding each image once and back-propagates the image tower alone, a
text round the same for the text tower, so every pair's gradients are its own in both towers
(a gradient of a sum of logits gives an item the sum over its pairs). The full B x M grid takes
M image rounds over all B images and B text rounds over all M texts: the backward work of B x M
single pairs, in batches, after a single forward. Saliency runs its image passes per image
round instead (one forward and backward of the round's images per SmoothGrad sample or IG
step); token reflection then scores every pair's gh·gw masked images in one flat sequence, in
chunks (`image_text_methods`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from vitlens_server.explain.graph import raw_attention, rollout
from vitlens_server.explain.image_text_lrp import PairLrp, transformer_attribution
from vitlens_server.explain.image_text_methods import (
    TOWER_READS,
    TowerRead,
    TowerView,
    reflection_maps,
    saliency_maps,
    tower_graph,
    tower_relevance,
)
from vitlens_server.explain.methods.reflection import ReflectionParams
from vitlens_server.explain.methods.saliency import SaliencyParams
from vitlens_server.explain.passes import raise_if_interrupted
from vitlens_server.models.image_text import ImageTextModel, TokenizedTexts, TowerRecording
from vitlens_server.models.image_text.recording import ImageTextCapture, capture

__all__ = [
    "IMAGE",
    "IMAGE_TEXT_METHODS",
    "LRP_METHODS",
    "TEXT",
    "PairMaps",
    "explain_pairs",
    "native_grid",
    "side_rounds",
    "text_positions",
    "tower_graph",
]

IMAGE, TEXT = "image", "text"
IMAGE_TEXT_METHODS = (
    "generic",
    "transformer_attribution",
    "gradcam",
    "agcam",
    "saliency",
    "token_reflection",
    "rollout",
    "raw_attention",
)
_PIXEL_METHODS = frozenset({"saliency"})  # image maps at input resolution; the rest on tokens


def native_grid(method: str) -> Literal["tokens", "input"]:
    """The grid a method's image map is made on (Evaluate reads maps at it, as for ViTs)."""
    return "input" if method in _PIXEL_METHODS else "tokens"


def _attribution(view: TowerView) -> tuple[Tensor, Tensor | None]:
    return transformer_attribution(view, view.pair)


_READS = {
    **TOWER_READS,
    "transformer_attribution": (_attribution, _attribution),
    "token_reflection": (_attribution, _attribution),  # seed 004 reflects TA's R
}
_LRP = frozenset({"transformer_attribution", "token_reflection"})
LRP_METHODS = _LRP


@dataclass(frozen=True)
class PairMaps:
    """What one pair's explanation is, on the model's device.

    Attributes:
        heatmap: (gh, gw) image relevance on the patch grid, or (H, W) at input resolution
            for saliency.
        text: (L,) relevance of every text position (the EOT row of R^{text}).
        matrix: (N, N) the image tower's relevance matrix, when asked for; else None.
    """

    heatmap: Tensor
    text: Tensor
    matrix: Tensor | None


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
    params: object | None = None,
    images: Tensor | None = None,
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
        params: the method's options (`SaliencyParams`, `ReflectionParams`); None: defaults.
        images: (B, 3, H, W) the same images in [0, 1] (before normalisation), which saliency
            and token reflection pass through the image tower again; None: only for the others.
        matrix: also return each pair's image-tower relevance matrix (generic, rollout,
            raw_attention).

    Returns:
        (B, M) float32 logits on the model's device and one `PairMaps` per chosen pair.
    """
    if method not in IMAGE_TEXT_METHODS:
        raise ValueError(f"unknown image-text method {method!r}")
    if method in ("saliency", "token_reflection") and images is None:
        raise ValueError(f"{method} needs the images in [0, 1] (images=)")
    gradients = method in _READS
    lrp = method in _LRP
    if lrp and model.lrp_problem is not None:
        raise ValueError(f"{method} cannot explain this model: {model.lrp_problem}")
    captured = capture(
        model, pixels, texts, gradients=gradients, text_inputs=method == "saliency", lrp=lrp
    )
    logits = captured.logits.detach().float()  # (B, M)
    pairs = list(choose(logits))
    raise_if_interrupted(interrupted)
    if gradients:
        keep = matrix or method == "token_reflection"  # reflection reads TA's R
        maps = _gradient_pairs(model, captured, pairs, method, keep, interrupted)
        if method == "saliency":
            maps = _saliency(model, captured, pairs, maps, images, params, interrupted)
        elif method == "token_reflection":
            maps = _reflection(model, captured, pairs, maps, images, params, interrupted)
        return logits, maps
    images_rec, texts_rec = captured.recording.towers()
    baseline = rollout if method == "rollout" else raw_attention
    image_r = tower_relevance(images_rec, baseline, with_gradients=False)  # (B, N, N)
    text_r = tower_relevance(texts_rec, baseline, with_gradients=False)  # (M, L, L)
    heatmaps = TowerView(images_rec).readout_map(image_r)  # (B, gh, gw)
    text_rows = TowerView(texts_rec).readout_map(text_r)  # (M, L)
    return logits, [
        PairMaps(heatmaps[b], text_rows[m], image_r[b] if matrix else None) for b, m in pairs
    ]


def _gradient_pairs(
    model: ImageTextModel,
    captured: ImageTextCapture,
    pairs: list[tuple[int, int]],
    method: str,
    matrix: bool,
    interrupted: Callable[[], bool] | None,
) -> list[PairMaps]:
    """``method``'s read of both towers for every pair: one backward pass per round of each
    tower (image rounds are skipped when the method runs its own image passes)."""
    images, texts = captured.recording.towers()
    reads = _READS[method]  # (image read or None, text read)
    found: list[list[Tensor | None]] = [[None] * len(pairs), [None] * len(pairs)]
    matrices: list[Tensor | None] = [None] * len(pairs)
    work = [(images, 0, members) for members in side_rounds(pairs, 0) if reads[0] is not None]
    work += [(texts, 1, members) for members in side_rounds(pairs, 1)]
    for n, (tower, side, members) in enumerate(work):
        raise_if_interrupted(interrupted)
        rows = _round_gradients(captured, tower, pairs, members, retain=n < len(work) - 1)
        read: TowerRead = reads[side]  # type: ignore[assignment]
        pair = _pair_lrp(model, captured, pairs, members, side) if method in _LRP else None
        maps, relevance = read(TowerView(rows, pair=pair))  # (n, *grid), (n, N, N) | None
        for j, i in enumerate(members):
            found[side][i] = maps[j]
            if side == 0 and relevance is not None and matrix:
                matrices[i] = relevance[j]
        del rows, maps, relevance
    return [
        PairMaps(found[0][i], found[1][i], matrices[i])  # type: ignore[arg-type]
        for i in range(len(pairs))
    ]


def _pair_lrp(
    model: ImageTextModel,
    captured: ImageTextCapture,
    pairs: list[tuple[int, int]],
    members: list[int],
    side: int,
) -> PairLrp:
    """Both sides of the round's dot products, from the tower ``side`` (0 image, 1 text)."""
    image_index, text_index = _indices(captured, pairs, members)
    images = captured.image_embeds.detach()[image_index]
    texts = captured.text_embeds.detach()[text_index]
    own, other = (images, texts) if side == 0 else (texts, images)
    return PairLrp(model, own, other)


def _round_gradients(
    captured: ImageTextCapture,
    tower: TowerRecording,
    pairs: list[tuple[int, int]],
    members: list[int],
    *,
    retain: bool,
) -> TowerRecording:
    """One tower's recording with ∂y/∂O_l (and ∂y/∂inputs, where the inputs were recorded)
    for y = Σ of the round's pair logits, narrowed to the round's items (each appears once, so
    each gets its own pair's gradients). Only this tower is back-propagated:
    ``autograd.grad`` runs the part of the graph that leads to its inputs.
    """
    image_index, text_index = _indices(captured, pairs, members)
    chosen = captured.logits[image_index, text_index].sum()
    outs = tower.attention_outputs()
    if tower.inputs is not None:
        outs = [*outs, tower.inputs]
    grads = torch.autograd.grad(chosen, outs, retain_graph=retain, allow_unused=True)
    rows = image_index if tower is captured.recording.images else text_index
    found = tower.with_gradients(grads[: tower.num_layers])
    if tower.inputs is not None:
        found = found.with_input_gradient(grads[-1])
    return found.narrow(rows)


def _indices(
    captured: ImageTextCapture, pairs: list[tuple[int, int]], members: list[int]
) -> tuple[Tensor, Tensor]:
    """(n,) image and (n,) text indices of the pairs ``members``, on the model's device."""
    device = captured.logits.device
    image_index = torch.tensor([pairs[i][0] for i in members], device=device)
    text_index = torch.tensor([pairs[i][1] for i in members], device=device)
    return image_index, text_index


def _saliency(
    model: ImageTextModel,
    captured: ImageTextCapture,
    pairs: list[tuple[int, int]],
    maps: list[PairMaps],
    images: Tensor,
    params: object | None,
    interrupted: Callable[[], bool] | None,
) -> list[PairMaps]:
    """Saliency's image maps, one image round at a time (each image once per round)."""
    params = params if isinstance(params, SaliencyParams) else SaliencyParams()
    heatmaps: list[Tensor | None] = [None] * len(pairs)
    for members in side_rounds(pairs, 0):
        image_index, text_index = _indices(captured, pairs, members)
        rows = captured.recording.images.narrow(image_index)
        found = saliency_maps(
            model,
            rows,
            captured.text_embeds,
            images.to(image_index.device)[image_index],
            text_index,
            params,
            interrupted,
        )  # (n, H, W)
        for j, i in enumerate(members):
            heatmaps[i] = found[j]
    return [
        PairMaps(h, m.text, None)
        for h, m in zip(heatmaps, maps, strict=True)  # type: ignore[arg-type]
    ]


def _reflection(
    model: ImageTextModel,
    captured: ImageTextCapture,
    pairs: list[tuple[int, int]],
    maps: list[PairMaps],
    images: Tensor,
    params: object | None,
    interrupted: Callable[[], bool] | None,
) -> list[PairMaps]:
    """Token reflection's image maps for every pair from Transformer Attribution's R (kept
    per pair)."""
    params = params if isinstance(params, ReflectionParams) else ReflectionParams()
    image_index, text_index = _indices(captured, pairs, list(range(len(pairs))))
    heatmaps = reflection_maps(
        model,
        captured.text_embeds,
        images.to(image_index.device)[image_index],
        text_index,
        torch.stack([m.matrix for m in maps]),  # type: ignore[misc]
        torch.stack([m.heatmap for m in maps]),
        params,
        interrupted,
    )  # (P, gh, gw)
    return [PairMaps(heatmaps[i], m.text, None) for i, m in enumerate(maps)]

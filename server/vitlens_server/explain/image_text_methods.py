"""What each image-text method reads in one tower, on the single-modality methods' own math.

The target of a pair (image b, text m) is its similarity logit y = s · cos(image_b, text_m);
every tower is its own self-attention graph (METHODS.md "Dual encoders (CLIP)"). A tower's
recording, narrowed to one round's items (`image_text.side_rounds`) and given ∂y/∂O of that
round's backward pass, is wrapped in a `TowerView`: the part of the ViT `Recording` interface
that Grad-CAM, AG-CAM and saliency read (scores, attention, ∂y/∂A, the readout's row, the grid,
further model passes), so those methods are *called*, not restated:

    generic           Eq. 5-6 (`explain.graph.propagate`) on the tower; map = readout row of R
    gradcam           `methods.gradient.gradcam` on the tower's last layer, readout row
    agcam             `methods.gradient.agcam` over the tower's layers, readout row
    saliency (image)  `methods.saliency.saliency` through `PairPasses` (pixels → the pair's logit)
    saliency (text)   max over the embedding width of |∂y/∂e_j|, e_j the token embedding at j
    token_reflection  `methods.reflection.reflect` on Transformer Attribution's image relevance R
                      (`image_text_lrp`), the masked images scored against the pair's text
                      (`PairPasses.logits`, float32), `combine_maps` with R's readout row

The image readout row is the class token's (or the patch mean for average-pooled towers), the
text one each text's pooled (EOT) token. In the text tower ∂y/∂A is taken as 0 where the causal
or padding mask forbids attention (A is identically 0 there), so Grad-CAM's head weights — the
mean of ∇A over the row's columns — count only the keys the EOT token can see, over all L.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch import Tensor

from vitlens_server.explain.graph import (
    AttentionGraph,
    LayerMaps,
    propagate,
    self_attention_graph,
)
from vitlens_server.explain.methods.gradient import agcam, gradcam
from vitlens_server.explain.methods.reflection import ReflectionParams, combine_maps, reflect
from vitlens_server.explain.methods.saliency import SaliencyParams, saliency
from vitlens_server.explain.params import NoParams
from vitlens_server.explain.passes import raise_if_interrupted, summed_gradients
from vitlens_server.explain.records import ModelPasses
from vitlens_server.models.image_text import ImageTextModel, TowerRecording

__all__ = [
    "TOWER_READS",
    "PairPasses",
    "TowerRead",
    "TowerView",
    "reflection_maps",
    "saliency_maps",
    "tower_graph",
    "tower_relevance",
]

TowerRead = Callable[["TowerView"], tuple[Tensor, Tensor | None]]
"""A round's tower → ((n, *grid) maps, (n, N, N) relevance matrix or None)."""


@cache
def tower_graph(name: str, num_layers: int, prefix: int) -> AttentionGraph:
    """One tower's graph: ``num_layers`` self-attention layers over one set, rows given per read."""
    return self_attention_graph(name, num_layers, prefix=prefix, row=None, label=name + ".{}")


def tower_relevance(tower: TowerRecording, rule, *, with_gradients: bool) -> Tensor:
    """R^{xx} (B, N, N) of one tower under ``rule`` (`propagate`, `rollout`, `raw_attention`)."""
    g = tower.graph
    graph = tower_graph(g.tower, tower.num_layers, g.num_prefix_tokens)
    return rule(graph, _maps(tower, with_gradients)).matrix(g.tower, g.tower)


def _maps(tower: TowerRecording, with_gradients: bool) -> Iterator[LayerMaps]:
    """A_l (and ∂y/∂A_l) of each layer, (B, h, N, N), one layer at a time."""
    for layer in range(tower.num_layers):
        grad = tower.attention_grad(layer) if with_gradients else None
        yield LayerMaps(tower.attention(layer), grad)


@dataclass(frozen=True)
class TowerView:
    """One tower's recording as the ViT `Recording` the per-tower methods read.

    Attributes:
        tower: the recording of a round's n items (with the round's gradients).
        passes: further passes of the pair (saliency), or None.
        pair: what LRP reads of the round's pairs (`image_text_lrp.PairLrp`), or None.
    """

    tower: TowerRecording
    passes: ModelPasses | None = None
    pair: Any = None

    @property
    def num_layers(self) -> int:
        return self.tower.num_layers

    @property
    def num_prefix_tokens(self) -> int:
        return self.tower.graph.num_prefix_tokens

    @property
    def grid(self) -> tuple[int, ...]:
        """(gh, gw) of the image tower; (L,) for the text tower (one row of positions)."""
        g = self.tower.graph
        return tuple(g.grid) if g.grid is not None else (g.num_tokens - g.num_prefix_tokens,)

    def scores(self, layer: int) -> Tensor:
        """S_l (n, h, N, N), the dtype's lowest finite value where the tower's mask forbids
        attention (not −inf: reading a row as weights · S would make 0 · −inf = nan; sigmoid
        still gives 0 there)."""
        scores = self.tower.scores(layer)
        return scores.nan_to_num(neginf=torch.finfo(scores.dtype).min)

    def attention(self, layer: int) -> Tensor:
        return self.tower.attention(layer)

    def attention_grad(self, layer: int) -> Tensor:
        """∂y/∂A_l (n, h, N, N), 0 at masked entries (where A_l is identically 0)."""
        grad = self.tower.attention_grad(layer)
        mask = self.tower.mask
        return grad if mask is None else grad.masked_fill(torch.isinf(mask), 0.0)

    def readout_rows(self, matrix: Tensor) -> Tensor:
        """The read row of each item's (n, ..., N, N) matrix without the prefix: (n, ..., N − P)."""
        weights = self.tower.read_rows.to(matrix.dtype)  # (n, N)
        return torch.einsum("bn,b...nm->b...m", weights, matrix)[..., self.num_prefix_tokens :]

    def readout_map(self, matrix: Tensor) -> Tensor:
        """`readout_rows` of (n, N, N) as (n, *grid) maps."""
        return self.readout_rows(matrix).reshape(matrix.shape[0], *self.grid)

    def model_passes(self) -> ModelPasses:
        if self.passes is None:
            raise RuntimeError("this tower view has no model passes")
        return self.passes


def _generic(view: TowerView) -> tuple[Tensor, Tensor | None]:
    relevance = tower_relevance(view.tower, propagate, with_gradients=True)  # (n, N, N)
    return view.readout_map(relevance), relevance


def _gradcam(view: TowerView) -> tuple[Tensor, Tensor | None]:
    return gradcam(view, None, NoParams()).heatmap, None  # type: ignore[arg-type]


def _agcam(view: TowerView) -> tuple[Tensor, Tensor | None]:
    return agcam(view, None, NoParams()).heatmap, None  # type: ignore[arg-type]


def _text_saliency(view: TowerView) -> tuple[Tensor, Tensor | None]:
    grad = view.tower.input_grad  # (n, L, D)
    if grad is None:
        raise RuntimeError("saliency's text relevance needs the token embeddings' gradient")
    return grad.abs().amax(dim=-1), None  # (n, L)


# method → (image tower read or None when the method runs its own image passes, text read)
TOWER_READS: dict[str, tuple[TowerRead | None, TowerRead]] = {
    "generic": (_generic, _generic),
    "gradcam": (_gradcam, _gradcam),
    "agcam": (_agcam, _agcam),
    "saliency": (None, _text_saliency),
}


@dataclass(frozen=True)
class PairPasses:
    """`ModelPasses` of the image tower scored against fixed texts: "classes" are the texts.

    Attributes:
        model: the adapter (its hooks are inert here: no recording is active in the thread).
        text_embeds: (M, D) unit text embeddings, detached.
        pixels: (n, 3, H, W) the explained images in [0, 1].
        interrupted: asked before every pass.
        max_rows: images per pass of `summed_input_gradients` (at least one copy of the batch).
    """

    model: ImageTextModel
    text_embeds: Tensor
    pixels: Tensor
    interrupted: Callable[[], bool] | None = None
    max_rows: int = 64

    def narrow(self, rows: slice) -> PairPasses:
        return dataclasses.replace(self, pixels=self.pixels[rows])

    def logits(self, pixels: Tensor) -> Tensor:
        """(n, 3, H, W) pixels in [0, 1] → (n, M) float32 similarity logits, no graph."""
        raise_if_interrupted(self.interrupted)
        with torch.no_grad():
            return self._logits(pixels.float()).float()

    def input_gradients(self, pixels: Tensor, targets: Tensor) -> Tensor:
        """∂y/∂pixels (n, 3, H, W) for y_i = logits[i, targets_i]: one backward for all n."""
        raise_if_interrupted(self.interrupted)
        with torch.enable_grad():
            pixels = pixels.detach().requires_grad_(True)
            chosen = self._logits(pixels).gather(1, targets[:, None].to(pixels.device))
            (grad,) = torch.autograd.grad(chosen.sum(), pixels)
        return grad

    def summed_input_gradients(self, copies: Iterable[Tensor], targets: Tensor) -> Tensor:
        """Σ over ``copies`` (each (n, 3, H, W)) of ∂y/∂x at the copy (`summed_gradients`)."""
        return summed_gradients(self.input_gradients, copies, targets, self.max_rows)

    def _logits(self, pixels: Tensor) -> Tensor:
        model = self.model
        images = model.encode_images(model.preprocess.normalise(pixels))  # (n, D)
        return model.similarity(images, self.text_embeds.to(images))  # (n, M)


def saliency_maps(
    model: ImageTextModel,
    images: TowerRecording,
    text_embeds: Tensor,
    pixels: Tensor,
    targets: Tensor,
    params: SaliencyParams,
    interrupted: Callable[[], bool] | None,
) -> Tensor:
    """Saliency's (n, H, W) image maps for one image round: n distinct images (pixels (n, 3,
    H, W) in [0, 1], their recording ``images``) and the (n,) texts they are paired with; the
    round's SmoothGrad samples / IG steps go through the tower several to a pass
    (`methods.saliency.attribution`)."""
    passes = PairPasses(model, text_embeds.detach(), pixels, interrupted)
    return saliency(TowerView(images, passes), targets, params).heatmap  # type: ignore[arg-type]


def reflection_maps(
    model: ImageTextModel,
    text_embeds: Tensor,
    pixels: Tensor,
    targets: Tensor,
    relevance: Tensor,
    row: Tensor,
    params: ReflectionParams,
    interrupted: Callable[[], bool] | None,
) -> Tensor:
    """Token reflection's (P, gh, gw) maps of P pairs, all masked images in one flat sequence.

    Args:
        pixels: (P, 3, H, W) each pair's image in [0, 1]; targets: (P,) its text.
        relevance: (P, N, N) Transformer Attribution's image relevance R of each pair.
        row: (P, gh, gw) the readout row of R over the patches.
    """
    graph = model.image_graph
    passes = PairPasses(model, text_embeds.detach(), pixels, interrupted)
    logits = reflect(
        relevance,
        pixels.float(),
        targets,
        passes.logits,
        grid=tuple(graph.grid),
        num_prefix_tokens=graph.num_prefix_tokens,
        batch_size=min(params.batch_size, passes.max_rows),
    )  # (P, gh, gw)
    return combine_maps(logits, row.to(logits.dtype), params.combine)

"""What one batch through a bi-modal model produced: its token bookkeeping and attention maps.

`BimodalTokens` says where the text and image tokens of a batch sit in the model's token sets
(the joint sequence of a single-stream model; the text and image streams of a two-stream one),
which of them are real, which row the answer is read at, and, for patch inputs, the grid cell
of each patch token. `BimodalRecording` holds the attention map of every edge of the model's
`AttentionGraph`, in ``graph.edges`` order, as the forward pass made them (still in its autograd
graph), and takes their gradients with one backward pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from vitlens_server.explain.graph.declare import AttentionGraph
from vitlens_server.explain.graph.engine import LayerMaps

if TYPE_CHECKING:
    from vitlens_server.models.bimodal.lrp_taps import LrpTape

__all__ = ["BimodalRecording", "BimodalTokens"]


@dataclass(frozen=True)
class BimodalTokens:
    """Token bookkeeping of one batch of B items, T text and M image positions.

    Attributes:
        text_set, image_set: the token sets holding the text and the image tokens (both
            ``"joint"`` for a single-stream model; ``"text"`` and ``"image"`` for two streams).
        text_positions: (T,) long, the position in ``text_set`` of text position t (column t
            of the token ids), the same for every item.
        image_positions: (M,) long, the position in ``image_set`` of image token m (patch slot
            m of ViLT, region m otherwise). A ViLT image-CLS token is at none of them.
        text_valid: (B, T) bool, True at the question's word tokens (not CLS, SEP, padding).
        image_valid: (B, M) bool, True at real patches / regions (not padding slots).
        readout_rows: (B,) long, the row of the answer token in the readout's query set (ViLT
            and LXMERT: the text CLS, 0; VisualBERT: ``text_mask.sum(1) - 2``).
        sizes: the number of tokens of each token set in this batch.
        patch_cells: (B, M, 2) long, the (row, col) grid cell of each patch token (ViLT); None
            for region inputs; (-1, -1) at padding slots.
        grid: (gh, gw), the batch's patch grid (ViLT); None for region inputs.
    """

    text_set: str
    image_set: str
    text_positions: Tensor
    image_positions: Tensor
    text_valid: Tensor
    image_valid: Tensor
    readout_rows: Tensor
    sizes: Mapping[str, int]
    patch_cells: Tensor | None = None
    grid: tuple[int, int] | None = None

    @property
    def batch_size(self) -> int:
        return int(self.text_valid.shape[0])

    def to_grid(self, image_relevance: Tensor) -> Tensor:
        """(B, M) per-patch values → (B, gh, gw) on the patch grid; padding slots dropped.

        Raises:
            ValueError: the batch has region inputs (no grid).
        """
        if self.patch_cells is None or self.grid is None:
            raise ValueError("region inputs have no patch grid")
        b = image_relevance.shape[0]
        gh, gw = self.grid
        cells = self.patch_cells.to(image_relevance.device)  # (B, M, 2)
        linear = cells[..., 0] * gw + cells[..., 1]  # (B, M)
        valid = self.image_valid.to(image_relevance.device)
        values = image_relevance.masked_fill(~valid, 0)
        linear = torch.where(valid, linear, torch.zeros_like(linear))  # padding adds 0 to cell 0
        out = image_relevance.new_zeros(b, gh * gw).scatter_add(1, linear, values)
        return out.view(b, gh, gw)


@dataclass
class BimodalRecording:
    """The attention maps one forward pass captured, one per edge of ``graph.edges``.

    Attributes:
        graph: the model's attention graph.
        captured: per edge, its map A (B, h, q, k), or None until the pass reaches it.
        tokens: the batch's token bookkeeping, set by the forward pass.
        lrp: what LRP reads (`lrp_taps.record_lrp`); None for a plain `BimodalModel.record`.
    """

    graph: AttentionGraph
    captured: list[Tensor | None] = field(default_factory=list)
    tokens: BimodalTokens | None = None
    lrp: LrpTape | None = None

    def __post_init__(self) -> None:
        if not self.captured:
            self.captured = [None] * len(self.graph.edges)

    @property
    def maps(self) -> list[Tensor]:
        """Every edge's map A (B, h, q, k), in ``graph.edges`` order, in the autograd graph.

        Raises:
            RuntimeError: the forward pass has not run (or not reached every edge).
        """
        self.check()
        return list(self.captured)  # type: ignore[arg-type]

    def check(self) -> None:
        """Raise RuntimeError, naming the edges, unless every edge has its map."""
        missing = [
            e.describe() for e, a in zip(self.graph.edges, self.captured, strict=True) if a is None
        ]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise RuntimeError(f"no attention map recorded for {', '.join(missing[:3])}{more}")

    def capture(self, edges: Sequence[int], attention: Tensor) -> Tensor:
        """Store ``attention`` as the first of ``edges`` (one module's edges, in call order)
        not yet filled, anchored so that it requires grad when the pass builds a graph.

        Raises:
            RuntimeError: the module ran more often than it has edges (a second forward pass
                in one recording).
        """
        for index in edges:
            if self.captured[index] is None:
                if torch.is_grad_enabled() and not attention.requires_grad:
                    attention = attention.detach().requires_grad_(True)
                self.captured[index] = attention
                return attention
        raise RuntimeError(
            f"{self.graph.edges[edges[0]].describe()} ran again: one forward pass per recording"
        )

    def gradients(self, target: Tensor, *, retain_graph: bool = False) -> list[Tensor]:
        """∂(Σ target)/∂A for every edge, in edge order; zeros where A does not reach it.

        ``target``: a scalar or the (B,) per-item scores to explain (e.g. ``logits[b, c_b]``):
        items do not interact, so one backward pass gives every item's own gradients.
        """
        maps = self.maps
        if not any(a.requires_grad for a in maps):
            raise RuntimeError(
                "the maps hold no autograd graph: run the forward pass with grad enabled "
                "(not under torch.no_grad or torch.inference_mode)"
            )
        found = torch.autograd.grad(
            target.sum(), maps, retain_graph=retain_graph, allow_unused=True
        )
        return [torch.zeros_like(a) if g is None else g for a, g in zip(maps, found, strict=True)]

    def layer_maps(self, target: Tensor, *, retain_graph: bool = False) -> list[LayerMaps]:
        """(A, ∂y/∂A) per edge, detached, for `vitlens_server.explain.graph.propagate`."""
        grads = self.gradients(target, retain_graph=retain_graph)
        return [LayerMaps(a.detach(), g) for a, g in zip(self.maps, grads, strict=True)]

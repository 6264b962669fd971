"""What a recording holds: per-layer attention tensors, LRP activations, the whole `Recording`,
and `ModelPasses`, the further model passes a method may run.

Filled by `AttentionHooks` (capture.py) during one forward pass and read by the methods; nothing
changes a recording once its forward pass is over: `Recording.narrow` (each request's rows; every
per-image tensor is batch-first) and `Recording.with_gradients` (one backward pass's gradients)
return new recordings that share the captured tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from vitlens_server.models.block_record import AttentionRecord, BlockRecord, narrow_rows

__all__ = ["AttentionRecord", "BlockRecord", "LrpRecord", "ModelPasses", "Recording"]


@dataclass
class LrpRecord:
    """What LRP reads besides the attention records: activations and the modules' weights.

    Attributes:
        layers: one `BlockRecord` per block.
        blocks: the model's blocks, whose Linear weights the rules read (never write).
        heads: the classifier Linear layers (``head``, plus ``head_dist`` for DeiT distilled).
        head_in: (B, D) input of each head; head_out: (B, C) its output.
        pool: the readout, ``token`` / ``distilled`` / ``avg``.
        pool_start: first token the average pool reads (P, or 0 when it includes the prefix).
        pooled: (B, D) output of the average pool (input of ``fc_norm``), ``avg`` only.
    """

    layers: list[BlockRecord]
    blocks: list[nn.Module]
    heads: list[nn.Linear]
    pool: str
    pool_start: int
    head_in: list[Tensor | None]
    head_out: list[Tensor | None]
    pooled: Tensor | None = None

    def narrow(self, rows: slice) -> LrpRecord:
        """The activations of the images ``rows`` of the batch (views, no copies)."""
        return dataclasses.replace(
            self,
            layers=[layer.narrow(rows) for layer in self.layers],
            head_in=[narrow_rows(t, rows) for t in self.head_in],
            head_out=[narrow_rows(t, rows) for t in self.head_out],
            pooled=narrow_rows(self.pooled, rows),
        )


class ModelPasses(Protocol):
    """Further passes of the explained model that a method runs itself (`Pass.EXTRA`).

    Attributes:
        pixels: (B, C, H, W) the explained images in [0, 1] on the model's device.
        max_rows: the most images one pass should take (the memory bound).
    """

    pixels: Tensor
    max_rows: int

    def logits(self, pixels: Tensor) -> Tensor:
        """(n, C, H, W) pixels in [0, 1] → (n, classes) float32 logits."""
        ...

    def input_gradients(self, pixels: Tensor, targets: Tensor) -> Tensor:
        """∂y_t/∂pixels, (n, C, H, W), of (n, C, H, W) pixels for (n,) targets."""
        ...

    def summed_input_gradients(self, copies: Iterable[Tensor], targets: Tensor) -> Tensor:
        """Σ over ``copies`` (each (B, C, H, W)) of ∂y_t/∂x at the copy, for (B,) targets."""
        ...

    def narrow(self, rows: slice) -> ModelPasses:
        """The same passes for the images ``rows`` of the batch."""
        ...


@dataclass
class Recording:
    """What one forward pass captured (and, after `with_gradients`, one backward pass).

    Attributes:
        layers: one record per block, input side first.
        num_heads: of the attention modules (the same in every block).
        num_prefix_tokens: P, tokens before the patch tokens.
        grid: (gh, gw) patch grid.
        readout: (N,) weights of the token rows the logits read — one-hot on the class token,
            half on each of the class and distillation tokens (DeiT distilled), uniform over
            the patch tokens (``global_pool='avg'``); None when the model pools otherwise.
        tokens: (B, N, D) output of the final norm, the tokens the classifier reads.
        classifier: (C, D) weight of the linear head (mean of both heads for DeiT distilled).
        pixels: (B, C, H, W) float32 explained images in [0, 1], as requested (not normalised).
        passes: further model passes, for methods that declare `Pass.EXTRA`.
        lrp: activations for layer-wise relevance propagation, when recorded with ``lrp=True``.
        relevance_wanted: whether the caller reads the method's (B, N, N) relevance; when
            False, methods whose map is one row of a product of N x N matrices compute that row
            alone (vector-matrix products, O(L·N²) instead of O(L·N³)) and return none.
    """

    layers: list[AttentionRecord]
    num_heads: int
    num_prefix_tokens: int
    grid: tuple[int, int]
    readout: Tensor | None = None
    classifier: Tensor | None = None
    tokens: Tensor | None = None
    pixels: Tensor | None = None
    passes: ModelPasses | None = None
    lrp: LrpRecord | None = None
    relevance_wanted: bool = True

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def scores(self, layer: int) -> Tensor:
        """Pre-softmax scores S_l = scale · q kᵀ, (B, H, N, N)."""
        rec = self.layers[layer]
        return (rec.q * rec.scale) @ rec.k.transpose(-2, -1)

    def attention(self, layer: int) -> Tensor:
        """Attention A_l = softmax(S_l), (B, H, N, N); rows sum to 1. The map the pass formed
        when it was recorded with ``maps=True``, else rebuilt from q and k."""
        formed = self.layers[layer].attn
        return formed if formed is not None else self.scores(layer).softmax(dim=-1)

    def attention_grad(self, layer: int) -> Tensor:
        """∂y/∂A_l for the targets of this recording's backward pass, (B, H, N, N)."""
        rec = self.layers[layer]
        if rec.out_grad is None:
            raise RuntimeError("attention gradients need a backward pass (passes include BACKWARD)")
        b, n, _ = rec.out_grad.shape
        grad = rec.out_grad.to(rec.v.dtype).view(b, n, self.num_heads, -1).transpose(1, 2)
        return grad @ rec.v.transpose(-2, -1)

    def model_passes(self) -> ModelPasses:
        """`passes`, for the methods that declare `Pass.EXTRA`; raises where there are none."""
        if self.passes is None:
            raise RuntimeError("this method runs model passes (passes include EXTRA)")
        return self.passes

    def readout_rows(self, matrix: Tensor) -> Tensor:
        """The readout's mix of the rows of a (..., N, N) token matrix, over the patch tokens.

        Returns (..., gh·gw): row 0 (the class token's) for class-token models, the mean of the
        class- and distillation-token rows for DeiT distilled, the mean of the patch rows for
        average-pooled models.
        """
        if self.readout is None:
            raise RuntimeError("this model has no fixed readout row (checked before queueing)")
        weights = self.readout.to(matrix.dtype)
        return torch.einsum("n,...nm->...m", weights, matrix)[..., self.num_prefix_tokens :]

    def readout_weights(self, batch: int, dtype: torch.dtype) -> Tensor:
        """(B, 1, N) the readout's row weights, the left end of a row-only product."""
        if self.readout is None:
            raise RuntimeError("this model has no fixed readout row (checked before queueing)")
        return self.readout.to(dtype).expand(batch, 1, -1)

    @staticmethod
    def row_times(row: Tensor, matrix: Tensor) -> Tensor:
        """(B, 1, N) row · (B, N, N) matrix → (B, 1, N), as a broadcast product summed over
        the rows: each entry's sum runs in the same order for every image, so equal images
        get bitwise-equal maps wherever they sit in the batch (a batched matrix-vector product
        does not promise that: its kernel depends on each operand's memory alignment)."""
        return (row.transpose(1, 2) * matrix).sum(dim=1, keepdim=True)

    def row_map(self, row: Tensor) -> Tensor:
        """(B, 1, N) readout row of a relevance matrix → its (B, gh, gw) map over the patches."""
        return row[:, 0, self.num_prefix_tokens :].reshape(row.shape[0], *self.grid)

    def readout_map(self, matrix: Tensor) -> Tensor:
        """`readout_rows` of a (B, N, N) matrix as a (B, gh, gw) map."""
        return self.readout_rows(matrix).reshape(matrix.shape[0], *self.grid)

    def narrow(self, rows: slice) -> Recording:
        """The recording of the images ``rows`` of the batch (views, no copies)."""
        return dataclasses.replace(
            self,
            layers=[layer.narrow(rows) for layer in self.layers],
            tokens=narrow_rows(self.tokens, rows),
            pixels=narrow_rows(self.pixels, rows),
            passes=None if self.passes is None else self.passes.narrow(rows),
            lrp=None if self.lrp is None else self.lrp.narrow(rows),
        )

    def attention_outputs(self) -> list[Tensor]:
        """O_l of every layer, (B, N, H·D): the tensors gradients are taken with respect to."""
        return [rec.out for rec in self.layers]

    def with_gradients(self, grads: Sequence[Tensor]) -> Recording:
        """This recording with ∂y/∂O_l of one backward pass, one (B, N, H·D) tensor per layer.

        A new recording (new `AttentionRecord`s sharing the captured tensors); this one is
        unchanged.
        """
        layers = [
            dataclasses.replace(layer, out_grad=grad)
            for layer, grad in zip(self.layers, grads, strict=True)
        ]
        return dataclasses.replace(self, layers=layers)

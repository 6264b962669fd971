"""What one pass through an image-text model's towers recorded: attention tensors per layer.

Each tower's attention graph is described by a `TowerGraph` (its token set, layers, heads and
the row its embedding is read at) and a pass through it by a `TowerRecording`: per layer the
queries, keys and values of the attention, and the attention output O_l that gradients are taken
with respect to. The maps are rebuilt from them:

    S_l  = scale · q kᵀ + M                 (B, h, N, N)  scores, M the additive mask (0 / -inf)
    A_l  = softmax(S_l)                     (B, h, N, N)  attention probabilities
    ∇A_l = ∂y/∂O_l · vᵀ                     (B, h, N, N)  since O_l = A_l v_l

where O_l is (B, N, h·d) with the heads side by side. Where a library's fused attention exposes
only its projected output Z_l = O_l Wᵀ + b (``torch.nn.MultiheadAttention``), the recording
keeps Z_l and W: ∂y/∂O_l = ∂y/∂Z_l · W, exactly.

Nothing changes a recording once its pass is over: `TowerRecording.with_gradients` (one backward
pass) and `TowerRecording.narrow` (rows of the batch) return new recordings sharing the tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from vitlens_server.models.block_record import AttentionRecord, BlockRecord, narrow_rows

__all__ = [
    "AttentionRecord",
    "BlockRecord",
    "ImageTextRecording",
    "TowerGraph",
    "TowerRecording",
]

READOUTS = ("token", "avg", "eot", "first", "last")


@dataclass(frozen=True)
class TowerGraph:
    """The attention graph of one tower, as the relevance engine walks it.

    Attributes:
        tower: ``image`` or ``text``.
        num_layers: attention layers, input side first.
        num_heads: heads of every layer.
        num_tokens: N, the tokens every layer attends over (image: prefix + gh·gw; text: the
            context length L).
        num_prefix_tokens: P, tokens before the patch tokens (class token, registers); 0 for text.
        grid: (gh, gw) patch grid of an image tower; None for text.
        causal: each token attends only to itself and earlier tokens (text towers of CLIP).
        readout: the row(s) the embedding is read at: ``token`` (the class token, row 0),
            ``avg`` (the mean of the patch rows), ``eot`` (each text's end-of-text token — its
            argmax / first-EOS position), ``first``/``last`` (row 0 / row N-1 of every text).
    """

    tower: str
    num_layers: int
    num_heads: int
    num_tokens: int
    num_prefix_tokens: int
    grid: tuple[int, int] | None
    causal: bool
    readout: str


@dataclass
class TowerRecording:
    """One tower's pass: a record per layer, the shared attention mask, the readout rows.

    Attributes:
        graph: the tower's attention graph.
        layers: one `AttentionRecord` per layer, input side first (empty until the tower runs).
        mask: additive mask broadcastable to (B, h, N, N), 0 where a query may attend and -inf
            where not (causal and padding masks of text towers); None for none. Every layer
            applies the same mask.
        read_rows: (B, N) weights of the rows the embedding is read at — one-hot on the class
            token or on each text's pooled (EOT) token, uniform over the patch rows for average
            pooling. ``read_rows @ R`` is the relevance map of a relevance matrix R (B, N, N).
        record_inputs: the pass keeps ``inputs`` (`TowerHooks.record(inputs=True)`).
        inputs: (B, N, D) the tower's input embeddings (text: the token embeddings), part of
            the pass's graph; None unless ``record_inputs``.
        input_grad: (B, N, D) ∂y/∂inputs of one backward pass (`with_input_gradient`).
        record_lrp: the pass keeps ``blocks`` and ``head_in`` (`TowerHooks.record(lrp=True)`).
        blocks: one `BlockRecord` per layer, or None.
        head_in: the output of the tower's final norm, (B, N, W) per token or (B, W) pooled,
            detached; None unless ``record_lrp``.
    """

    graph: TowerGraph
    layers: list[AttentionRecord]
    mask: Tensor | None = None
    read_rows: Tensor | None = None
    record_inputs: bool = False
    inputs: Tensor | None = None
    input_grad: Tensor | None = None
    record_lrp: bool = False
    blocks: list[BlockRecord] | None = None
    head_in: Tensor | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def batch_size(self) -> int:
        return 0 if not self.layers else int(self.layers[0].q.shape[0])

    def scores(self, layer: int) -> Tensor:
        """S_l = scale · q kᵀ + mask, (B, h, N, N), in float32 (or the records' wider dtype)."""
        rec = self.layers[layer]
        dtype = torch.promote_types(rec.q.dtype, torch.float32)
        scores = (rec.q.to(dtype) * rec.scale) @ rec.k.to(dtype).transpose(-2, -1)
        return scores if self.mask is None else scores + self.mask.to(dtype)

    def attention(self, layer: int) -> Tensor:
        """A_l = softmax(S_l), (B, h, N, N): rows sum to 1, masked entries are 0."""
        return self.scores(layer).softmax(dim=-1)

    def attention_grad(self, layer: int) -> Tensor:
        """∂y/∂A_l of this recording's backward pass, (B, h, N, N)."""
        rec = self.layers[layer]
        if rec.out_grad is None:
            raise RuntimeError(
                f"the {self.graph.tower} tower has no gradients: call gradients() on the capture"
            )
        grad = rec.out_grad.to(rec.v.dtype)  # (B, N, E)
        if rec.out_weight is not None:
            grad = grad @ rec.out_weight.to(rec.v.dtype)  # ∂y/∂O = ∂y/∂Z · W, (B, N, h·d)
        b, n, _ = grad.shape
        grad = grad.view(b, n, self.graph.num_heads, -1).transpose(1, 2)  # (B, h, N, d)
        return grad @ rec.v.transpose(-2, -1)

    def maps(self) -> list[tuple[Tensor, Tensor]]:
        """(A_l, ∂y/∂A_l) per layer, input side first, each (B, h, N, N): what the relevance
        engine's self-attention rule (Ā = mean_h((∇A ⊙ A)⁺), R ← R + Ā·R) consumes."""
        return [(self.attention(i), self.attention_grad(i)) for i in range(self.num_layers)]

    def attention_outputs(self) -> list[Tensor]:
        """The tensors of every layer gradients are taken with respect to, (B, N, E) each."""
        return [rec.out for rec in self.layers]

    def with_gradients(self, grads: Sequence[Tensor | None]) -> TowerRecording:
        """This recording with ∂y/∂out of one backward pass, one (B, N, E) tensor per layer
        (None: y does not depend on the layer; its gradient is zero)."""
        layers = [
            dataclasses.replace(rec, out_grad=torch.zeros_like(rec.out) if grad is None else grad)
            for rec, grad in zip(self.layers, grads, strict=True)
        ]
        return dataclasses.replace(self, layers=layers)

    def with_input_gradient(self, grad: Tensor | None) -> TowerRecording:
        """This recording with ∂y/∂inputs, (B, N, D), of one backward pass (None: zero)."""
        if self.inputs is None:
            raise RuntimeError(f"the {self.graph.tower} tower's pass did not record its inputs")
        return dataclasses.replace(
            self, input_grad=torch.zeros_like(self.inputs) if grad is None else grad
        )

    def narrow(self, rows: slice | Tensor) -> TowerRecording:
        """The recording of the batch items ``rows`` (views, no copies)."""
        layers = [rec.narrow(rows) for rec in self.layers]
        mask = self.mask
        if mask is not None and mask.shape[0] > 1:
            mask = mask[rows]
        return dataclasses.replace(
            self,
            layers=layers,
            mask=mask,
            read_rows=narrow_rows(self.read_rows, rows),
            inputs=narrow_rows(self.inputs, rows),
            input_grad=narrow_rows(self.input_grad, rows),
            blocks=None if self.blocks is None else [b.narrow(rows) for b in self.blocks],
            head_in=narrow_rows(self.head_in, rows),
        )


@dataclass
class ImageTextRecording:
    """Both towers of one recorded pass (a tower that did not run has no layers)."""

    images: TowerRecording
    texts: TowerRecording

    def towers(self) -> tuple[TowerRecording, TowerRecording]:
        return self.images, self.texts

"""What the hooks record per layer: `AttentionRecord`, one attention layer's tensors (every
method reads them), and `BlockRecord`, one block's activations for layer-wise relevance
propagation.

One type each for every model they are recorded on: timm ViT blocks (classifiers, and timm
image towers) and the open_clip and Hugging Face blocks of image-text towers. The hooks that fill
them live with their models (`explain.capture` for classifiers, `models.image_text.hooks` and
`models.image_text.lrp_taps`); the rules that read them are `explain`'s.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import Tensor

__all__ = ["AttentionRecord", "BlockRecord", "narrow_rows"]


@dataclass
class AttentionRecord:
    """Tensors of one attention layer (classifiers' and image-text towers' alike).

    Attributes:
        q, k, v: (B, h, N, d) queries (after any q-norm), keys, values; detached.
        out: (B, N, E) the tensor gradients are taken with respect to: O_l itself (E = h·d), or
            the projected output Z_l where ``out_weight`` is set; part of the pass's graph.
        out_weight: (E, h·d) W with Z_l = O_l Wᵀ + b, so that ∂y/∂O_l = ∂y/∂Z_l · W; None when
            ``out`` is O_l.
        out_grad: (B, N, E) ∂y/∂out of one backward pass (``with_gradients`` of the recording).
        scale: the factor of q kᵀ (head_dim ** -0.5 in every supported tower).
        attn: (B, h, N, N) the attention map A itself, where the pass formed it (timm's unfused
            path, `explain.attention_maps`); None: rebuilt from q and k.
    """

    q: Tensor | None = None
    k: Tensor | None = None
    v: Tensor | None = None
    out: Tensor | None = None
    out_weight: Tensor | None = None
    out_grad: Tensor | None = None
    scale: float = 1.0
    attn: Tensor | None = None

    def narrow(self, rows: slice | Tensor) -> AttentionRecord:
        """The record of the batch items ``rows`` (views, no copies; ``out_weight`` is shared)."""
        return dataclasses.replace(
            self, **{name: narrow_rows(getattr(self, name), rows) for name in _BATCH_FIRST}
        )


_BATCH_FIRST = ("q", "k", "v", "out", "out_grad", "attn")  # AttentionRecord's (B, ...) fields


def narrow_rows(tensor: Tensor | None, rows: slice | Tensor) -> Tensor | None:
    """``tensor[rows]`` (the batch items ``rows`` of a batch-first tensor), None for None."""
    return None if tensor is None else tensor[rows]


@dataclass
class BlockRecord:
    """One block's activations; W the model width, F the MLP width; all detached.

    Block: x_mid = x + attn_branch, attn_branch = ls1(attn(norm1(x))); out = x_mid + mlp_branch,
    mlp_branch = ls2(fc2(act(fc1(norm2(x_mid))))).

    Attributes:
        x: (B, N, W) block input.
        qkv_in: (B, N, W) norm1(x), the input of the q, k, v projections.
        proj_in: (B, N, h·d) input of the output projection (O = A·V, through ``attn.norm``
            where timm has one); None where the library's fused attention never exposes it
            (``nn.MultiheadAttention``: rebuilt as A·V).
        attn_branch, mlp_branch: (B, N, W) the two residual branches.
        fc1_in: (B, N, W) norm2(x_mid); fc2_in: (B, N, F) the input of the second MLP layer.
    """

    x: Tensor | None = None
    qkv_in: Tensor | None = None
    proj_in: Tensor | None = None
    attn_branch: Tensor | None = None
    fc1_in: Tensor | None = None
    fc2_in: Tensor | None = None
    mlp_branch: Tensor | None = None

    def narrow(self, rows: slice | Tensor) -> BlockRecord:
        """The record of the batch items ``rows`` (every field is batch-first; views)."""
        fields = dataclasses.fields(self)
        return dataclasses.replace(
            self, **{f.name: narrow_rows(getattr(self, f.name), rows) for f in fields}
        )

"""`BlockRecord`: one transformer block's activations for layer-wise relevance propagation.

One type for every block LRP walks: timm ViT blocks (classifiers, and timm image towers) and
the open_clip and Hugging Face blocks of image-text towers. The hooks that fill it live with
their models (`explain.capture` for classifiers, `models.image_text.lrp_taps`); the rules that
read it are `explain.relevance`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["BlockRecord"]


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

"""Forward-only attention methods: raw attention and attention rollout.

Equations write the class token's row as row 0; for other readouts (DeiT distilled, average
pooling) the row is `Recording.readout_rows`, the mix of token rows the classifier reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vitlens_server.errors import InvalidArgument
from vitlens_server.explain.params import NoParams, choice, param
from vitlens_server.explain.records import Recording
from vitlens_server.explain.registry import MethodOutput, Pass, register_method

__all__ = ["MAX_LAYERS", "RolloutParams", "augmented_attention", "raw_attention", "rollout"]


MAX_LAYERS = 1024  # bound of the start_layer options; each is checked against the model's own


@register_method(
    "raw_attention",
    passes=Pass.FORWARD,
    class_specific=False,
    relevance_matrix=True,
    description="Last block's attention from the class token, mean over heads (Chefer 2021 "
    "baseline).",
)
def raw_attention(rec: Recording, _targets: Tensor, _params: NoParams) -> MethodOutput:
    """map = mean_h A_L[:, h, 0, P:]; relevance = mean_h A_L, (B, N, N)."""
    attn = rec.attention(rec.num_layers - 1).mean(dim=1)  # (B, N, N)
    return MethodOutput(rec.readout_map(attn), attn)


@dataclass(frozen=True)
class RolloutParams:
    head_fusion: str = choice("mean", "mean", "max", "min", doc="How heads are fused per layer.")
    discard_ratio: float = param(
        0.0,
        "Fraction of the lowest fused attention weights of each layer (per image, over the whole "
        "N x N matrix) set to zero before adding the identity.",
        low=0.0,
        high=0.99,
    )
    start_layer: int = param(
        0, "First block included in the product (0 = all blocks).", low=0, high=MAX_LAYERS
    )

    def check(self, num_layers: int) -> None:
        if self.start_layer >= num_layers:
            raise InvalidArgument(
                f"rollout.start_layer must be below the model's {num_layers} layers; "
                f"got {self.start_layer}"
            )


@register_method(
    "rollout",
    passes=Pass.FORWARD,
    class_specific=False,
    relevance_matrix=True,
    params=RolloutParams,
    description="Attention rollout (Abnar & Zuidema 2020): product of head-fused, "
    "identity-augmented, row-normalised attention over the blocks.",
)
def rollout(rec: Recording, _targets: Tensor, params: RolloutParams) -> MethodOutput:
    """R = Ã_L ··· Ã_s with Ã_l = norm_rows(fuse_h(A_l) + I); map = R[0, P:].

    Without ``rec.relevance_wanted`` only the readout row is formed, from the left:
    r = ((w Ã_L) Ã_{L−1}) ··· Ã_s, (B, 1, N) — the same map, no N x N product.
    """
    layers = range(params.start_layer, rec.num_layers)
    if not rec.relevance_wanted:
        row: Tensor | None = None
        for layer in reversed(layers):
            augmented = augmented_attention(rec, layer, params)
            if row is None:
                row = rec.readout_weights(augmented.shape[0], augmented.dtype)
            row = rec.row_times(row, augmented)
        return MethodOutput(rec.row_map(row))
    result: Tensor | None = None
    for layer in layers:
        augmented = augmented_attention(rec, layer, params)
        result = augmented if result is None else augmented @ result
    return MethodOutput(rec.readout_map(result), result)


def augmented_attention(
    rec: Recording, layer: int, params: RolloutParams, dtype: torch.dtype | None = None
) -> Tensor:
    """Ã_l = norm_rows(fuse_h(A_l) + I), (B, N, N), computed in ``dtype`` after the fusion."""
    fused = _fuse_heads(rec.attention(layer), params.head_fusion)  # (B, N, N)
    if params.discard_ratio > 0:
        fused = _discard_lowest(fused, params.discard_ratio)
    if dtype is not None:
        fused = fused.to(dtype)
    augmented = fused + torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
    return augmented / augmented.sum(dim=-1, keepdim=True)


def _fuse_heads(attn: Tensor, how: str) -> Tensor:
    """(B, H, N, N) → (B, N, N)."""
    if how == "max":
        return attn.amax(dim=1)
    if how == "min":
        return attn.amin(dim=1)
    return attn.mean(dim=1)


def _discard_lowest(fused: Tensor, ratio: float) -> Tensor:
    """Zero the ``ratio`` fraction of lowest entries of each (N, N) matrix of (B, N, N)."""
    flat = fused.flatten(1)
    count = int(flat.shape[1] * ratio)
    if count == 0:
        return fused
    lowest = flat.topk(count, dim=1, largest=False).indices
    return flat.scatter(1, lowest, 0.0).view_as(fused)

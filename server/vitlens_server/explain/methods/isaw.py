"""I-SAW: self-attention maps weighted for a class and aggregated over the blocks.

Mallick, Benois-Pineau & Zemmari, "I-SAW: a self-attention weighted method for explanation of
visual transformers", ICIP 2022, pp. 3271-3275, as summarised in seed 002 §4.1:

    A_SAW^(c) = Σ_l α^(l) A_c^(l),    A_SAW^(c) ← (A_SAW^(c) − min) / (max − min)

with A_c^(l) "the self-attention map at layer l weighted for the specific class c" and α^(l)
"the weight assigned to the attention map from layer l". The ICIP text itself could not be
retrieved (no public code exists; the stored sources hold only its abstract: "the use and
weighting [of] self-attention maps", "model agnostic but class-specific"), so how A_c^(l) is
weighted and what α^(l) is are this module's choices, stated here and in docs/methods.md:

* Class weighting (choice): Grad-CAM's channel weights with the heads as channels, the reading
  the survey's placement among gradient-based methods suggests and the weights vitlens's
  `gradcam` uses for the last block (Chefer et al. 2021). With r the readout row
  (`Recording.readout_rows`: the class token's row 0, generalised to the row mix the classifier
  reads), P prefix tokens, J = gh·gw patch tokens and ∇A_l = ∂y_c/∂A_l:

      g_{l,h}   = (1/J) Σ_j ∇A_l[h, r, P+j]                       (B, H)
      A_c^(l)_j = (1/H) Σ_h g_{l,h} · A_l[h, r, P+j]              (B, J)

  No ReLU: seed 002's equations have none and rely on the final min-max alone, which maps the
  signed sum to [0, 1] (a ReLU per block, as in Grad-CAM, turns the whole map to zeros where
  the weighted sum is negative at every patch of every block).

* Layer weights (choice): uniform over the aggregated blocks l = s … L−1 (0-based,
  s = ``start_layer``), α^(l) = 1/(L − s). Each A_c^(l) already scales with the class
  gradient reaching block l, so blocks that matter more for class c weigh more without a
  second, invented weighting.

* Min-max normalisation (seed 002): over the J patch entries of each image; a constant map
  becomes all zeros. The map is (B, gh, gw) in [0, 1].

Min-max makes the map invariant to a positive scale of the gradients; flipping their sign
gives 1 − map (both tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vitlens_server.errors import InvalidArgument
from vitlens_server.explain.methods.attention import MAX_LAYERS
from vitlens_server.explain.params import param
from vitlens_server.explain.records import Recording
from vitlens_server.explain.registry import MethodOutput, Pass, register_method

__all__ = ["IsawParams", "isaw"]


@dataclass(frozen=True)
class IsawParams:
    start_layer: int = param(
        0,
        "First block aggregated (0 = all blocks); the layer weights are 1/(L - start_layer).",
        low=0,
        high=MAX_LAYERS,
    )

    def check(self, num_layers: int) -> None:
        if self.start_layer >= num_layers:
            raise InvalidArgument(
                f"isaw.start_layer must be below the model's {num_layers} layers; "
                f"got {self.start_layer}"
            )


@register_method(
    "isaw",
    passes=Pass.BACKWARD,
    class_specific=True,
    params=IsawParams,
    description="I-SAW (Mallick, Benois-Pineau & Zemmari, ICIP 2022): class-token attention of "
    "every block, heads weighted by their mean class gradient, averaged over the blocks, "
    "min-max normalised.",
)
def isaw(rec: Recording, _targets: Tensor, params: IsawParams) -> MethodOutput:
    """map = minmax(Σ_l α^(l) mean_h g_{l,h} A_l[h, r, P:]); g_{l,h} = mean_j ∇A_l[h, r, P+j]."""
    layers = range(params.start_layer, rec.num_layers)
    total: Tensor | None = None
    for layer in layers:
        attn = rec.readout_rows(rec.attention(layer))  # (B, H, J)
        grad = rec.readout_rows(rec.attention_grad(layer))  # (B, H, J)
        weights = grad.mean(dim=-1, keepdim=True)  # (B, H, 1)
        term = (weights * attn).mean(dim=1)  # (B, J)
        total = term if total is None else total + term
    heatmap = _min_max(total / len(layers))
    return MethodOutput(heatmap.reshape(-1, *rec.grid))


def _min_max(maps: Tensor) -> Tensor:
    """(B, J) → (B, J), each row scaled to [0, 1]; a constant row becomes zeros."""
    low = maps.amin(dim=-1, keepdim=True)
    span = maps.amax(dim=-1, keepdim=True) - low
    scaled = (maps - low) / span.clamp(min=torch.finfo(maps.dtype).tiny)
    return torch.where(span > 0, scaled, torch.zeros_like(maps))

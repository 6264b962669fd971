"""Class activation mapping adapted to ViT."""

from __future__ import annotations

from torch import Tensor

from vitlens_server.explain.params import NoParams
from vitlens_server.explain.records import Recording
from vitlens_server.explain.registry import MethodOutput, Pass, register_method

__all__ = ["cam"]


@register_method(
    "cam",
    passes=Pass.FORWARD,
    class_specific=True,
    readouts=None,
    description="CAM (Zhou et al. 2016) adapted to ViT: each patch token after the final norm "
    "scored by the classifier row of the explained class.",
)
def cam(rec: Recording, targets: Tensor, _params: NoParams) -> MethodOutput:
    """map_i = w_c · z_i for the patch tokens z_i (B, gh·gw, D) and classifier rows w_c (B, D)."""
    if rec.tokens is None or rec.classifier is None:
        raise RuntimeError("cam needs the final-norm tokens and a linear classifier head")
    patches = rec.tokens[:, rec.num_prefix_tokens :]  # (B, gh·gw, D)
    rows = rec.classifier[targets]  # (B, D)
    heatmap = (patches * rows[:, None, :]).sum(dim=-1)
    return MethodOutput(heatmap.reshape(-1, *rec.grid))

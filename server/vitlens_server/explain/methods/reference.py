"""Reference rows for Evaluate: `random` (a floor) and `oracle` (a ceiling).

``random``: uniform noise U[0, 1) on the token grid, the same for every explained class and
a deterministic function of the seed and the image's content. Each entry is a counter-based hash
of (seed, image key c_b, patch index j), so a map depends on nothing else — not the image's place
in the batch, the batch size, the device or the dtype — and the same image always gets the same
map (batched == batch-1, and cacheable):

    h(x)   = lowbias32 (C. Wellons' 32-bit integer hash):
             x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16  (mod 2³²)
    c_b    = Σ_p h((p · 256 + v_b[p]) mod 2³²)  mod 2³²      v_b: the image's pixels as 0..255
    k[b,j] = h(h(h(seed) ^ c_b) ^ j)
    map[b, j] = (k[b, j] >> 8) · 2⁻²⁴                                   ∈ [0, 1 − 2⁻²⁴]

``oracle``: the ground-truth mask itself. A ``needs_mask`` method: its function takes the
masks in place of a recording. Explain has no mask input, so it is refused there
(`Explainer.check` answers INVALID_ARGUMENT, and ModelInfo leaves it out of the methods
Explain accepts); Evaluate calls it with the dataset's masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vitlens_server.explain.params import NoParams, param
from vitlens_server.explain.records import Recording
from vitlens_server.explain.registry import MethodOutput, Pass, register_method

__all__ = ["RandomParams", "image_keys", "oracle", "oracle_map", "random_map"]

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class RandomParams:
    seed: int = param(
        0,
        "Seed of the noise; with the image's content it fixes that image's map.",
        low=0,
        high=_MASK32,
    )


@register_method(
    "random",
    passes=Pass.FORWARD,
    class_specific=False,
    readouts=None,
    params=RandomParams,
    description="Reference row: uniform noise U[0, 1) on the token grid, seeded by the request "
    "and the image's content.",
)
def random_map(rec: Recording, _targets: Tensor, params: RandomParams) -> MethodOutput:
    """map[b, j] = (h(h(h(seed) ^ c_b) ^ j) >> 8) · 2⁻²⁴, (B, gh, gw) in the model's dtype."""
    like = rec.layers[0].q  # (B, H, N, D): dtype and device of the model
    batch, (gh, gw) = rec.pixels.shape[0], rec.grid
    device = like.device
    seed = _hash32(torch.tensor(params.seed, dtype=torch.int64, device=device))
    images = image_keys(rec.pixels)[:, None]  # (B, 1)
    patches = torch.arange(gh * gw, dtype=torch.int64, device=device)  # (J,)
    keys = _hash32(_hash32(seed ^ images) ^ patches)  # (B, J)
    noise = (keys >> 8).to(torch.float32) * 2.0**-24  # exact in float32, < 1
    below_one = 1 - torch.finfo(like.dtype).eps / 2  # the largest value under 1 in that dtype
    return MethodOutput(noise.to(like.dtype).clamp(max=below_one).reshape(batch, gh, gw))


def image_keys(pixels: Tensor) -> Tensor:
    """(B, C, H, W) pixels in [0, 1] → (B,) int64 content keys c_b in [0, 2³²)."""
    values = (pixels.flatten(1).float() * 255).round().to(torch.int64)  # (B, C·H·W) 0..255
    positions = torch.arange(values.shape[1], dtype=torch.int64, device=values.device)
    return _hash32(((positions << 8) + values) & _MASK32).sum(dim=1) & _MASK32


def _hash32(x: Tensor) -> Tensor:
    """lowbias32 on int64 tensors holding values in [0, 2³²)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mul32(x: Tensor, factor: int) -> Tensor:
    """x · factor mod 2³² without int64 overflow: 16-bit halves keep every product below 2⁴⁸."""
    high = ((x >> 16) * factor) & 0xFFFF
    return ((high << 16) + (x & 0xFFFF) * factor) & _MASK32


@register_method(
    "oracle",
    passes=Pass.FORWARD,
    class_specific=True,
    readouts=None,
    needs_mask=True,
    description="Reference row: the ground-truth mask of the explained object (Evaluate only, "
    "on datasets with masks).",
)
def oracle(masks: Tensor, _targets: Tensor, _params: NoParams) -> MethodOutput:
    """map = the (B, H, W) ground-truth masks (`oracle_map`). A ``needs_mask`` method: its
    first argument is the masks, not a recording; Explain refuses it (`Explainer.check`)."""
    return MethodOutput(oracle_map(masks))


def oracle_map(masks: Tensor) -> Tensor:
    """Ground-truth masks as relevance maps: (B, H, W) bool/integer/float → (B, H, W) float.

    Boolean and integer masks become 1.0 on the object (nonzero) and 0.0 elsewhere, in float32;
    floating masks (soft masks) are returned as they are. The device is kept.
    """
    if masks.dim() != 3:
        raise ValueError(f"oracle_map takes (B, H, W) masks; got shape {tuple(masks.shape)}")
    if masks.is_floating_point():
        return masks
    return (masks != 0).to(torch.float32)

"""Token reflection (Sago & Hotta, ICPRAM 2024, seed 004): Transformer Attribution refined by
classifying images that reflect the relevance among image tokens.

With R the (N, N) Transformer Attribution relevance (Chefer et al. 2021), the paper works on
R = R[P:, P:], its (T, T) block over the T = gh·gw patch tokens; column j, R(:, j), is "the
relevance of all tokens to token j" that the j-th image reflects:

    R'  = R ⊙ (1 − I)                                       (Eq. 1)
    R'' = R' + diag_j(max_i R'(i, j))                       (Eq. 2)
    M(i, j) = norm_i(R''(:, j))(i) · norm_j(max_i R''(i, ·))(j)     (Fig. 4)
    X'_j = X ⊙ interp(reshape(M(:, j)))                     (Eq. 3-4; nearest, to H x W)
    l_j  = f(X'_j)[c]                                       (logit of the explained class c)
    map  = l + R[0, P:]                                     (Fig. 3)

Choices the paper leaves open, fixed here:
- Eq. 2 takes the maximum over all i of R', whose diagonal is 0; for Transformer Attribution's
  non-negative R that is the maximum of the other entries of the column, as the text says.
- "normalize" in Fig. 4 is min-max normalisation, (x − min) / (max − min), both within each
  column (red matrix) and across the column maxima (green vector), so every mask lies in [0, 1],
  the diagonal of M equals the green vector and the largest entry is 1. A constant column (or a
  constant vector of maxima) normalises to 0.
- X is the image in pixel space ([0, 1], before the model's mean/std normalisation), so masked-out
  regions become black, as pixels removed by vitlens' Average Drop metric are.
- c is the explained class (the prediction unless the request names a class); the paper uses
  the predicted class.
- The sum of Fig. 3 is unscaled: raw logits l plus the raw Transformer Attribution row, as the
  paper writes it (`combine="sum"`); `combine="minmax"` min-max normalises each term per image
  first, so both weigh equally. "Row 0" is `Recording.readout_rows` for non class-token readouts.
- The final bilinear upsampling of the paper is the service's post-processing (grid="input").
METHODS.md states the same equations and asks for the scaling to be stated; it does not
contradict the paper.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from vitlens_server.explain.params import choice, param
from vitlens_server.explain.records import Recording
from vitlens_server.explain.registry import ExtraCount, MethodOutput, Pass, register_method

__all__ = [
    "ReflectionParams",
    "combine_maps",
    "reflect",
    "reflected_images",
    "reflection_masks",
    "token_reflection",
]

LogitsFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class ReflectionParams:
    batch_size: int = param(
        256,
        "Masked images per forward pass, at most (the server's max batch size bounds it too); "
        "the gh·gw masked images of every explained image are flattened into one sequence and "
        "classified in chunks of this size.",
        low=1,
        high=8192,
    )
    combine: str = choice(
        "sum",
        "sum",
        "minmax",
        doc="How the reflected logits l and the Transformer Attribution row r are added: 'sum' "
        "l + r unscaled, as in the paper; 'minmax' minmax(l) + minmax(r) per image.",
    )


@register_method(
    "token_reflection",
    passes=Pass.BACKWARD | Pass.LRP | Pass.EXTRA,
    class_specific=True,
    params=ReflectionParams,
    extra=lambda _params, tokens: ExtraCount(forwards=tokens),  # one masked image per token
    description="Token reflection (Sago & Hotta, ICPRAM 2024): each patch token's Transformer "
    "Attribution relevance to all tokens masks the image, the masked images are classified, and "
    "the explained class's logits are added to the Transformer Attribution map.",
)
def token_reflection(rec: Recording, targets: Tensor, params: ReflectionParams) -> MethodOutput:
    """map = l + r, l from `reflect` on TA's relevance R, r = readout row of R over the patches.

    Returns a (B, gh, gw) map; B·gh·gw masked images classified through ``rec.passes`` in
    chunks of ``params.batch_size``.
    """
    passes = rec.model_passes()
    relevance = _transformer_attribution(rec, targets)  # (B, N, N)
    logits = reflect(
        relevance,
        passes.pixels,
        targets,
        passes.logits,
        grid=rec.grid,
        num_prefix_tokens=rec.num_prefix_tokens,
        batch_size=min(params.batch_size, passes.max_rows),
    )  # (B, gh, gw)
    row = rec.readout_map(relevance).to(logits.dtype)  # (B, gh, gw)
    return MethodOutput(combine_maps(logits, row, params.combine))


def _transformer_attribution(rec: Recording, targets: Tensor) -> Tensor:
    """Transformer Attribution's (B, N, N) relevance for ``targets`` (B,).

    Imported here, not at module level, so this module registers before ``lrp.py`` is loaded.
    """
    from vitlens_server.explain.methods.lrp import transformer_attribution_relevance

    return transformer_attribution_relevance(rec, targets)


def reflection_masks(relevance: Tensor, num_prefix_tokens: int) -> Tensor:
    """Masks M of Eq. 1-2 and Fig. 4 from a (B, N, N) relevance matrix.

    Returns (B, T, T), T = N − P; column j (``M[:, :, j]``) is the mask of token j, the weights
    of all T tokens in the image that reflects token j's relevance. Entries lie in [0, 1].
    """
    r = relevance[:, num_prefix_tokens:, num_prefix_tokens:]  # (B, T, T), R(i, j)
    eye = torch.eye(r.shape[-1], dtype=torch.bool, device=r.device)
    r1 = r.masked_fill(eye, 0.0)  # Eq. 1: R' = R ⊙ (1 − I)
    column_max = r1.amax(dim=1, keepdim=True)  # (B, 1, T): max_i R'(i, j)
    r2 = torch.where(eye, column_max, r1)  # Eq. 2: the diagonal becomes the column maximum
    top = r2.amax(dim=1, keepdim=True)  # (B, 1, T)
    red = _minmax(r2, r2.amin(dim=1, keepdim=True), top)  # each column to [0, 1]
    green = _minmax(top, top.amin(dim=2, keepdim=True), top.amax(dim=2, keepdim=True))
    return red * green  # Fig. 4: red ⊙ green, broadcast over i


def reflected_images(
    masks: Tensor, pixels: Tensor, owners: Tensor, tokens: Tensor, grid: tuple[int, int]
) -> Tensor:
    """Eq. 3-4 for selected (image, token) pairs: X_b ⊙ interp(reshape(M_b(:, j))).

    Args:
        masks: (B, T, T) from `reflection_masks`.
        pixels: (B, C, H, W) images in [0, 1].
        owners, tokens: (n,) image index b and token index j of each masked image.
        grid: (gh, gw) patch grid, T = gh·gw, tokens in row-major order.

    Returns:
        (n, C, H, W); the mask is upsampled by nearest neighbour: pixel (y, x) takes the weight
        of patch (⌊y·gh/H⌋, ⌊x·gw/W⌋), in integer arithmetic so patch borders are exact. When
        the patches tile the image, the mask multiplies a (gh, ph, gw, pw) view of the images
        and is never upsampled in memory.
    """
    gh, gw = grid
    count, channels, height, width = owners.shape[0], *pixels.shape[1:]
    columns = masks[owners, :, tokens].to(pixels.dtype)  # (n, T): column j of image b's M
    images = pixels.index_select(0, owners).contiguous()  # (n, C, H, W), multiplied in place
    if height % gh == 0 and width % gw == 0:
        patches = images.view(count, channels, gh, height // gh, gw, width // gw)
        patches.mul_(columns.view(count, 1, gh, 1, gw, 1))
        return images
    rows = torch.arange(height, device=pixels.device) * gh // height  # (H,)
    cols = torch.arange(width, device=pixels.device) * gw // width  # (W,)
    columns = columns.view(count, 1, gh, gw)
    return images.mul_(columns.index_select(2, rows).index_select(3, cols))


def reflect(
    relevance: Tensor,
    pixels: Tensor,
    targets: Tensor,
    logits_fn: LogitsFn,
    *,
    grid: tuple[int, int],
    num_prefix_tokens: int,
    batch_size: int = 256,
) -> Tensor:
    """Reflected logits l: the explained class's logit of each token's masked image.

    Args:
        relevance: (B, N, N) token relevance (Transformer Attribution's R).
        pixels: (B, C, H, W) the explained images in [0, 1].
        targets: (B,) explained classes.
        logits_fn: (n, C, H, W) pixels → (n, classes) logits, e.g. `ModelPasses.logits`.
        grid: (gh, gw) patch grid; N = P + gh·gw.
        num_prefix_tokens: P.
        batch_size: masked images per ``logits_fn`` call. The B·T masked images are one flat
            sequence (image-major), so chunks span images; only one chunk exists at a time.

    Returns:
        (B, gh, gw) map, l_j = logits_fn(X'_j)[target] (Eq. 3-4 and Fig. 3).
    """
    masks = reflection_masks(relevance, num_prefix_tokens)  # (B, T, T)
    batch, tokens = masks.shape[:2]
    device = pixels.device
    owners = torch.arange(batch, device=device).repeat_interleave(tokens)  # (B·T,)
    token_ids = torch.arange(tokens, device=device).repeat(batch)  # (B·T,)
    classes = targets.to(device).repeat_interleave(tokens)[:, None]  # (B·T, 1)
    chunks = []
    for start in range(0, batch * tokens, batch_size):
        part = slice(start, start + batch_size)
        images = reflected_images(masks, pixels, owners[part], token_ids[part], grid)
        chunks.append(logits_fn(images).gather(1, classes[part]).squeeze(1))
        del images  # free this chunk before the next one is built
    return torch.cat(chunks).view(batch, *grid)


def combine_maps(logits: Tensor, row: Tensor, how: str = "sum") -> Tensor:
    """Fig. 3's sum of the reflected logits and the attribution row, both (B, gh, gw)."""
    if how == "minmax":
        flat_l, flat_r = logits.flatten(1), row.flatten(1)
        logits = _minmax(flat_l, *_extrema(flat_l)).view_as(logits)
        row = _minmax(flat_r, *_extrema(flat_r)).view_as(row)
    return logits + row


def _extrema(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row minimum and maximum of a (B, K) tensor, each (B, 1)."""
    return x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)


def _minmax(x: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """(x − low) / (high − low), and 0 where high == low."""
    span = high - low
    safe = torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, (x - low) / safe, torch.zeros_like(x))

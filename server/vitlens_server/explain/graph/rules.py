"""The relevance update rules of seed 003 (Chefer, Gur & Wolf, ICCV 2021, Eq. 5-12), batched.

Every function takes and returns tensors with a leading batch dimension B, computes on their
device in their dtype, and changes none of its inputs. R^{xy} is (B, |x|, |y|); Ā is (B, q, k).
The update rules return additions; the caller adds them (R + ΔR), so several edges of one step
can all read the state before it.

    Eq. 5    Ā = E_h((∇A ⊙ A)⁺)                     `head_mean` (Eq. 13: R^A in place of A)
    Eq. 6    R^{qq} ← R^{qq} + Ā·R^{qq}               `self_addition`
    Eq. 7    R^{qk} ← R^{qk} + Ā·R^{qk}               `self_addition`, each k mixed into q
    Eq. 8-9  R̄^{qq} = R̂^{qq} / rowsum(R̂^{qq}) + I,  R̂^{qq} = R^{qq} − I     `normalised_self`
    Eq. 10   R^{qk} ← R^{qk} + (R̄^{qq})ᵀ·Ā·R̄^{kk}    `bi_addition`
    Eq. 11   R^{qq} ← R^{qq} + Ā·R^{kq}               `bi_addition` (bi layers, not cross)
    Eq. 12   R^{qk} = (R^{qq})ᵀ·Ā·R^{kk}              `paired_relevance` (rollout baseline)

Zero rows (Eq. 8-9). A row m of R̂^{qq} sums to 0 exactly when token m has gathered no context
yet — always the case before the first self-attention layer of its set (R^{qq} = I), and
whenever every earlier Ā of the set had a zero row m (e.g. zero gradients). Since Ā ≥ 0 and
R starts at I and 0, R̂ ≥ 0 elementwise, so a zero sum means a zero row. Such a row is left at
zero, so R̄^{qq} is the identity on it: the token stands for itself alone, which is what Eq. 9
gives in the limit of a vanishing contextualisation (the identity part "sets the value for
each token w.r.t. itself as 1"). The authors' public code divides without a guard: 0/0 = NaN;
their LXMERT path never meets a zero row (self-attention encoders precede the co-attention),
and their DETR path replaces NaN entries of the Eq. 10 addition by 0 — but one NaN row of R̄
makes every entry of (R̄^{qq})ᵀ·Ā·R̄^{kk} NaN, so there the whole layer's update is dropped.
Where no row is zero, both agree with this rule exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "bi_addition",
    "head_mean",
    "identity",
    "normalised_self",
    "paired_relevance",
    "self_addition",
]


def head_mean(attention: Tensor, gradient: Tensor) -> Tensor:
    """Eq. 5, Ā = mean_h((∇A ⊙ A)⁺): (B, h, q, k) twice → (B, q, k).

    For the LRP variant (Eq. 13, Transformer Attribution's averaging) pass R^A, the LRP
    relevance of A, as ``attention``.
    """
    return (gradient * attention).clamp(min=0).mean(dim=1)


def identity(batch: int, size: int, like: Tensor) -> Tensor:
    """R^{xx} at initialisation (Eq. 1): I, (B, |x|, |x|), in ``like``'s dtype and device."""
    eye = torch.eye(size, dtype=like.dtype, device=like.device)
    return eye.expand(batch, size, size).clone()


def self_addition(weighted: Tensor, relevance: Tensor) -> Tensor:
    """The addition Ā·R of Eq. 6 (``relevance`` = R^{qq}) and Eq. 7 (``relevance`` = R^{qk}).

    weighted Ā (B, q, q), relevance (B, q, n) → (B, q, n); the caller adds it: R + Ā·R.
    """
    return weighted @ relevance


def normalised_self(relevance: Tensor) -> Tensor:
    """Eq. 8-9: R̄ = R̂ / rowsum(R̂) + I with R̂ = R − I, (B, n, n) → (B, n, n).

    Rows of R̂ that sum to 0 stay zero, so R̄ is the identity on them (module docstring).
    """
    eye = torch.eye(relevance.shape[-1], dtype=relevance.dtype, device=relevance.device)
    context = relevance - eye  # R̂, (B, n, n)
    sums = context.sum(dim=-1, keepdim=True)  # Ŝ, (B, n, 1)
    return context / torch.where(sums == 0, torch.ones_like(sums), sums) + eye


def bi_addition(
    weighted: Tensor,
    queries_self: Tensor,
    keys_self: Tensor,
    keys_to_queries: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """The additions of a bi-modal (Eq. 10-11) or encoder-decoder (Eq. 10) layer q ← k.

    Args:
        weighted: Ā (B, q, k) of the layer.
        queries_self: R^{qq} (B, q, q); keys_self: R^{kk} (B, k, k).
        keys_to_queries: R^{kq} (B, k, q) for Eq. 11; None where there is none (a cross layer,
            or no layer has mixed q into k yet): then Eq. 11 adds nothing.

    Returns:
        (ΔR^{qk} (B, q, k) = (R̄^{qq})ᵀ·Ā·R̄^{kk},  ΔR^{qq} (B, q, q) = Ā·R^{kq} or None).
    """
    mixed = normalised_self(queries_self).transpose(-2, -1) @ (
        weighted @ normalised_self(keys_self)
    )
    back = None if keys_to_queries is None else weighted @ keys_to_queries
    return mixed, back


def paired_relevance(queries_self: Tensor, weighted: Tensor, keys_self: Tensor) -> Tensor:
    """Eq. 12, R^{qk} = (R^{qq})ᵀ·Ā·R^{kk}: (B, q, q), (B, q, k), (B, k, k) → (B, q, k)."""
    return queries_self.transpose(-2, -1) @ (weighted @ keys_self)

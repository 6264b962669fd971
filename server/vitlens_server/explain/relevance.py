"""Layer-wise relevance propagation through stock timm ViTs (Chefer, Gur & Wolf, CVPR 2021).

The relevance rules of "Transformer Interpretability Beyond Attention Visualization" (§3: the
Deep-Taylor LRP α/β rule with α = 1, β = 0 for layers with weights, the z-rule for the
non-parametric binary operations — matrix products and skip connections — normalised to keep
the total relevance), applied to what `AttentionHooks.record(lrp=True)` kept from the ordinary
forward pass (`Recording.lrp`) and to the model's weights, read only. There is no re-implemented
ViT, nothing on the model is changed, and no autograd is used: every rule is written out.

    start      R = e_c, the one-hot vector of the target class c, at the logits
    Linear     R_j = Σ_i (x_j⁺ w_ij⁺ + x_j⁻ w_ij⁻) / (Σ_j' x_j'⁺ w_ij'⁺ + x_j'⁻ w_ij'⁻) · R_i
               (α = 1, β = 0; the bias is not in the denominator)
    z = a·b    z-rule to both operands, R_a = a ⊙ ∂z/∂a · R/z (likewise b), each halved:
               A_l·V_l, and scale·Q_l·K_lᵀ (q, k after q_norm/k_norm)
    x + f(x)   z-rule to both summands (R_x = x ⊙ R/z, R_f = f ⊙ R/z), each rescaled so that
               Σ R_x : Σ R_f = |Σ R_x| : |Σ R_f| and Σ R_x + Σ R_f = Σ R (per image)
    clone      relevances of the copies summed (block input → residual and norm1;
               qkv → q, k, v; the residual stream → add and norm2)
    readout    class token: the pooled relevance goes to token 0; DeiT distilled: the logits
               are the mean of two heads, split with the skip-connection rule, each head's
               relevance to its token (0, 1); average pool: z-rule of the mean over the tokens
    unchanged  LayerNorm (norm1, norm2, attn.norm, final norm, fc_norm), GELU, softmax,
               dropout, drop-path, q_norm/k_norm, LayerScale

Divisions are `safe_divide`: z + ε·sign(z), and 0 where z == 0 (ε = 1e-9; the authors' code
adds +ε whatever the sign). Two choices the paper leaves open: LayerScale (absent from its
ViT) is treated as part of its residual branch, and DeiT's two heads are split with the
skip-connection rule — from e_c, head h receives |y_h[c]| / (|y_head[c]| + |y_head_dist[c]|).

R^{A_l} := the relevance arriving at the post-softmax attention A_l of block l, after the
halving, (B, H, N, N); `attention_relevances` returns it for every block.

Starting vector: METHODS.md writes one-hot(c) ⊙ logits; the paper's published implementation
(the authors' Transformer-Explainability code, read to check this) starts the propagation from
the one-hot vector e_c itself, which we follow (the paper wins over METHODS.md). Every
rule above is linear in R, so starting from y_c·e_c would multiply every relevance of image b
by its logit y_c — a per-image factor that flips signs (and so the ⁺ clamps of the methods)
when y_c < 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vitlens_server.explain.records import LrpRecord, Recording

__all__ = [
    "EPS",
    "attention_relevances",
    "block_relevance",
    "linear_relevance",
    "mean_relevance",
    "merge_heads",
    "output_relevance",
    "product_relevance",
    "residual_relevance",
    "safe_divide",
    "split_heads",
]

EPS = 1e-9


def safe_divide(num: Tensor, den: Tensor, eps: float | None = None) -> Tensor:
    """num / (den + eps·sign(den)), and 0 where den == 0 (broadcasting); eps defaults to `EPS`."""
    eps = EPS if eps is None else eps
    stabilised = den.sign().mul_(eps).add_(den)  # 0 stays 0: its quotient is inf/nan, zeroed
    return (num / stabilised).masked_fill_(den == 0, 0.0)


def linear_relevance(x: Tensor, weight: Tensor, relevance: Tensor) -> Tensor:
    """α = 1, β = 0 rule for y = x Wᵀ + b: x (..., I), weight (O, I), relevance (..., O) → (..., I).

    R_j = x_j⁺ Σ_i w_ij⁺ R_i / z_i + x_j⁻ Σ_i w_ij⁻ R_i / z_i with z_i = Σ_j x_j⁺w_ij⁺ + x_j⁻w_ij⁻,
    so Σ_j R_j = Σ_i R_i wherever z_i ≠ 0, whatever the bias.
    """
    x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
    w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
    ratio = safe_divide(relevance, F.linear(x_pos, w_pos) + F.linear(x_neg, w_neg))  # (..., O)
    return x_pos * (ratio @ w_pos) + x_neg * (ratio @ w_neg)


def product_relevance(
    a: Tensor, b: Tensor, relevance: Tensor, scale: float = 1.0
) -> tuple[Tensor, Tensor]:
    """z-rule for z = scale·a@b, each operand's share halved.

    a (..., I, K), b (..., K, J), relevance (..., I, J). With S = R / z:
    R_a = ½ a ⊙ (scale · S bᵀ)  (..., I, K);  R_b = ½ b ⊙ (scale · aᵀ S)  (..., K, J).
    Each of R_a, R_b carries half of Σ R.
    """
    scaled = a * scale
    ratio = safe_divide(relevance, scaled @ b)
    rel_a = scaled * (ratio @ b.transpose(-2, -1))
    rel_b = b * (scaled.transpose(-2, -1) @ ratio)
    return rel_a / 2, rel_b / 2


def split_heads(t: Tensor, heads: int) -> Tensor:
    """(B, N, h·d) → (B, h, N, d): a Linear's output as attention heads."""
    b, n, _ = t.shape
    return t.reshape(b, n, heads, -1).transpose(1, 2)


def merge_heads(t: Tensor) -> Tensor:
    """(B, h, N, d) → (B, N, h·d), the inverse of `split_heads`."""
    b, _, n, _ = t.shape
    return t.transpose(1, 2).reshape(b, n, -1)


def residual_relevance(x: Tensor, branch: Tensor, relevance: Tensor) -> tuple[Tensor, Tensor]:
    """Skip connection z = x + branch, all (B, ...): relevance of each summand, (B, ...) each.

    z-rule R_x = x ⊙ R/z, R_f = branch ⊙ R/z, then per image b each is rescaled to the total
    |Σ R_x| / (|Σ R_x| + |Σ R_f|) · Σ R (likewise R_f), so Σ R_x + Σ R_f = Σ R.
    """
    ratio = safe_divide(relevance, x + branch)
    rel_x, rel_f = x * ratio, branch * ratio
    dims = tuple(range(1, relevance.dim()))
    sum_x, sum_f = rel_x.sum(dims, keepdim=True), rel_f.sum(dims, keepdim=True)
    total = relevance.sum(dims, keepdim=True)
    both = sum_x.abs() + sum_f.abs()
    rel_x = rel_x * safe_divide(safe_divide(sum_x.abs(), both) * total, sum_x)
    rel_f = rel_f * safe_divide(safe_divide(sum_f.abs(), both) * total, sum_f)
    return rel_x, rel_f


def mean_relevance(tokens: Tensor, pooled: Tensor, relevance: Tensor, start: int) -> Tensor:
    """z-rule of the average pool pooled = mean_{i ≥ start} tokens_i.

    tokens (B, N, D), pooled and relevance (B, D) → (B, N, D), zero on tokens before ``start``:
    R_i = (tokens_i / M) ⊙ R / pooled with M = N − start.
    """
    out = torch.zeros_like(tokens)
    ratio = safe_divide(relevance, pooled)[:, None]  # (B, 1, D)
    out[:, start:] = tokens[:, start:] / (tokens.shape[1] - start) * ratio
    return out


@torch.no_grad()
def output_relevance(rec: Recording, targets: Tensor) -> Tensor:
    """Relevance at the final norm's output (= last block's output), (B, N, D).

    Starts from e_c for c = ``targets`` (B,) at the logits and goes through the classifier
    (α1β0), dropout and fc_norm (unchanged) and the readout (see the module docstring).
    """
    lrp = _lrp(rec)
    num_classes = lrp.heads[0].out_features
    start = F.one_hot(targets, num_classes).to(rec.tokens.dtype)  # (B, C)
    if lrp.pool == "distilled":  # logits = (head(x_0) + head_dist(x_1)) / 2
        halves = [out / 2 for out in lrp.head_out]
        per_head = residual_relevance(halves[0], halves[1], start)
    else:
        per_head = (start,)
    pooled = [
        linear_relevance(x, head.weight, rel)  # (B, D)
        for x, head, rel in zip(lrp.head_in, lrp.heads, per_head, strict=True)
    ]
    if lrp.pool == "avg":
        return mean_relevance(rec.tokens, lrp.pooled, pooled[0], lrp.pool_start)
    out = torch.zeros_like(rec.tokens)
    for token, rel in enumerate(pooled):  # class token 0 (and distillation token 1)
        out[:, token] = rel
    return out


@torch.no_grad()
def block_relevance(
    rec: Recording, layer: int, relevance: Tensor, trace: dict[str, Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """Relevance (B, N, D) at block ``layer``'s output → (at its input (B, N, D), R^{A_l}).

    x_mid = x + ls1(attn(norm1(x))); out = x_mid + ls2(mlp(norm2(x_mid))), propagated back
    rule by rule. ``trace``, when given, receives every intermediate relevance (for tests).
    """
    acts, block, att = _lrp(rec).layers[layer], _lrp(rec).blocks[layer], rec.layers[layer]
    x_mid = acts.x + acts.attn_branch
    mid_skip, mlp_out = residual_relevance(x_mid, acts.mlp_branch, relevance)
    hidden = linear_relevance(acts.fc2_in, block.mlp.fc2.weight, mlp_out)  # (B, N, F)
    mid_branch = linear_relevance(acts.fc1_in, block.mlp.fc1.weight, hidden)
    mid = mid_skip + mid_branch  # clone: the stream fed the skip and norm2
    x_skip, attn_out = residual_relevance(acts.x, acts.attn_branch, mid)
    heads_out = linear_relevance(acts.proj_in, block.attn.proj.weight, attn_out)  # (B, N, H·D_h)
    b, n, _ = heads_out.shape
    heads_out = heads_out.view(b, n, rec.num_heads, -1).transpose(1, 2)  # (B, H, N, D_h)
    attn, k_t = rec.attention(layer), att.k.transpose(-2, -1)
    rel_attn, rel_v = product_relevance(attn, att.v, heads_out)  # (B, H, N, N), (B, H, N, D_h)
    rel_q, rel_k_t = product_relevance(att.q, k_t, rel_attn, att.scale)  # softmax: unchanged
    rel_qkv = torch.stack([rel_q, rel_k_t.transpose(-2, -1), rel_v])  # (3, B, H, N, D_h)
    rel_qkv = rel_qkv.permute(1, 3, 0, 2, 4).reshape(b, n, -1)  # qkv's (B, N, 3·H·D_h) layout
    x_branch = linear_relevance(acts.qkv_in, block.attn.qkv.weight, rel_qkv)
    x = x_skip + x_branch  # clone: the block input fed the skip and norm1
    if trace is not None:
        trace.update(
            out=relevance, mid_skip=mid_skip, mlp_out=mlp_out, hidden=hidden,
            mid_branch=mid_branch, mid=mid, x_skip=x_skip, attn_out=attn_out,
            heads_out=heads_out, attn=rel_attn, v=rel_v, q=rel_q, k=rel_k_t.transpose(-2, -1),
            qkv=rel_qkv, x_branch=x_branch, x=x,
        )  # fmt: skip
    return x, rel_attn


@torch.no_grad()
def attention_relevances(rec: Recording, targets: Tensor, first: int = 0) -> list[Tensor]:
    """R^{A_l} for l = first, …, L−1 (list position l − first), each (B, H, N, N).

    One walk from the logits of ``targets`` (B,) down to block ``first``, batched over B.
    """
    relevance = output_relevance(rec, targets)
    found: list[Tensor] = []
    for layer in reversed(range(first, rec.num_layers)):
        relevance, rel_attn = block_relevance(rec, layer, relevance)
        found.append(rel_attn)
    return found[::-1]


def _lrp(rec: Recording) -> LrpRecord:
    if rec.lrp is None:
        raise RuntimeError("LRP needs a recording with lrp=True (passes include LRP)")
    return rec.lrp

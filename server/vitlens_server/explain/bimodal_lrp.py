"""LRP relevance of every attention map of the bi-modal VQA adapters (ViLT, VisualBERT, LXMERT).

R^A, the relevance arriving at an edge's post-softmax attention A (B, h, q, k), for every edge
of the adapter's attention graph, propagated from the answer logits with the rules of
`explain.relevance` (Chefer, Gur & Wolf, CVPR 2021; seed 003 §4 uses them for its partial-LRP
and Transformer-Attribution baselines on the bi-modal models). The rules read what
`models.bimodal.lrp_taps.record_lrp` kept of the ordinary forward pass and the stock modules'
weights, read only; no autograd:

    start      R = e_c, the one-hot answer c, at the logits (`relevance`'s docstring: why
               not one-hot ⊙ logits)
    head       α1β0 (bias not in the denominator) through each Linear of the answer head;
               LayerNorm, GELU, tanh, dropout passed through; all of it to the answer token
               of the final hidden states: ViLT ``classifier`` and ``pooler`` to the text
               CLS (``vilt.layernorm`` passed through), VisualBERT ``cls`` to row
               ``attention_mask.sum(1) − 2``, LXMERT ``answer_head`` and ``pooler`` to the
               language stream's CLS
    sublayer   pre-LN (ViLT) out = x + branch; post-LN (VisualBERT, LXMERT) out =
               LN(x + branch), LN passed through: the conserving skip-connection rule
               (`residual_relevance`) splits R between x and the branch
    attention  branch = dense(A·V per head): α1β0 through dense; z-rule for A·V, halved
               (→ R^A and R_V); softmax passed through; z-rule for scale·Q·Kᵀ, halved;
               α1β0 through the query, key and value Linears, to their inputs
    FFN        branch = fc2(GELU(fc1(·))): α1β0, passed through, α1β0
    clone      the relevances of a hidden state's copies summed: its residual, its queries,
               and the keys and values it gives (its own self-attention, or the other
               stream's co-attention)
    stop       at the embeddings: text embeddings, ViLT's patch embeddings, LXMERT's region
               encoder (`EncoderRelevance.inputs`)

LXMERT, from the top of each cross layer: each stream's FFN and self-attention layer down to
its co-attention output; then the co-attention, which turns the text stream's relevance into
R^A of text ← image, relevance at the text inputs (residual + queries) and at the image inputs
(keys + values), and the image stream's likewise the other way; then the vision layers
(``r_layers``) on the image stream and the language layers (``l_layers``) on the text stream.

Choices the papers leave open:

- LXMERT's co-attention ``visual_attention`` is one module (one set of weights) called twice
  on the cross layer's inputs. The two calls are two nodes of the computation, each with its
  own output: the text stream's relevance goes back through the first call's activations,
  the image stream's through the second's. Nothing is split between the calls (the shared
  weights are only read); at a stream's input the relevance arriving as residual, as
  queries (its own call) and as keys/values (the other stream's call) is summed.
- The last cross layer's image side never reaches the answer: R^A of its image ← text and
  image self-attention are zero (as are their gradients).
- Padding: a masked key has A = 0 and so receives no relevance; a padded query's output
  never receives any; both stay exactly 0, and an item's relevances do not depend on the
  rest of its batch (every rule is per token or per item).
- Arithmetic in float32 at least (the maps' dtype when wider): float16 models are read up.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vitlens_server.explain.relevance import (
    linear_relevance,
    merge_heads,
    product_relevance,
    residual_relevance,
    split_heads,
)
from vitlens_server.models.bimodal.base import BimodalModel
from vitlens_server.models.bimodal.lrp_taps import (
    AttentionPaths,
    FeedForwardPaths,
    LayerPaths,
    lrp_paths,
)
from vitlens_server.models.bimodal.records import BimodalRecording

__all__ = ["EncoderRelevance", "attention_relevances", "encoder_relevances", "head_relevance"]


@dataclass(frozen=True)
class EncoderRelevance:
    """What one LRP walk through the encoder found.

    Attributes:
        attention: R^A per edge of ``model.graph(tokens).edges``, in edge order, each
            (B, h, q, k) like the edge's map.
        inputs: per token set (``"joint"``, or ``"text"`` and ``"image"``), the relevance at
            the embeddings (B, N, D), where the walk stops.
    """

    attention: list[Tensor]
    inputs: dict[str, Tensor]


@torch.no_grad()
def attention_relevances(
    model: BimodalModel,
    recording: BimodalRecording,
    targets: Tensor,
    *,
    trace: dict[str, Tensor] | None = None,
) -> list[Tensor]:
    """R^A of every edge, in ``model.graph(recording.tokens).edges`` order, (B, h, q, k) each.

    Args:
        model: the adapter that ran the pass.
        recording: a pass recorded with `lrp_taps.record_lrp`.
        targets: (B,) the answer index of each item.
        trace: when given, receives every sublayer's relevances (`encoder_relevances`).
    """
    top = head_relevance(model, recording, targets)
    return encoder_relevances(model, recording, top, trace=trace).attention


@torch.no_grad()
def head_relevance(
    model: BimodalModel, recording: BimodalRecording, targets: Tensor
) -> dict[str, Tensor]:
    """Relevance at each token set's final hidden states, (B, N, D): from e_c at the logits of
    ``targets`` (B,) through the answer head to the answer token (`BimodalTokens.readout_rows`
    of the text set), zero elsewhere."""
    walk = _Walk(model, recording)
    head = walk.paths.head
    rel = F.one_hot(targets.to(walk.device), walk.weight(head[0]).shape[0]).to(walk.dtype)
    for path in head:  # (B, out) → (B, in); norms and activations between them passed
        rel = linear_relevance(walk.input(path).reshape(len(rel), -1), walk.weight(path), rel)
    tokens = walk.tokens
    width = rel.shape[-1]
    top = {
        name: rel.new_zeros(len(rel), tokens.sizes[name], width)
        for name in (tokens.text_set, tokens.image_set)
    }
    rows = tokens.readout_rows.to(walk.device)
    top[tokens.text_set][torch.arange(len(rel), device=walk.device), rows] = rel
    return top


@torch.no_grad()
def encoder_relevances(
    model: BimodalModel,
    recording: BimodalRecording,
    top: Mapping[str, Tensor],
    *,
    trace: dict[str, Tensor] | None = None,
) -> EncoderRelevance:
    """Propagate ``top`` (per token set, (B, N, D) relevance at its final hidden states) down
    to the embeddings, keeping R^A of every edge on the way.

    ``trace``, when given, receives per sublayer ``"{path}[{call}]:{where}"`` (path = the
    attention dropout, or ``fc2`` of a feed-forward sublayer) with where ∈ ``out`` (at its
    output), ``skip`` (to the residual), ``query`` (attention: through the query Linear),
    ``kv`` (through the key and value Linears, to the key stream) and ``inner`` (FFN: through
    fc2 and fc1); (B, N, D) each.
    """
    walk = _Walk(model, recording, trace)
    paths, tokens = walk.paths, walk.tokens
    if not paths.cross_layers:
        joint = top[tokens.text_set].to(walk.device, walk.dtype)
        for layer in reversed(paths.layers):
            joint = walk.layer(layer, joint)
        return EncoderRelevance(walk.found(), {tokens.text_set: joint})
    text = top[tokens.text_set].to(walk.device, walk.dtype)
    image = top[tokens.image_set].to(walk.device, walk.dtype)
    for cross in reversed(paths.cross_layers):
        text, image = walk.layer(cross.text, text), walk.layer(cross.image, image)
        text_q, image_kv = walk.attention(cross.cross, 0, text)  # text ← image
        image_q, text_kv = walk.attention(cross.cross, 1, image)  # image ← text
        text, image = text_q + text_kv, image_q + image_kv
    for layer in reversed(paths.image_layers):
        image = walk.layer(layer, image)
    for layer in reversed(paths.layers):
        text = walk.layer(layer, text)
    return EncoderRelevance(walk.found(), {tokens.text_set: text, tokens.image_set: image})


class _Walk:
    """One model's recorded activations, weights and maps, and the R^A found so far."""

    def __init__(
        self,
        model: BimodalModel,
        recording: BimodalRecording,
        trace: dict[str, Tensor] | None = None,
    ) -> None:
        if recording.lrp is None or recording.tokens is None:
            raise RuntimeError("LRP needs a pass recorded with lrp_taps.record_lrp(model)")
        self.tokens = recording.tokens
        self.paths = lrp_paths(model.module)
        self._module = model.module
        self._tape = recording.lrp
        self._maps = recording.maps
        self.device = self._maps[0].device
        self.dtype = torch.promote_types(self._maps[0].dtype, torch.float32)
        self._trace = trace
        self._edges = model.graph(recording.tokens).edges
        self._index: dict[tuple[str, int], int] = {}  # (label, call) → edge
        for index, edge in enumerate(self._edges):
            calls = sum(1 for label, _ in self._index if label == edge.label)
            self._index[(edge.label, calls)] = index
        self._found: dict[int, Tensor] = {}

    def input(self, path: str, call: int = 0) -> Tensor:
        return self._tape.input(path, call).to(self.device, self.dtype)

    def output(self, path: str, call: int = 0) -> Tensor:
        return self._tape.output(path, call).to(self.device, self.dtype)

    def weight(self, path: str) -> Tensor:
        return self._module.get_submodule(path).weight.detach().to(self.device, self.dtype)

    def layer(self, layer: LayerPaths, relevance: Tensor) -> Tensor:
        """(B, N, D) at a self-attention layer's output → at its input."""
        mid = self.feed_forward(layer.feed_forward, relevance)
        query, kv = self.attention(layer.attention, 0, mid)
        return query + kv  # clone: the input gave the residual, the queries, keys and values

    def feed_forward(self, ffn: FeedForwardPaths, relevance: Tensor) -> Tensor:
        """(B, N, D) at the sublayer's output → at its input (residual + fc1's input)."""
        skip, branch = residual_relevance(
            self.input(ffn.norm or ffn.fc1), self.output(ffn.fc2), relevance
        )
        hidden = linear_relevance(self.input(ffn.fc2), self.weight(ffn.fc2), branch)  # (B, N, F)
        inner = linear_relevance(self.input(ffn.fc1), self.weight(ffn.fc1), hidden)
        self._keep(f"{ffn.fc2}[0]", out=relevance, skip=skip, inner=inner)
        return skip + inner

    def attention(self, att: AttentionPaths, call: int, relevance: Tensor) -> tuple[Tensor, Tensor]:
        """(B, q, D) at call ``call`` of an attention sublayer's output → (at the query
        stream (B, q, D): residual + queries, at the key stream (B, k, D): keys + values);
        R^A (B, h, q, k) is kept for its edge."""
        index = self._index.get((att.label, call))
        if index is None:
            raise RuntimeError(f"{att.label} (call {call}) is no edge of the model's graph")
        attn = self._maps[index].detach().to(self.dtype)  # (B, h, q, k)
        heads = attn.shape[1]
        skip, branch = residual_relevance(
            self.input(att.norm or att.query, call), self.output(att.dense, call), relevance
        )
        mixed = linear_relevance(self.input(att.dense, call), self.weight(att.dense), branch)
        q, k, v = (
            split_heads(self.output(p, call), heads) for p in (att.query, att.key, att.value)
        )
        rel_attn, rel_v = product_relevance(attn, v, split_heads(mixed, heads))  # softmax: passed
        scale = 1 / math.sqrt(q.shape[-1])
        rel_q, rel_k_t = product_relevance(q, k.transpose(-2, -1), rel_attn, scale)
        query = linear_relevance(
            self.input(att.query, call), self.weight(att.query), merge_heads(rel_q)
        )
        kv = linear_relevance(
            self.input(att.key, call), self.weight(att.key), merge_heads(rel_k_t.transpose(-2, -1))
        ) + linear_relevance(
            self.input(att.value, call), self.weight(att.value), merge_heads(rel_v)
        )
        self._found[index] = rel_attn
        self._keep(f"{att.label}[{call}]", out=relevance, skip=skip, query=query, kv=kv)
        return skip + query, kv

    def found(self) -> list[Tensor]:
        """R^A of every edge, in edge order."""
        missing = [e.describe() for i, e in enumerate(self._edges) if i not in self._found]
        if missing:
            raise RuntimeError(f"LRP reached no relevance for {', '.join(missing)}")
        return [self._found[i] for i in range(len(self._edges))]

    def _keep(self, key: str, **relevances: Tensor) -> None:
        if self._trace is not None:
            self._trace.update({f"{key}:{where}": rel for where, rel in relevances.items()})

"""LRP relevance of every attention map of a DETR (seed 003 §4's partial-LRP and Transformer
Attribution baselines on the encoder-decoder), from one detection's class logit.

R^A, the relevance arriving at an edge's post-softmax attention A (B, h, q, k), for every edge of
`detr_graph`, propagated with the rules of `explain.relevance` from e_c at the class logits of
each image's explained query. The rules read what `record_detr_lrp` kept of the ordinary forward
pass (every Linear's input and output, every attention module's residual input and position
embeddings) and the stock modules' weights, read only; no autograd:

    head       α1β0 through ``class_labels_classifier`` to the query's final state (the
               decoder's final LayerNorm passed through), zero at the other queries
    sublayer   post-LN, out = LN(x + branch), LN passed through: the conserving skip rule
               (`residual_relevance`) splits R between x and the branch
    attention  branch = o_proj(A·V per head): α1β0 through o_proj; z-rule for A·V, halved
               (→ R^A and R_V); softmax passed through; z-rule for scaling·Q·Kᵀ, halved;
               α1β0 through q_proj, k_proj and v_proj to their inputs. DETR adds position
               embeddings to the query and key inputs (x + pos): the skip rule splits those
               inputs' relevance between x and pos, and pos's share — a constant of the model,
               like a bias — leaves the walk (``trace`` keeps it)
    FFN        fc2(act(fc1(·))): α1β0, passed through, α1β0
    decoder    per layer, top down: FFN, cross-attention (query stream: residual + queries; the
               encoder output: keys + values), self-attention (residual + queries + keys +
               values); the relevance reaching the encoder output from every layer is summed
    encoder    then per encoder layer, top down: FFN, self-attention; the walk stops at the
               projected feature map (and at the decoder's zero start)

Every rule works per image, so a batch of B images, each with its own query and class, is one
walk. Arithmetic in float32 at least.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitlens_server.explain.relevance import (
    linear_relevance,
    merge_heads,
    product_relevance,
    residual_relevance,
    split_heads,
)
from vitlens_server.models.detection.detr import DetrDetector

__all__ = ["DetrTape", "detr_attention_relevances", "record_detr_lrp"]


@dataclass
class DetrTape:
    """What one forward pass kept: per module path, its inputs (Linear: its input; attention:
    its keyword inputs) and its output."""

    thread: int = 0  # the recording thread: the hooks ignore passes of any other
    linear_in: dict[str, Tensor] = field(default_factory=dict)
    linear_out: dict[str, Tensor] = field(default_factory=dict)
    attention_in: dict[str, dict[str, Tensor | None]] = field(default_factory=dict)


@contextmanager
def record_detr_lrp(detector: DetrDetector) -> Iterator[DetrTape]:
    """Record, for the forward passes this thread runs inside the block, what LRP reads; the
    hooks live only for the block, and passes of other threads meanwhile leave no trace."""
    tape = DetrTape(thread=threading.get_ident())
    module = detector.module
    handles = []
    for path, sub in module.named_modules():
        if isinstance(sub, nn.Linear) and not path.startswith(("model.backbone", "bbox_predictor")):
            handles.append(sub.register_forward_hook(_linear_hook(tape, path)))
    for edge in detector.graph().edges:
        sub = module.get_submodule(edge.label)
        handles.append(
            sub.register_forward_hook(_attention_hook(tape, edge.label), with_kwargs=True)
        )
    try:
        yield tape
    finally:
        for handle in handles:
            handle.remove()


def _linear_hook(tape: DetrTape, path: str):
    def on_linear(_m: nn.Module, args: tuple, output: Tensor) -> None:
        if threading.get_ident() != tape.thread:
            return
        tape.linear_in[path], tape.linear_out[path] = args[0].detach(), output.detach()

    return on_linear


def _attention_hook(tape: DetrTape, path: str):
    def on_attention(_m: nn.Module, args: tuple, kwargs: dict, _output) -> None:
        if threading.get_ident() != tape.thread:
            return
        names = ("hidden_states", "position_embeddings", "key_value_states")
        found = dict(zip(names, args, strict=False))
        found.update({k: v for k, v in kwargs.items() if isinstance(v, Tensor) or v is None})
        tape.attention_in[path] = {k: None if v is None else v.detach() for k, v in found.items()}

    return on_attention


@torch.no_grad()
def detr_attention_relevances(
    detector: DetrDetector,
    tape: DetrTape,
    maps: tuple[Tensor, ...],
    queries: Tensor,
    classes: Tensor,
    *,
    trace: dict[str, Tensor] | None = None,
) -> list[Tensor]:
    """R^A of every edge of ``detector.graph()``, in edge order, (B, h, q, k) each.

    Args:
        tape: the pass recorded by `record_detr_lrp`; maps: its attention maps, edge order.
        queries, classes: (B,) each image's explained query and class.
        trace: when given, receives per sublayer ``"{path}:{where}"`` relevances (``out``,
            ``skip``, ``query``, ``kv``, ``inner``, ``pos``: the share left at position
            embeddings), (B, N, D) each — for conservation tests.
    """
    walk = _Walk(detector, tape, maps, trace)
    return walk.run(queries.to(walk.device), classes.to(walk.device))


class _Walk:
    def __init__(self, detector: DetrDetector, tape: DetrTape, maps, trace) -> None:
        self.module, self.tape, self.trace = detector.module, tape, trace
        self.edges = detector.graph().edges
        self.maps = {edge.label: m for edge, m in zip(self.edges, maps, strict=True)}
        self.device = maps[0].device
        self.dtype = torch.promote_types(maps[0].dtype, torch.float32)
        self.found: dict[str, Tensor] = {}

    def run(self, queries: Tensor, classes: Tensor) -> list[Tensor]:
        head = "class_labels_classifier"
        state = self.linear_in(head)  # (B, Q, D), the decoder's normalised output
        items = torch.arange(len(queries), device=self.device)
        start = F.one_hot(classes, self.weight(head).shape[0]).to(self.dtype)  # (B, C + 1)
        rel = torch.zeros_like(state)
        rel[items, queries] = linear_relevance(state[items, queries], self.weight(head), start)
        memory = None
        config = self.module.config
        for n in reversed(range(config.decoder_layers)):
            layer = f"model.decoder.layers.{n}"
            rel = self.feed_forward(f"{layer}.mlp", rel)
            rel, kv = self.attention(f"{layer}.encoder_attn", rel, cross=True)
            memory = kv if memory is None else memory + kv
            rel, kv = self.attention(f"{layer}.self_attn", rel, cross=False)
            rel = rel + kv
        for n in reversed(range(config.encoder_layers)):
            layer = f"model.encoder.layers.{n}"
            memory = self.feed_forward(f"{layer}.mlp", memory)
            memory, kv = self.attention(f"{layer}.self_attn", memory, cross=False)
            memory = memory + kv
        self.keep("input", out=memory)
        return [self.found[edge.label] for edge in self.edges]

    def linear_in(self, path: str) -> Tensor:
        return self.tape.linear_in[path].to(self.device, self.dtype)

    def linear_out(self, path: str) -> Tensor:
        return self.tape.linear_out[path].to(self.device, self.dtype)

    def weight(self, path: str) -> Tensor:
        return self.module.get_submodule(path).weight.detach().to(self.device, self.dtype)

    def feed_forward(self, mlp: str, rel: Tensor) -> Tensor:
        """(B, N, D) at the FFN sublayer's output → at its input (residual + fc1's input)."""
        skip, branch = residual_relevance(
            self.linear_in(f"{mlp}.fc1"), self.linear_out(f"{mlp}.fc2"), rel
        )
        hidden = linear_relevance(self.linear_in(f"{mlp}.fc2"), self.weight(f"{mlp}.fc2"), branch)
        inner = linear_relevance(self.linear_in(f"{mlp}.fc1"), self.weight(f"{mlp}.fc1"), hidden)
        self.keep(mlp, out=rel, skip=skip, inner=inner)
        return skip + inner

    def attention(self, path: str, rel: Tensor, *, cross: bool) -> tuple[Tensor, Tensor]:
        """(B, q, D) at an attention sublayer's output → (at its query stream: residual +
        queries, (B, q, D); at its key stream: keys + values, (B, k, D)); R^A kept."""
        inputs = self.tape.attention_in[path]
        x = inputs["hidden_states"].to(self.device, self.dtype)  # the residual and query stream
        attn = self.maps[path].detach().to(self.dtype)  # (B, h, q, k)
        heads = attn.shape[1]
        skip, branch = residual_relevance(x, self.linear_out(f"{path}.o_proj"), rel)
        mixed = linear_relevance(
            self.linear_in(f"{path}.o_proj"), self.weight(f"{path}.o_proj"), branch
        )
        q, k, v = (split_heads(self.linear_out(f"{path}.{p}_proj"), heads) for p in "qkv")
        rel_attn, rel_v = product_relevance(attn, v, split_heads(mixed, heads))  # softmax: passed
        scale = self.module.get_submodule(path).scaling
        rel_q, rel_k_t = product_relevance(q, k.transpose(-2, -1), rel_attn, scale)
        self.found[path] = rel_attn
        query = self.through(f"{path}.q_proj", merge_heads(rel_q), x, inputs["position_embeddings"])
        keys_in = inputs["key_value_states"] if cross else x
        key_pos = inputs["encoder_position_embeddings" if cross else "position_embeddings"]
        keys_in = keys_in.to(self.device, self.dtype)
        key = self.through(
            f"{path}.k_proj", merge_heads(rel_k_t.transpose(-2, -1)), keys_in, key_pos
        )
        value = linear_relevance(
            self.linear_in(f"{path}.v_proj"), self.weight(f"{path}.v_proj"), merge_heads(rel_v)
        )
        self.keep(path, out=rel, skip=skip, query=query, kv=key + value)
        return skip + query, key + value

    def through(self, proj: str, rel: Tensor, x: Tensor, pos: Tensor | None) -> Tensor:
        """Relevance at x of a projection of x + pos: α1β0, then the skip rule's share of x."""
        at_input = linear_relevance(self.linear_in(proj), self.weight(proj), rel)
        if pos is None:
            return at_input
        mine, theirs = residual_relevance(x, pos.to(self.device, self.dtype), at_input)
        self.keep(proj, pos=theirs)
        return mine

    def keep(self, key: str, **relevances: Tensor) -> None:
        if self.trace is not None:
            self.trace.update({f"{key}:{where}": r for where, r in relevances.items()})

"""The DETR adapter: a Hugging Face `DetrForObjectDetection` on the relevance engine (seed 003 §3).

DETR encodes the backbone's feature map, flattened to N = gh·gw image tokens, with self-attention;
Q object queries then attend to each other (decoder self-attention) and to the encoded image
(cross-attention), layer by layer; each query's final state gives a class (C classes and "no
object") and a box. Its attention graph (`detr_graph`), edge labels = module paths:

    sets      image (N tokens, the feature map in raster order), queries (Q)
    encoder   self(image) per encoder layer                                  Eq. 6
    decoder   per layer: self(queries), then cross(queries ← image)          Eq. 6-7, Eq. 10
    readout   detection ← (image,): detection j's map is row j of R^{queries image}

`DetrDetector.run` makes one forward pass that keeps every map in the autograd graph: the
model's own eager attention returns the very softmax tensors it multiplies with V (its dropout is
the identity in eval mode), and a hook on the input projection hands the encoder a leaf copy of
the projected feature map that requires grad, so ∂y/∂A exists for every map while nothing
upstream (the frozen backbone) builds a graph; the decoder's initial query states (DETR's
zeros) are such a leaf too, since the first decoder self-attention reads only them and the
frozen query position embeddings. The hook acts only for the thread inside `run`
(one attribute read otherwise); `DetrDetector.predict` is the plain forward pass.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import DetrForObjectDetection

from vitlens_server.explain.graph.declare import (
    AttentionEdge,
    AttentionGraph,
    Readout,
    TokenSet,
    cross,
    self_attention,
)

__all__ = ["DETECTION", "IMAGE", "QUERIES", "DetrDetector", "DetrPass", "detr_graph"]

IMAGE, QUERIES, DETECTION = "image", "queries", "detection"


def detr_graph(encoder_layers: int, decoder_layers: int, num_queries: int) -> AttentionGraph:
    """DETR's attention graph, labels the paths of the attention modules (``model.encoder...``)."""
    steps: list[AttentionEdge] = [
        self_attention(IMAGE, f"model.encoder.layers.{n}.self_attn") for n in range(encoder_layers)
    ]
    for n in range(decoder_layers):
        layer = f"model.decoder.layers.{n}"
        steps += [
            self_attention(QUERIES, f"{layer}.self_attn"),
            cross(QUERIES, IMAGE, f"{layer}.encoder_attn"),
        ]
    return AttentionGraph(
        sets=(TokenSet(IMAGE), TokenSet(QUERIES, size=num_queries)),
        steps=steps,
        readouts=(Readout(DETECTION, QUERIES, (IMAGE,), row=None),),
    )


@dataclass(frozen=True)
class DetrPass:
    """One forward pass of B images.

    Attributes:
        logits: (B, Q, C + 1) class logits, the last class "no object".
        boxes: (B, Q, 4) boxes (cx, cy, w, h) as fractions of the input's width and height.
        maps: every edge's attention map A (B, h, q, k), in `detr_graph` edge order, in the
            autograd graph of ``logits`` when the pass was run ``with_grad``.
        grid: (gh, gw), the feature map's size: image token n is cell (n // gw, n % gw).
    """

    logits: Tensor
    boxes: Tensor
    maps: tuple[Tensor, ...]
    grid: tuple[int, int]


class DetrDetector:
    """A loaded `DetrForObjectDetection` in eval mode, weights frozen, eager attention."""

    def __init__(self, module: DetrForObjectDetection) -> None:
        config = module.config
        if config._attn_implementation != "eager":
            config._attn_implementation = "eager"  # only eager attention returns its maps
        self.module = module.eval().requires_grad_(False)
        self.labels = tuple(config.id2label[i] for i in range(config.num_labels))
        self.num_queries = int(config.num_queries)
        self._graph = detr_graph(config.encoder_layers, config.decoder_layers, self.num_queries)
        self._local = threading.local()  # .call: this thread's `run` in progress
        projection = module.model.input_projection
        self._hook = projection.register_forward_hook(_projection_hook(self._local))

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def num_heads(self) -> int:
        return int(self.module.config.encoder_attention_heads)

    def graph(self) -> AttentionGraph:
        return self._graph

    def predict(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """(logits (B, Q, C + 1), boxes (B, Q, 4)) of B normalised images (B, 3, H, W)."""
        out = self.module(pixel_values=pixels)
        return out.logits, out.pred_boxes

    def run(self, pixels: Tensor, *, with_grad: bool = False) -> DetrPass:
        """Forward B normalised images (B, 3, H, W), keeping every attention map; ``with_grad``:
        keep them in the autograd graph (call inside ``torch.enable_grad()``)."""
        if getattr(self._local, "call", None) is not None:
            raise RuntimeError("DetrDetector.run is already running in this thread")
        call = self._local.call = _Call(with_grad)
        config = self.module.config
        queries = pixels.new_zeros(len(pixels), self.num_queries, config.d_model)  # DETR's start
        try:
            out = self.module(
                pixel_values=pixels,
                decoder_inputs_embeds=queries.requires_grad_(with_grad),
                output_attentions=True,
            )
        finally:
            self._local.call = None
        maps: list[Tensor] = list(out.encoder_attentions)
        for self_map, cross_map in zip(out.decoder_attentions, out.cross_attentions, strict=True):
            maps += [self_map, cross_map]
        assert call.grid is not None, "the input projection did not run"
        return DetrPass(out.logits, out.pred_boxes, tuple(maps), call.grid)


@dataclass
class _Call:
    """One `DetrDetector.run` in progress: whether it keeps gradients, the grid it saw."""

    with_grad: bool
    grid: tuple[int, int] | None = None


def _projection_hook(local: threading.local) -> Callable[[nn.Module, tuple, Tensor], Tensor | None]:
    """A forward hook on the input projection, acting for the thread's `_Call` only: records
    (gh, gw) and, ``with_grad``, returns a leaf copy of the (B, d, gh, gw) map that requires
    grad. (A closure, not a bound method, so that copying the model never copies the state.)"""

    def on_projection(_m: nn.Module, _args: tuple, output: Tensor) -> Tensor | None:
        call = getattr(local, "call", None)
        if call is None:
            return None
        call.grid = (int(output.shape[-2]), int(output.shape[-1]))
        return output.detach().requires_grad_(True) if call.with_grad else None

    return on_projection

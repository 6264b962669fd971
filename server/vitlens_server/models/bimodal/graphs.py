"""The attention graphs of the bi-modal VQA models (seed 003 §3.2), edge labels = hook paths.

Every edge's ``label`` is the path (``module.get_submodule``) of the ``nn.Dropout`` whose output
is that edge's attention map A (B, h, q, k): in eval mode the dropout returns the softmax
probabilities the model multiplies with V. A module used for several edges (LXMERT's shared
co-attention, called text ← image then image ← text) carries the same label on each, in the
order it is called.

    single stream (ViLT, VisualBERT)   sets (joint,); L self(joint) layers; readout
                                       joint ← (joint,), the row given per item
    two stream (LXMERT)                sets (text, image); self(text) x l, self(image) x r, then
                                       per cross layer the step (bi(text ← image),
                                       bi(image ← text)), self(text), self(image); readout
                                       text ← (text, image) at the text CLS, row 0
"""

from __future__ import annotations

from vitlens_server.explain.graph.declare import (
    AttentionEdge,
    AttentionGraph,
    Readout,
    Step,
    TokenSet,
    bi,
    self_attention,
    self_attention_graph,
)

__all__ = ["IMAGE", "JOINT", "READOUT", "TEXT", "single_stream_graph", "two_stream_graph"]

JOINT, TEXT, IMAGE = "joint", "text", "image"
READOUT = "answer"


def single_stream_graph(num_layers: int, path: str) -> AttentionGraph:
    """One joint text+image set with ``num_layers`` self-attention layers.

    Args:
        num_layers: encoder layers, input side first.
        path: the dropout path of layer n, formatted with n (``"vilt.encoder.layer.{}..."``).
    """
    return self_attention_graph(JOINT, num_layers, row=None, readout=READOUT, label=path)


def two_stream_graph(
    language_layers: int,
    vision_layers: int,
    cross_layers: int,
    *,
    prefix: str = "lxmert.encoder",
) -> AttentionGraph:
    """LXMERT's graph: the single-modality encoders, then the cross-modality layers.

    Args:
        language_layers, vision_layers, cross_layers: ``l_layers``, ``r_layers``, ``x_layers``.
        prefix: the path of the ``LxmertEncoder``.
    """
    steps: list[AttentionEdge | Step] = [
        self_attention(TEXT, f"{prefix}.layer.{n}.attention.self.dropout")
        for n in range(language_layers)
    ]
    steps += [
        self_attention(IMAGE, f"{prefix}.r_layers.{n}.attention.self.dropout")
        for n in range(vision_layers)
    ]
    for n in range(cross_layers):
        layer = f"{prefix}.x_layers.{n}"
        shared = f"{layer}.visual_attention.att.dropout"  # one module, called both ways
        steps += [
            (bi(TEXT, IMAGE, shared), bi(IMAGE, TEXT, shared)),
            self_attention(TEXT, f"{layer}.lang_self_att.self.dropout"),
            self_attention(IMAGE, f"{layer}.visn_self_att.self.dropout"),
        ]
    return AttentionGraph(
        sets=(TokenSet(TEXT), TokenSet(IMAGE)),
        steps=steps,
        readouts=(Readout(READOUT, TEXT, (TEXT, IMAGE), row=0),),
    )

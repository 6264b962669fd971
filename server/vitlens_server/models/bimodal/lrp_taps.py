"""Where the bi-modal adapters' layers keep what LRP reads, and the taps that record it.

LRP (`vitlens_server.explain.bimodal_lrp`) reads, for every Linear layer on the path from the
answer logits to the embeddings, its input and output, and, for a pre-LN layer, the input of
each LayerNorm (the residual stream). `lrp_paths` names those modules per library model
(``config.model_type``); `record_lrp` records them, with forward hooks on the stock modules
that live only for the ``with`` block, into the recording's `LrpTape`. Nothing is
re-implemented and nothing on the model is changed.

Every layer of the three models is "attention sublayer, then feed-forward sublayer", each a
residual addition around a branch ending in a Linear; they differ only in where LayerNorm sits:

    pre-LN  (ViLT)                 h = x + dense(attn(LN(x)));  out = h + fc2(act(fc1(LN(h))))
    post-LN (VisualBERT, LXMERT)   h = LN(x + dense(attn(x)));  out = LN(h + fc2(act(fc1(h))))

so the residual summand of a sublayer is the input of its LayerNorm (pre-LN) or of its first
Linear (post-LN: the query Linear, or ``fc1``). LXMERT's co-attention ``visual_attention`` is
one module called twice per cross layer (text ← image, then image ← text): every tap keeps one
entry per call, in call order.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

if TYPE_CHECKING:
    from vitlens_server.models.bimodal.base import BimodalModel
    from vitlens_server.models.bimodal.records import BimodalRecording

__all__ = [
    "AttentionPaths",
    "CrossLayerPaths",
    "FeedForwardPaths",
    "LayerPaths",
    "LrpPaths",
    "LrpTape",
    "lrp_paths",
    "record_lrp",
]


@dataclass(frozen=True)
class AttentionPaths:
    """One attention sublayer: ``query`` reads the query stream, ``key``/``value`` the key
    stream (the same stream for self-attention), ``dense`` maps the heads' A·V (B, q, h·d) to
    the branch; ``label`` is the attention dropout (the graph edge's label); ``norm`` the
    pre-LN whose input is the residual summand (None: post-LN, the summand is the query
    Linear's input)."""

    query: str
    key: str
    value: str
    dense: str
    label: str
    norm: str | None = None


@dataclass(frozen=True)
class FeedForwardPaths:
    """A feed-forward sublayer ``fc2(act(fc1(·)))``; ``norm`` as in `AttentionPaths` (None:
    the summand is ``fc1``'s input)."""

    fc1: str
    fc2: str
    norm: str | None = None


@dataclass(frozen=True)
class LayerPaths:
    """A self-attention layer: attention sublayer, then feed-forward sublayer."""

    attention: AttentionPaths
    feed_forward: FeedForwardPaths


@dataclass(frozen=True)
class CrossLayerPaths:
    """An LXMERT cross layer: ``cross`` (call 0 text ← image, call 1 image ← text, both on the
    layer's inputs), then a self-attention layer per stream."""

    cross: AttentionPaths
    text: LayerPaths
    image: LayerPaths


@dataclass(frozen=True)
class LrpPaths:
    """The modules LRP walks through, for one library model.

    Attributes:
        head: the answer head's Linear layers from the logits down; the last one reads the
            answer token of the text (or joint) stream's final hidden states (between them
            only LayerNorm, GELU, tanh and dropout, which LRP passes through).
        layers: the joint stream's layers (single stream) or the language stream's
            (``l_layers``), input side first.
        image_layers: the vision stream's layers (``r_layers``); () for a single stream.
        cross_layers: the cross-modality layers (``x_layers``); () for a single stream.
    """

    head: tuple[str, ...]
    layers: tuple[LayerPaths, ...]
    image_layers: tuple[LayerPaths, ...] = ()
    cross_layers: tuple[CrossLayerPaths, ...] = ()

    def tapped(self) -> tuple[str, ...]:
        """Every module whose input and output LRP reads, each once."""
        found: list[str] = list(self.head)
        layers = [*self.layers, *self.image_layers]
        for cross in self.cross_layers:
            found += _attention_modules(cross.cross)
            layers += [cross.text, cross.image]
        for layer in layers:
            found += _attention_modules(layer.attention)
            ffn = layer.feed_forward
            found += [ffn.fc1, ffn.fc2] + ([ffn.norm] if ffn.norm else [])
        return tuple(dict.fromkeys(found))


@dataclass
class LrpTape:
    """Inputs (first positional argument) and outputs of the tapped modules, one entry per
    call, detached; (B, ..., features) each."""

    inputs: dict[str, list[Tensor]] = field(default_factory=dict)
    outputs: dict[str, list[Tensor]] = field(default_factory=dict)

    def input(self, path: str, call: int = 0) -> Tensor:
        return _entry(self.inputs, path, call, "input")

    def output(self, path: str, call: int = 0) -> Tensor:
        return _entry(self.outputs, path, call, "output")


def lrp_paths(module: nn.Module) -> LrpPaths:
    """The `LrpPaths` of a transformers ViLT, VisualBERT or LXMERT question-answering model.

    Raises:
        TypeError: another ``config.model_type``.
    """
    config = module.config
    kind = config.model_type
    if kind == "vilt":
        return LrpPaths(
            head=("classifier.3", "classifier.0", "vilt.pooler.dense"),
            layers=tuple(_vilt_layer(n) for n in range(config.num_hidden_layers)),
        )
    if kind == "visual_bert":
        prefix = "visual_bert.encoder.layer"
        layers = tuple(_bert_layer(f"{prefix}.{n}") for n in range(config.num_hidden_layers))
        return LrpPaths(head=("cls",), layers=layers)
    if kind == "lxmert":
        prefix = "lxmert.encoder"
        return LrpPaths(
            head=("answer_head.logit_fc.3", "answer_head.logit_fc.0", "lxmert.pooler.dense"),
            layers=tuple(_bert_layer(f"{prefix}.layer.{n}") for n in range(config.l_layers)),
            image_layers=tuple(
                _bert_layer(f"{prefix}.r_layers.{n}") for n in range(config.r_layers)
            ),
            cross_layers=tuple(
                _lxmert_cross_layer(f"{prefix}.x_layers.{n}") for n in range(config.x_layers)
            ),
        )
    raise TypeError(f"no LRP rules for model_type {kind!r}")


@contextmanager
def record_lrp(model: BimodalModel) -> Iterator[BimodalRecording]:
    """`BimodalModel.record`, also keeping what LRP reads (``recording.lrp``, an `LrpTape`).

    The hooks are installed for the block and removed after it; they record only the calling
    thread's passes. Use as ``with record_lrp(model) as rec: logits = model(inputs)``.
    """
    paths = lrp_paths(model.module)
    tape = LrpTape()
    owner = threading.get_ident()

    def keep(path: str):
        def hook(_m: nn.Module, args: tuple, output: Any) -> None:
            if threading.get_ident() != owner:
                return
            output = output[0] if isinstance(output, tuple) else output
            tape.inputs.setdefault(path, []).append(args[0].detach())
            tape.outputs.setdefault(path, []).append(output.detach())

        return hook

    handles: list[RemovableHandle] = []
    with model.record() as recording:
        try:
            for path in paths.tapped():
                module = model.module.get_submodule(path)
                handles.append(module.register_forward_hook(keep(path)))
            recording.lrp = tape
            yield recording
        finally:
            for handle in handles:
                handle.remove()


def _entry(store: dict[str, list[Tensor]], path: str, call: int, what: str) -> Tensor:
    found = store.get(path, [])
    if call >= len(found):
        raise RuntimeError(f"no {what} of {path} (call {call}) recorded: run one forward pass")
    return found[call]


def _attention_modules(att: AttentionPaths) -> list[str]:
    return [att.query, att.key, att.value, att.dense] + ([att.norm] if att.norm else [])


def _vilt_layer(n: int) -> LayerPaths:
    p = f"vilt.encoder.layer.{n}"
    a = f"{p}.attention.attention"
    return LayerPaths(
        AttentionPaths(
            f"{a}.query",
            f"{a}.key",
            f"{a}.value",
            f"{p}.attention.output.dense",
            label=f"{a}.dropout",
            norm=f"{p}.layernorm_before",
        ),
        FeedForwardPaths(f"{p}.intermediate.dense", f"{p}.output.dense", f"{p}.layernorm_after"),
    )


def _bert_attention(attention: str, output: str) -> AttentionPaths:
    return AttentionPaths(
        f"{attention}.query",
        f"{attention}.key",
        f"{attention}.value",
        f"{output}.dense",
        label=f"{attention}.dropout",
    )


def _bert_layer(p: str) -> LayerPaths:
    """A post-LN BERT layer (VisualBERT's, LXMERT's language and vision layers)."""
    return LayerPaths(
        _bert_attention(f"{p}.attention.self", f"{p}.attention.output"),
        FeedForwardPaths(f"{p}.intermediate.dense", f"{p}.output.dense"),
    )


def _lxmert_cross_layer(p: str) -> CrossLayerPaths:
    def stream(att: str, inter: str, out: str) -> LayerPaths:
        attention = _bert_attention(f"{p}.{att}.self", f"{p}.{att}.output")
        return LayerPaths(attention, FeedForwardPaths(f"{p}.{inter}.dense", f"{p}.{out}.dense"))

    return CrossLayerPaths(
        cross=_bert_attention(f"{p}.visual_attention.att", f"{p}.visual_attention.output"),
        text=stream("lang_self_att", "lang_inter", "lang_output"),
        image=stream("visn_self_att", "visn_inter", "visn_output"),
    )

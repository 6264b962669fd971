"""Attention graphs: what a model declares so the relevance engine can explain it (seed 003 §3).

A model is described by its token sets (modalities), the attention layers between them in the
order the forward pass runs them, and where its answer is read. No tensors here: a declaration
is plain data, built once per model (or per request where set sizes vary) and validated when
built. The engine (`vitlens_server.explain.graph.engine.propagate`) takes a graph and, per
declared layer, the attention map and its gradient.

Shapes, for a batch of B inputs: a layer with queries from set q and keys from set k has an
attention map A of shape (B, h, |q|, |k|) (h heads, rows sum to 1 over the keys) and a gradient
∂y/∂A of the same shape; the engine's relevance matrix R^{xy} is (B, |x|, |y|).

Three kinds of layer (seed 003 §3, §3.2):
    self   queries and keys from one set x (Eq. 6-7): R^{xx} and every R^{xk} already made
    bi     co-attention of a two-stream model, queries from q, keys/values from k (Eq. 10-11):
           R^{qk} and R^{qq}; declare both directions when both streams attend to each other
    cross  encoder-decoder attention, decoder queries q on encoder keys k (Eq. 10 only): R^{qk};
           the encoder is not contextualised by the decoder, so there is no R^{kq} (Eq. 11 does
           not apply)

Examples (sizes may be omitted: they are then read from the maps, per batch):

    single stream, joint text+image:  sets (joint,), layers self(joint) x L,
                                      readout joint ← (joint,) at the classification row
    two stream (LXMERT-like):         sets (text, image); self(text) x L_t, self(image) x L_i,
                                      then per co-attention layer the step
                                      (bi(text←image), bi(image←text)), self(text), self(image);
                                      readout text ← (text, image) at CLS, row 0
    encoder-decoder (DETR-like):      sets (encoder, queries); self(encoder) x L_e, then per
                                      decoder layer self(queries), cross(queries←encoder);
                                      readout queries ← (encoder,) at row j (detection j)
    dual encoder (CLIP-like):         sets (image, text); self(image) x L_i, self(text) x L_t;
                                      readouts image ← (image,) at CLS and text ← (text,) at
                                      the pooled (EOT) row, given per input
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal, TypeAlias

__all__ = [
    "AttentionEdge",
    "AttentionGraph",
    "EdgeKind",
    "Readout",
    "Step",
    "TokenSet",
    "bi",
    "cross",
    "self_attention",
    "self_attention_graph",
]

EdgeKind: TypeAlias = Literal["self", "bi", "cross"]


@dataclass(frozen=True)
class TokenSet:
    """A set of tokens (a modality, or a stream of a model).

    Attributes:
        name: e.g. ``"image"``, ``"text"``, ``"queries"``, ``"encoder"``, ``"tokens"``.
        size: number of tokens |x|; None: read from the attention maps of each call (text
            length, number of regions or of queries may change from batch to batch).
        prefix: leading tokens that are not input positions (ViT class and register tokens:
            timm's ``model.num_prefix_tokens``), dropped from a row when it is read over this
            set; their rows and columns stay in the relevance matrices.
    """

    name: str
    size: int | None = None
    prefix: int = 0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a token set needs a name")
        if self.size is not None and self.size < 1:
            raise ValueError(f"token set {self.name!r}: size must be positive, got {self.size}")
        if self.prefix < 0 or (self.size is not None and self.prefix >= self.size):
            raise ValueError(f"token set {self.name!r}: prefix {self.prefix} out of range")


@dataclass(frozen=True)
class AttentionEdge:
    """One attention module: queries from set ``queries`` attend to keys of set ``keys``.

    Its map is (B, h, |queries|, |keys|). ``kind`` is ``"self"`` (queries == keys), ``"bi"``
    (co-attention, Eq. 10-11) or ``"cross"`` (encoder-decoder, Eq. 10 only); ``label`` names
    the module in error messages (e.g. ``"text.layer.3.attention"``).
    """

    kind: EdgeKind
    queries: str
    keys: str
    label: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("self", "bi", "cross"):
            raise ValueError(f"unknown attention kind {self.kind!r}; use self, bi or cross")
        if (self.kind == "self") != (self.queries == self.keys):
            raise ValueError(
                f"{self.describe()}: self-attention has queries == keys; bi and cross attention "
                "join two different sets"
            )

    def describe(self) -> str:
        where = f" ({self.label})" if self.label else ""
        return f"{self.kind} attention {self.queries} <- {self.keys}{where}"


Step: TypeAlias = tuple[AttentionEdge, ...]
"""Attention modules computed from the same inputs (e.g. LXMERT's co-attention both ways):
every edge of a step reads the relevances as they were before the step."""


def self_attention(name: str, label: str = "") -> AttentionEdge:
    """A self-attention layer over set ``name``."""
    return AttentionEdge("self", name, name, label)


def bi(queries: str, keys: str, label: str = "") -> AttentionEdge:
    """A co-attention layer of a two-stream model: ``queries`` attend to ``keys``."""
    return AttentionEdge("bi", queries, keys, label)


def cross(queries: str, keys: str, label: str = "") -> AttentionEdge:
    """An encoder-decoder attention layer: decoder ``queries`` attend to encoder ``keys``."""
    return AttentionEdge("cross", queries, keys, label)


@dataclass(frozen=True)
class Readout:
    """Where an answer is read: a row of R^{queries k} for each k in ``keys``.

    Attributes:
        name: what the row explains, e.g. ``"image"``, ``"text"``, ``"detection"``.
        queries: the set whose row is read (the token the model answers from lives there).
        keys: the sets the row is read over, e.g. ``("text", "image")`` for LXMERT's CLS (rows
            of R^{tt} and R^{ti}), ``("encoder",)`` for a detection (a row of R^{de}).
        row: the row's index in ``queries``; None: given with each read (a CLIP text tower's
            EOT position, the explained detection, a ViT readout's mix of rows).
    """

    name: str
    queries: str
    keys: tuple[str, ...]
    row: int | None = 0

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError(f"readout {self.name!r} reads over no token set")
        if self.row is not None and self.row < 0:
            raise ValueError(f"readout {self.name!r}: row must be >= 0, got {self.row}")


@dataclass(frozen=True)
class AttentionGraph:
    """A model's attention layers in forward order, its token sets and its readouts.

    Attributes:
        sets: the token sets; names are unique.
        steps: attention steps in the order the forward pass runs them; each step is one edge
            or several computed from the same inputs (`Step`). Any sequence of edges and of
            sequences of edges may be given; it is stored as a tuple of `Step` tuples.
        readouts: where answers are read; names are unique.

    ``edges`` lists every edge in order (steps flattened): the engine takes one map (and one
    gradient) per edge in that order. ``pairs`` are the ordered pairs (x, y) whose relevance
    R^{xy} the graph creates: (x, x) for every set, and (q, k) for every bi or cross edge.
    """

    sets: tuple[TokenSet, ...]
    steps: tuple[Step, ...]
    readouts: tuple[Readout, ...] = ()

    def __post_init__(self) -> None:
        steps = tuple(
            (step,) if isinstance(step, AttentionEdge) else tuple(step) for step in self.steps
        )
        object.__setattr__(self, "sets", tuple(self.sets))
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "readouts", tuple(self.readouts))
        self._validate()

    @cached_property
    def edges(self) -> tuple[AttentionEdge, ...]:
        return tuple(edge for step in self.steps for edge in step)

    @cached_property
    def pairs(self) -> frozenset[tuple[str, str]]:
        pairs = {(s.name, s.name) for s in self.sets}
        return frozenset(pairs | {(e.queries, e.keys) for e in self.edges if e.kind != "self"})

    def token_set(self, name: str) -> TokenSet:
        for token_set in self.sets:
            if token_set.name == name:
                return token_set
        raise KeyError(f"no token set {name!r}; sets: {', '.join(s.name for s in self.sets)}")

    def readout(self, name: str) -> Readout:
        for readout in self.readouts:
            if readout.name == name:
                return readout
        names = ", ".join(r.name for r in self.readouts) or "none"
        raise KeyError(f"no readout {name!r}; readouts: {names}")

    def _validate(self) -> None:
        names = [s.name for s in self.sets]
        if len(set(names)) != len(names):
            raise ValueError(f"token set names must be unique: {names}")
        if any(not step for step in self.steps):
            raise ValueError("an attention step holds no edge")
        for edge in self.edges:
            for name in (edge.queries, edge.keys):
                if name not in names:
                    raise ValueError(f"{edge.describe()}: undeclared token set {name!r}")
        readouts = [r.name for r in self.readouts]
        if len(set(readouts)) != len(readouts):
            raise ValueError(f"readout names must be unique: {readouts}")
        for readout in self.readouts:
            for key in readout.keys:
                if (readout.queries, key) not in self.pairs:
                    raise ValueError(
                        f"readout {readout.name!r} reads R^({readout.queries},{key}), which "
                        "this graph never creates"
                    )
            size = self.token_set(readout.queries).size
            if readout.row is not None and size is not None and readout.row >= size:
                raise ValueError(f"readout {readout.name!r}: row {readout.row} >= {size}")


def self_attention_graph(
    name: str,
    num_layers: int,
    *,
    prefix: int = 0,
    row: int | None = 0,
    readout: str | None = None,
    label: str = "",
) -> AttentionGraph:
    """One token set with ``num_layers`` self-attention layers: a ViT, one tower of a dual
    encoder, a single-stream joint sequence.

    Args:
        name: the set's name.
        num_layers: self-attention layers, in forward order.
        prefix: leading non-input tokens dropped when a row is read (`TokenSet.prefix`).
        row: the readout row (CLS: 0); None: given with each read (an EOT position).
        readout: the readout's name; None: ``name``.
        label: layer labels, formatted with the layer index (e.g. ``"blocks.{}.attn"``).
    """
    return AttentionGraph(
        sets=(TokenSet(name, prefix=prefix),),
        steps=tuple(self_attention(name, label.format(n)) for n in range(num_layers)),
        readouts=(Readout(readout or name, name, (name,), row=row),),
    )

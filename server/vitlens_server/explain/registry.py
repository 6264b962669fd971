"""The registry of explanation methods.

A method is one small function ``(recording, targets, params) -> MethodOutput`` that reads the
recording and changes nothing, plus a `MethodSpec` declaring the passes it needs, so the engine
runs each pass once for every method sharing it, and its `Cost`, so the runtime can schedule it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import Tensor

from vitlens_server.errors import InvalidArgument, clip
from vitlens_server.explain.params import NoParams
from vitlens_server.explain.records import Recording
from vitlens_server.models.loading import READOUTS

__all__ = [
    "METHODS",
    "Cost",
    "ExtraCount",
    "MaskMethodFn",
    "MethodFn",
    "MethodOutput",
    "MethodSpec",
    "Pass",
    "get_method",
    "register_method",
]


class Pass(enum.Flag):
    """Model passes a method needs."""

    FORWARD = enum.auto()
    BACKWARD = enum.auto()  # gradients of the target logit w.r.t. the attention maps
    LRP = enum.auto()  # activations for layer-wise relevance propagation (Chefer et al. 2021)
    EXTRA = enum.auto()  # further model passes the method runs itself (`Recording.passes`)


class Cost(enum.Enum):
    """What running a method costs, for scheduling (`MethodSpec.cost`)."""

    FORWARD = "forward"  # the shared forward pass and tensor math on what it recorded
    BACKWARD = "backward"  # also one backward pass per explained class, or an LRP propagation
    EXTRA = "extra"  # further model passes the method runs itself (`Pass.EXTRA`)
    HOST = "host"  # CPU-bound work on the host (attention_flow's maximum flows)


@dataclass(frozen=True)
class MethodOutput:
    """A method's raw result on the model's device.

    Attributes:
        heatmap: (B, gh, gw) token-grid map, or (B, H, W) for pixel methods (larger = more
            relevant); post-processing brings it to the requested grid.
        relevance: (B, N, N) token x token relevance, for methods that have one.
    """

    heatmap: Tensor
    relevance: Tensor | None = None


@dataclass(frozen=True)
class ExtraCount:
    """The further model passes (`Pass.EXTRA`) a method runs per explained image and class:
    ``forwards`` plain forwards, ``gradients`` forward+backward passes to the input."""

    forwards: int = 0
    gradients: int = 0


ExtraFn = Callable[[Any, int], ExtraCount]
"""``extra(params, tokens)``: a method's `ExtraCount` for its options and gh·gw patch tokens."""

MethodFn = Callable[[Recording, Tensor, Any], MethodOutput]
"""``fn(recording, targets, params)``: ``targets`` (B,) the explained class of each image."""

MaskMethodFn = Callable[[Tensor, Tensor, Any], MethodOutput]
"""``fn(masks, targets, params)`` of a ``needs_mask`` method: masks (B, H, W), targets (B,)."""

_Fn = TypeVar("_Fn", MethodFn, MaskMethodFn)


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its function and what the engine and the runtime need to know."""

    name: str
    fn: MethodFn | MaskMethodFn
    passes: Pass
    class_specific: bool
    relevance_matrix: bool
    readouts: tuple[str, ...] | None  # model readouts it applies to (None: any model)
    params: type
    description: str
    needs_mask: bool = False  # needs a ground-truth mask: Evaluate only, refused by Explain
    host_bound: bool = False  # its work is CPU-bound on the host, whatever its passes
    extra: ExtraFn | None = None  # how many further passes `Pass.EXTRA` means (benchmarks)

    def extra_count(self, params: object, tokens: int) -> ExtraCount:
        """The further passes one explanation runs with ``params`` (none without Pass.EXTRA)."""
        if self.extra is None:
            return ExtraCount()
        return self.extra(params, tokens)

    @property
    def cost(self) -> Cost:
        """`Cost.HOST` when host-bound, else the costliest of its passes: EXTRA, then BACKWARD
        (a backward pass or an LRP propagation), then FORWARD."""
        if self.host_bound:
            return Cost.HOST
        if Pass.EXTRA in self.passes:
            return Cost.EXTRA
        if self.passes & (Pass.BACKWARD | Pass.LRP):
            return Cost.BACKWARD
        return Cost.FORWARD

    def applies_to(self, readout: str) -> bool:
        """Whether the method can explain a model whose head reads tokens by ``readout``."""
        return self.readouts is None or readout in self.readouts

    @property
    def pass_names(self) -> list[str]:
        return [p.name.lower() for p in Pass if p in self.passes]


class MethodRegistry:
    """Name → spec; registering a name twice is an error, never a silent overwrite."""

    def __init__(self) -> None:
        self._specs: dict[str, MethodSpec] = {}

    def add(self, spec: MethodSpec) -> None:
        if spec.name in self._specs:
            raise ValueError(f"method {spec.name!r} is registered twice")
        self._specs[spec.name] = spec

    def get(self, name: str) -> MethodSpec:
        spec = self._specs.get(name)
        if spec is None:
            raise InvalidArgument(f"unknown method {clip(name)}; valid methods: {', '.join(self)}")
        return spec

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._specs))

    def specs(self) -> list[MethodSpec]:
        return [self._specs[name] for name in self]


METHODS = MethodRegistry()


def register_method(
    name: str,
    *,
    passes: Pass,
    description: str,
    class_specific: bool,
    relevance_matrix: bool = False,
    readouts: tuple[str, ...] | None = READOUTS,
    params: type = NoParams,
    needs_mask: bool = False,
    host_bound: bool = False,
    extra: ExtraFn | None = None,
) -> Callable[[_Fn], _Fn]:
    """Decorator adding a method function to `METHODS`; ``host_bound`` marks CPU-bound work;
    ``extra`` counts the passes `Pass.EXTRA` stands for (required with it)."""
    if (Pass.EXTRA in passes) != (extra is not None):
        raise ValueError(f"method {name!r}: Pass.EXTRA and an extra count go together")

    def add(fn: _Fn) -> _Fn:
        METHODS.add(
            MethodSpec(
                name=name,
                fn=fn,
                passes=passes | Pass.FORWARD,
                class_specific=class_specific,
                relevance_matrix=relevance_matrix,
                readouts=readouts,
                params=params,
                description=description,
                needs_mask=needs_mask,
                host_bound=host_bound,
                extra=extra,
            )
        )
        return fn

    return add


def get_method(name: str) -> MethodSpec:
    return METHODS.get(name)

"""Attention maps formed by the recorded pass itself, for recordings that ask for them.

timm's fused attention (``F.scaled_dot_product_attention``) never exposes A_l, so by default
`Recording.attention` rebuilds it from the recorded q and k: A_l = softmax(scale · q kᵀ), a
second q kᵀ and softmax per layer after the pass. A recording made with ``maps=True`` instead
runs timm's own unfused path in the recording thread — q kᵀ, softmax, ``attn_drop``, A·V — and
keeps the output of ``attn_drop`` (A_l itself in eval mode): the maps cost nothing beyond that
pass. The engine asks for it on CPU, for forward-only fp32 passes, where the unfused forward
runs as fast as the fused one (benchmarks/methods_roof measures both); gradient passes and the
other devices keep the fused kernel.

How: while the attention hooks are attached, each stock ``timm.layers.Attention``'s
``fused_attn`` flag is a `ThreadFlag`, true (or whatever timm chose) in every thread except one
whose active recording asks for maps; the flag is restored when the hooks come off, and a copy
of the model made meanwhile gets the plain value.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from timm.layers import Attention
from torch import nn

from vitlens_server.models.hook_scope import HookScope

__all__ = ["ThreadFlag", "add_map_taps", "forms_maps"]


def forms_maps(attn: nn.Module) -> bool:
    """Whether ``attn`` is timm's stock Attention, whose unfused path the taps rely on."""
    return (
        type(attn).forward is Attention.forward
        and isinstance(getattr(attn, "fused_attn", None), bool)
        and isinstance(getattr(attn, "attn_drop", None), nn.Module)
    )


class ThreadFlag:
    """``fused_attn`` as seen by the running thread: ``fused``, unless ``unfused()`` says the
    thread's recording wants the maps formed."""

    def __init__(self, fused: bool, unfused: Callable[[], bool]) -> None:
        self.fused = fused
        self._unfused = unfused

    def __bool__(self) -> bool:
        return self.fused and not self._unfused()

    def __deepcopy__(self, _memo: dict) -> bool:
        return self.fused  # a copy of the model is a plain model


class _Restore:
    """A handle putting ``attn.fused_attn`` back to its plain value."""

    def __init__(self, attn: nn.Module, fused: bool) -> None:
        self._attn, self._fused = attn, fused

    def remove(self) -> None:
        self._attn.fused_attn = self._fused


def add_map_taps(
    scope: HookScope,
    attns: list[nn.Module],
    local: threading.local,
    on_map: Callable[[int], Callable],
) -> bool:
    """Declare, in ``scope``, the thread flags and an ``attn_drop`` forward hook per layer
    (``on_map(index)``); ``local.maps`` is this thread's wish. Returns False (declaring nothing)
    unless every layer is timm's stock Attention."""
    if not attns or not all(forms_maps(attn) for attn in attns):
        return False

    def unfused() -> bool:
        return getattr(local, "maps", False)

    for index, attn in enumerate(attns):

        def install(attn: nn.Module = attn) -> list:
            fused = bool(attn.fused_attn)
            attn.fused_attn = ThreadFlag(fused, unfused)
            return [_Restore(attn, fused)]

        scope.add(install)
        scope.forward_hook(attn.attn_drop, on_map(index))
    return True

"""Hooks that record one tower's attention while the libraries keep their fused attention.

`TowerHooks` declares hooks on every attention module of a tower once per loaded model; they
are on the modules only while some thread records (`TowerHooks.record`, a
`vitlens_server.models.hook_scope.HookScope`), so Predict runs the bare towers. One tap per
attention kind:

* `TimmAttentionTap` (``timm.layers.Attention``, timm image towers): q and k from ``q_norm`` /
  ``k_norm``, v from ``qkv``, O from the input of ``attn.norm``; the mask from the call's
  ``attn_mask`` / ``is_causal``.
* `MultiheadAttentionTap` (``torch.nn.MultiheadAttention``, open_clip's ViT and text blocks): its
  fused kernel exposes neither q, k, v nor O, so q, k, v are projected from the module's input
  with its own ``in_proj`` weights and the output Z = O Wᵀ + b is kept with W (records.py); the
  mask is the call's ``attn_mask`` (+ ``key_padding_mask``).
* `HfClipAttentionTap` (transformers' ``CLIPAttention``): q, k, v from ``q_proj`` / ``k_proj`` /
  ``v_proj``, O from the input of ``out_proj``; the mask is set by the adapter, which knows it
  (causal, plus the padding of its ``attention_mask``), whatever attention kernel runs.

When the pass builds a graph but nothing before a layer requires grad (the weights never do),
the hook hands the layer an alias of O (or Z) that does: the graph then starts at the first
attention output, and ``torch.autograd.grad`` w.r.t. the recorded outputs never touches
parameter ``.grad``. A recording asked for its inputs (``record(inputs=True)``) also keeps the
output of the tower's input-embedding module (the text tower's token embedding), anchored the
same way, so ∂y/∂(input embeddings) can be asked for (saliency's text relevance). One asked
for LRP activations (``record(lrp=True)``) keeps what `LrpTaps` names: each block's input, the
inputs of its linear layers, its residual branches and the final norm's output (`BlockRecord`).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from vitlens_server.models.hook_scope import HookScope
from vitlens_server.models.image_text.lrp_taps import LrpTaps, install_lrp
from vitlens_server.models.image_text.records import (
    AttentionRecord,
    BlockRecord,
    TowerGraph,
    TowerRecording,
)

__all__ = [
    "AttentionTap",
    "HfClipAttentionTap",
    "MultiheadAttentionTap",
    "TimmAttentionTap",
    "TowerHooks",
    "additive_mask",
    "causal_mask",
]


class AttentionTap(Protocol):
    """Installs the hooks that fill layer ``index`` of the active recording of ``hooks``."""

    def install(self, hooks: TowerHooks, index: int) -> list[RemovableHandle]: ...


class TowerHooks:
    """Recording hooks on every attention layer of one tower.

    Declare once per loaded model; the hooks are on the tower only during `record()`. Each
    thread may have one recording active per tower, and a hook fills only the recording of the
    thread running the pass. `close()` removes every hook.
    """

    def __init__(
        self,
        graph: TowerGraph,
        taps: Sequence[AttentionTap],
        *,
        inputs: nn.Module | None = None,
        lrp: LrpTaps | None = None,
    ) -> None:
        """``inputs``: the module whose output (B, N, D) is the tower's input embeddings (the
        text tower's token embedding), recorded when a recording asks for it; None: none.
        ``lrp``: where LRP activations are read; None: the tower records none."""
        if len(taps) != graph.num_layers:
            raise ValueError(f"{graph.tower} tower: {len(taps)} taps for {graph.num_layers} layers")
        self.graph = graph
        self.has_inputs = inputs is not None
        self.lrp = lrp
        self._local = threading.local()  # .recording: this thread's active `TowerRecording`
        self._scope = HookScope()
        for index, tap in enumerate(taps):
            self._scope.add(functools.partial(tap.install, self, index))
        if inputs is not None:
            self._scope.forward_hook(inputs, _inputs_hook(self))
        self._lrp_scope = HookScope()  # attached only for recordings with lrp=True
        if lrp is not None:
            self._lrp_scope.add(functools.partial(install_lrp, self, lrp))
        with self._scope.attached(), self._lrp_scope.attached():
            pass  # a layout the taps cannot hook fails here, at load time

    @property
    def active(self) -> TowerRecording | None:
        """The recording of the calling thread, or None when it is not recording."""
        return getattr(self._local, "recording", None)

    @contextmanager
    def record(self, *, inputs: bool = False, lrp: bool = False) -> Iterator[TowerRecording]:
        """Activate the hooks, for this thread, for the passes inside the ``with`` block;
        ``inputs`` also records the tower's input embeddings (`TowerRecording.inputs`),
        ``lrp`` its LRP activations (`TowerRecording.blocks`, ``head_in``)."""
        if self.active is not None:
            raise RuntimeError(f"a recording of the {self.graph.tower} tower is already active")
        if inputs and not self.has_inputs:
            raise RuntimeError(f"the {self.graph.tower} tower records no input embeddings")
        if lrp and self.lrp is None:
            raise RuntimeError(f"the {self.graph.tower} tower records no LRP activations")
        recording = TowerRecording(
            self.graph,
            layers=[],
            record_inputs=inputs,
            record_lrp=lrp,
            blocks=[BlockRecord() for _ in range(self.graph.num_layers)] if lrp else None,
        )
        with self._scope.attached(), self._lrp_scope.attached() if lrp else nullcontext():
            self._local.recording = recording
            try:
                yield recording
            finally:
                self._local.recording = None

    def layer(self, index: int) -> AttentionRecord | None:
        """Layer ``index`` of the active recording (created on first use), or None."""
        rec = self.active
        if rec is None:
            return None
        while len(rec.layers) <= index:
            rec.layers.append(AttentionRecord())
        return rec.layers[index]

    def set_mask(self, mask: Tensor | None) -> None:
        """Store the tower's additive mask in the active recording (first layer's wins)."""
        rec = self.active
        if rec is not None and mask is not None and rec.mask is None:
            rec.mask = mask

    def close(self) -> None:
        """Remove all hooks."""
        self._scope.close()
        self._lrp_scope.close()


def _anchor(tensor: Tensor) -> Tensor:
    """``tensor``, or an alias of it that requires grad when the pass builds a graph."""
    if torch.is_grad_enabled() and not tensor.requires_grad:
        return tensor.detach().requires_grad_(True)
    return tensor


def _inputs_hook(hooks: TowerHooks) -> Callable[[nn.Module, tuple, Tensor], Tensor | None]:
    """A forward hook on the tower's input-embedding module: records its output (B, N, D),
    anchored, when the active recording asks for inputs. (A closure, not a bound method, so
    that copying the model never copies the hooks' thread-local state.)"""

    def on_inputs(_m: nn.Module, _args: tuple, output: Tensor) -> Tensor | None:
        rec = hooks.active
        if rec is None or not rec.record_inputs:
            return None
        rec.inputs = _anchor(output)
        return None if rec.inputs is output else rec.inputs

    return on_inputs


def _out_hook(hooks: TowerHooks, index: int) -> Callable[[nn.Module, tuple], tuple | None]:
    """A forward pre-hook on the module that reads layer ``index``'s attention output O
    (B, N, h·d): records it, anchored so that ∂y/∂O can be asked for."""

    def on_out(_m: nn.Module, args: tuple) -> tuple | None:
        rec = hooks.layer(index)
        if rec is None:
            return None
        rec.out = _anchor(args[0])
        return None if rec.out is args[0] else (rec.out, *args[1:])

    return on_out


def _heads(tensor: Tensor, num_heads: int) -> Tensor:
    """(B, N, h·d) → (B, h, N, d), detached."""
    b, n, _ = tensor.shape
    return tensor.detach().view(b, n, num_heads, -1).transpose(1, 2)


def causal_mask(n: int, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(1, 1, N, N) additive causal mask: -inf above the diagonal."""
    mask = torch.full((n, n), float("-inf"), dtype=dtype, device=device).triu(1)
    return mask[None, None]


def additive_mask(
    mask: Tensor, *, batch: int, num_heads: int, true_masks: bool, dtype: torch.dtype
) -> Tensor:
    """A library's attention mask as an additive (B|1, h|1, N, N) mask.

    Args:
        mask: (N, N), (B·h, N, N) or (B|1, h|1, N, N); bool or additive float.
        true_masks: for a bool mask, True marks a forbidden entry (``nn.MultiheadAttention``);
            False: True marks an allowed one (``F.scaled_dot_product_attention``).
    """
    if mask.dtype == torch.bool:
        forbidden = mask if true_masks else ~mask
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            forbidden, float("-inf")
        )
    mask = mask.detach().to(dtype)
    if mask.dim() == 2:
        return mask[None, None]
    if mask.dim() == 3:
        return mask.view(batch, num_heads, *mask.shape[-2:])
    return mask


class TimmAttentionTap:
    """Hooks on a ``timm.layers.Attention`` (fused qkv, q_norm, k_norm, norm)."""

    REQUIRED = ("qkv", "q_norm", "k_norm", "norm", "num_heads", "scale")

    def __init__(self, attn: nn.Module) -> None:
        missing = [name for name in self.REQUIRED if not hasattr(attn, name)]
        if missing or not isinstance(attn.qkv, nn.Linear):
            raise TypeError(
                f"{type(attn).__name__} is not a timm Attention with a fused qkv projection "
                f"(missing {', '.join(missing) or 'a Linear qkv'})"
            )
        self.attn = attn

    def install(self, hooks: TowerHooks, index: int) -> list[RemovableHandle]:
        attn = self.attn
        heads, scale = int(attn.num_heads), float(attn.scale)

        def on_call(_m: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            rec = hooks.layer(index)
            if rec is None:
                return
            rec.scale = scale
            x = args[0] if args else kwargs["x"]
            mask = kwargs.get("attn_mask", args[1] if len(args) > 1 else None)
            b, n, _ = x.shape
            if mask is not None:
                hooks.set_mask(
                    additive_mask(mask, batch=b, num_heads=heads, true_masks=False, dtype=x.dtype)
                )
            if kwargs.get("is_causal", False):
                hooks.set_mask(causal_mask(n, dtype=x.dtype, device=x.device))

        def on_qkv(_m: nn.Module, _args: tuple, output: Tensor) -> None:
            rec = hooks.layer(index)
            if rec is not None:
                b, n, _ = output.shape  # (B, N, 3·h·d)
                rec.v = output.detach().view(b, n, 3, heads, -1)[:, :, 2].transpose(1, 2)

        def on_tensor(name: str):
            def hook(_m: nn.Module, _args: tuple, output: Tensor) -> None:
                rec = hooks.layer(index)
                if rec is not None:
                    setattr(rec, name, output.detach())  # (B, h, N, d)

            return hook

        on_out = _out_hook(hooks, index)

        return [
            attn.register_forward_pre_hook(on_call, with_kwargs=True),
            attn.qkv.register_forward_hook(on_qkv),
            attn.q_norm.register_forward_hook(on_tensor("q")),
            attn.k_norm.register_forward_hook(on_tensor("k")),
            attn.norm.register_forward_pre_hook(on_out),
        ]


class MultiheadAttentionTap:
    """Hooks on a batch-first, self-attention ``torch.nn.MultiheadAttention``."""

    def __init__(self, attn: nn.MultiheadAttention) -> None:
        if not isinstance(attn, nn.MultiheadAttention):
            raise TypeError(f"{type(attn).__name__} is not a torch.nn.MultiheadAttention")
        if not attn.batch_first or not attn._qkv_same_embed_dim or attn.in_proj_weight is None:
            raise TypeError(
                "recording needs a batch-first nn.MultiheadAttention with one in_proj weight"
            )
        self.attn = attn

    def install(self, hooks: TowerHooks, index: int) -> list[RemovableHandle]:
        attn = self.attn
        heads = int(attn.num_heads)
        scale = float(attn.head_dim) ** -0.5

        def on_call(_m: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            rec = hooks.layer(index)
            if rec is None:
                return
            names = ("query", "key", "value")
            query, key, value = (
                args[i] if len(args) > i else kwargs.get(name) for i, name in enumerate(names)
            )
            if key is not query or value is not query:
                raise RuntimeError("recording covers self-attention only (key = value = query)")
            b = query.shape[0]
            with torch.no_grad():
                qkv = F.linear(query.detach(), attn.in_proj_weight, attn.in_proj_bias)
            q, k, v = qkv.chunk(3, dim=-1)
            rec.q, rec.k, rec.v = (_heads(t, heads) for t in (q, k, v))
            rec.scale = scale
            rec.out_weight = attn.out_proj.weight.detach()
            mask = kwargs.get("attn_mask")
            if mask is not None:
                mask = additive_mask(
                    mask, batch=b, num_heads=heads, true_masks=True, dtype=query.dtype
                )
            padding = kwargs.get("key_padding_mask")
            if padding is not None:  # (B, N): True (or -inf) marks a padding key
                pad = additive_mask(
                    padding[:, None, None, :],
                    batch=b,
                    num_heads=heads,
                    true_masks=True,
                    dtype=query.dtype,
                )
                mask = pad if mask is None else mask + pad
            hooks.set_mask(mask)

        def on_result(_m: nn.Module, _args: tuple, output: tuple) -> tuple | None:
            rec = hooks.layer(index)
            if rec is None:
                return None
            rec.out = _anchor(output[0])  # (B, N, E) = O Wᵀ + b
            return None if rec.out is output[0] else (rec.out, *output[1:])

        return [
            attn.register_forward_pre_hook(on_call, with_kwargs=True),
            attn.register_forward_hook(on_result),
        ]


class HfClipAttentionTap:
    """Hooks on a transformers ``CLIPAttention`` (q_proj, k_proj, v_proj, out_proj)."""

    REQUIRED = ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads", "scale")

    def __init__(self, attn: nn.Module) -> None:
        missing = [name for name in self.REQUIRED if not hasattr(attn, name)]
        if missing:
            raise TypeError(f"{type(attn).__name__} has no {', '.join(missing)}")
        self.attn = attn

    def install(self, hooks: TowerHooks, index: int) -> list[RemovableHandle]:
        attn = self.attn
        heads, scale = int(attn.num_heads), float(attn.scale)

        def on_proj(name: str):
            def hook(_m: nn.Module, _args: tuple, output: Tensor) -> None:
                rec = hooks.layer(index)
                if rec is not None:
                    setattr(rec, name, _heads(output, heads))  # (B, h, N, d)
                    rec.scale = scale

            return hook

        on_out = _out_hook(hooks, index)

        return [
            attn.q_proj.register_forward_hook(on_proj("q")),
            attn.k_proj.register_forward_hook(on_proj("k")),
            attn.v_proj.register_forward_hook(on_proj("v")),
            attn.out_proj.register_forward_pre_hook(on_out),
        ]

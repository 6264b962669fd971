"""Capture of attention scores, attention maps and their gradients from stock timm ViTs.

Hooks go on each block's attention submodules once per loaded model (`AttentionHooks`) and do
nothing unless a `Recording` is active, so classification keeps timm's fused attention
(`F.scaled_dot_product_attention`) and explanation does too: instead of switching the model to
its unfused path, the hooks record q and k (after `q_norm`/`k_norm`), v (from `qkv`) and the
attention output O = A·V (the input of `attn.norm`), and the maps are rebuilt from them:

    S_l  = scale · q kᵀ                      (B, H, N, N)  pre-softmax scores
    A_l  = softmax(S_l)                      (B, H, N, N)  attention
    ∇A_l = ∂y/∂O_l · vᵀ                      (B, H, N, N)  since O_l = A_l v_l

The last line is the exact gradient w.r.t. the post-softmax attention, as an unfused model with a
hook on `attn` would report it. One backward pass, `torch.autograd.grad` w.r.t. the recorded O_l
of all layers, serves the whole batch and never touches parameter `.grad`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from vitlens_server.models.loading import READOUTS, readout_kind

__all__ = ["AttentionHooks", "LayerRecord", "Recording", "UnsupportedModel"]


class UnsupportedModel(TypeError):
    """The model's attention modules are not of a layout the hooks understand."""


@dataclass
class LayerRecord:
    """Tensors of one attention layer, all (B, H, N, D) except `out` which is (B, N, H·D)."""

    q: Tensor | None = None
    k: Tensor | None = None
    v: Tensor | None = None
    out: Tensor | None = None
    out_grad: Tensor | None = None


@dataclass
class Recording:
    """What one forward (and optional backward) pass captured.

    Attributes:
        layers: one record per block, input side first.
        num_heads, scale: of the attention modules (the same in every block).
        num_prefix_tokens: P, tokens before the patch tokens.
        grid: (gh, gw) patch grid.
        readout: (N,) weights of the token rows the logits read — one-hot on the class token,
            half on each of the class and distillation tokens (DeiT distilled), uniform over
            the patch tokens (``global_pool='avg'``); None when the model pools otherwise.
        tokens: (B, N, D) output of the final norm, the tokens the classifier reads.
        classifier: (C, D) weight of the linear head (mean of both heads for DeiT distilled).
        targets: (B,) the class being explained, set by the engine before each method call.
        passes: further model passes (`ExtraPasses`), for methods that declare `Pass.EXTRA`.
    """

    layers: list[LayerRecord]
    num_heads: int
    scale: float
    num_prefix_tokens: int
    grid: tuple[int, int]
    readout: Tensor | None = None
    classifier: Tensor | None = None
    tokens: Tensor | None = None
    targets: Tensor | None = None
    passes: Any = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def scores(self, layer: int) -> Tensor:
        """Pre-softmax scores S_l = scale · q kᵀ, (B, H, N, N)."""
        rec = self.layers[layer]
        return (rec.q * self.scale) @ rec.k.transpose(-2, -1)

    def attention(self, layer: int) -> Tensor:
        """Attention A_l = softmax(S_l), (B, H, N, N); rows sum to 1."""
        return self.scores(layer).softmax(dim=-1)

    def attention_grad(self, layer: int) -> Tensor:
        """∂y/∂A_l for the targets of the last backward pass, (B, H, N, N)."""
        rec = self.layers[layer]
        if rec.out_grad is None:
            raise RuntimeError("attention gradients need a backward pass (passes include BACKWARD)")
        b, n, _ = rec.out_grad.shape
        grad = rec.out_grad.view(b, n, self.num_heads, -1).transpose(1, 2)  # (B, H, N, D)
        return grad @ rec.v.transpose(-2, -1)

    def readout_rows(self, matrix: Tensor) -> Tensor:
        """The readout's mix of the rows of a (..., N, N) token matrix, over the patch tokens.

        Returns (..., gh·gw): row 0 (the class token's) for class-token models, the mean of the
        class- and distillation-token rows for DeiT distilled, the mean of the patch rows for
        average-pooled models.
        """
        if self.readout is None:
            raise RuntimeError("this model has no fixed readout row (checked before queueing)")
        weights = self.readout.to(matrix.dtype)
        return torch.einsum("n,...nm->...m", weights, matrix)[..., self.num_prefix_tokens :]

    def readout_map(self, matrix: Tensor) -> Tensor:
        """`readout_rows` of a (B, N, N) matrix as a (B, gh, gw) map."""
        return self.readout_rows(matrix).reshape(matrix.shape[0], *self.grid)

    def attention_outputs(self) -> list[Tensor]:
        """O_l of every layer, (B, N, H·D): the tensors gradients are taken with respect to."""
        return [rec.out for rec in self.layers]


class AttentionHooks:
    """Recording hooks on every attention module of a timm VisionTransformer.

    Install once per loaded model; the hooks are inert outside `record()`. Only one recording
    may be active at a time (the model's worker thread serialises passes). `close()` removes
    every hook, leaving the model exactly as it was.
    """

    def __init__(self, model: nn.Module) -> None:
        self._attns = [_check_attention(i, block) for i, block in enumerate(model.blocks)]
        self._classifier = _classifier(model)
        self._grid = tuple(model.patch_embed.grid_size)
        self._num_prefix_tokens = int(model.num_prefix_tokens)
        self._readout = _readout_weights(model)
        self._active: Recording | None = None
        self._handles: list[RemovableHandle] = []
        for index, attn in enumerate(self._attns):
            self._handles += [
                attn.qkv.register_forward_hook(self._on_qkv(index, attn)),
                attn.q_norm.register_forward_hook(self._on_tensor(index, "q")),
                attn.k_norm.register_forward_hook(self._on_tensor(index, "k")),
                attn.norm.register_forward_pre_hook(self._on_out(index)),
            ]
        self._handles.append(model.norm.register_forward_hook(self._on_tokens))

    @contextmanager
    def record(self) -> Iterator[Recording]:
        """Activate the hooks for the passes run inside the ``with`` block."""
        if self._active is not None:
            raise RuntimeError("a recording is already active on this model")
        first = self._attns[0]
        recording = Recording(
            layers=[LayerRecord() for _ in self._attns],
            num_heads=first.num_heads,
            scale=float(first.scale),
            num_prefix_tokens=self._num_prefix_tokens,
            grid=self._grid,
            readout=self._readout,
            classifier=self._classifier,
        )
        self._active = recording
        try:
            yield recording
        finally:
            self._active = None

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Run passes inside a recording without recording them (extra passes of a method)."""
        active, self._active = self._active, None
        try:
            yield
        finally:
            self._active = active

    def close(self) -> None:
        """Remove all hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _on_qkv(self, index: int, attn: nn.Module):
        def hook(_module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if self._active is not None:
                b, n, _ = output.shape  # (B, N, 3·H·D)
                v = output.view(b, n, 3, attn.num_heads, -1)[:, :, 2]  # (B, N, H, D)
                self._active.layers[index].v = v.transpose(1, 2)

        return hook

    def _on_tensor(self, index: int, name: str):
        def hook(_module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if self._active is not None:
                setattr(self._active.layers[index], name, output)  # (B, H, N, D)

        return hook

    def _on_tokens(self, _module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if self._active is not None:
            self._active.tokens = output  # (B, N, D)

    def _on_out(self, index: int):
        def hook(_module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            if self._active is not None:
                self._active.layers[index].out = inputs[0]  # (B, N, H·D)

        return hook


def _classifier(model: nn.Module) -> Tensor | None:
    """(C, D) linear head weight; DeiT distilled averages its two heads as its logits do."""
    head, dist = getattr(model, "head", None), getattr(model, "head_dist", None)
    if not isinstance(head, nn.Linear):
        return None
    if isinstance(dist, nn.Linear):
        return (head.weight + dist.weight).detach() / 2
    return head.weight.detach()


def _readout_weights(model: nn.Module) -> Tensor | None:
    """(N,) weights of the token rows the logits read (see `Recording.readout`)."""
    kind = readout_kind(model)
    if kind not in READOUTS:
        return None
    p = int(model.num_prefix_tokens)
    gh, gw = model.patch_embed.grid_size
    param = next(model.parameters())
    weights = torch.zeros(p + gh * gw, dtype=param.dtype, device=param.device)
    if kind == "token":
        weights[0] = 1.0
    elif kind == "distilled":
        weights[:2] = 0.5
    else:
        weights[p:] = 1.0 / (gh * gw)
    return weights


_REQUIRED = ("qkv", "q_norm", "k_norm", "norm", "num_heads", "scale")


def _check_attention(index: int, block: nn.Module) -> nn.Module:
    attn = getattr(block, "attn", None)
    missing = [name for name in _REQUIRED if not hasattr(attn, name)]
    if attn is None or missing:
        kind = type(attn).__name__ if attn is not None else "no .attn"
        raise UnsupportedModel(
            f"block {index} has attention {kind} without {', '.join(missing) or 'attn'}; "
            "vitlens explains timm blocks built on timm.layers.Attention"
        )
    if getattr(attn, "qkv", None) is None or not isinstance(attn.qkv, nn.Linear):
        raise UnsupportedModel(f"block {index}: attention without a fused qkv projection")
    return attn

"""Record a model's passes under `AttentionHooks`: one forward, then backward passes on demand.

`capture` runs one forward pass of a batch with the hooks active and returns a `Capture`: the
recording and the logits. Each `Capture.gradients` call is one backward pass, ∂/∂O_l of a
weighted sum of chosen logits w.r.t. the recorded attention outputs of every layer, returned
as a new recording (`Recording.with_gradients`); the captured one never changes. The engine
runs one such backward per explained-class rank; `record` is the one-call form for a single
target per image (benchmarks, tests).

The graph starts at the input (``x.requires_grad_``), never at the weights, and
`torch.autograd.grad` never touches parameter ``.grad``.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vitlens_server.explain.capture import AttentionHooks
from vitlens_server.explain.records import ModelPasses, Recording

__all__ = ["Capture", "capture", "record"]


@dataclass(frozen=True)
class Capture:
    """One forward pass under the hooks.

    Attributes:
        recording: what the hooks captured (without gradients).
        logits: (B, classes) as the model made them; part of the autograd graph when captured
            with ``gradients=True``.
    """

    recording: Recording
    logits: Tensor

    def gradients(
        self, index: Tensor, weight: Tensor | None = None, *, retain: bool = False
    ) -> Recording:
        """The recording with ∂y/∂O_l for y = Σ_b weight_b · logits[b, index_b].

        Args:
            index: (B,) class of each image.
            weight: (B,) weight of each image's logit (0 leaves its gradients zero); None: 1.
            retain: keep the graph for a further call (False frees it).
        """
        chosen = self.logits.gather(1, index[:, None].to(self.logits.device))[:, 0]  # (B,)
        if weight is not None:
            chosen = chosen * weight
        grads = torch.autograd.grad(
            chosen.sum(), self.recording.attention_outputs(), retain_graph=retain
        )
        return self.recording.with_gradients(grads)


def capture(
    hooks: AttentionHooks,
    x: Tensor,
    *,
    lrp: bool = False,
    gradients: bool = False,
    autocast: AbstractContextManager | None = None,
    pixels: Tensor | None = None,
    passes: ModelPasses | None = None,
    maps: bool = False,
) -> Capture:
    """One forward pass of ``x`` through ``hooks.module`` with the hooks recording.

    Args:
        hooks: the model's hooks; the recording is this thread's.
        x: (B, C, H, W) the model's input (already normalised).
        lrp: also keep the activations LRP reads (`Recording.lrp`).
        gradients: build the autograd graph from ``x`` for `Capture.gradients`; otherwise the
            pass runs under ``torch.inference_mode`` (its tensors are inference tensors: the
            methods read them, never change them in place).
        autocast: context around the forward pass (e.g. bfloat16 autocast); None: none.
        pixels, passes: stored in the recording (`Recording.pixels`, `Recording.passes`).
        maps: form the attention maps in the pass (timm's unfused path) and keep them, rather
            than rebuild them after it (`vitlens_server.explain.attention_maps`).
    """
    with (
        hooks.record(lrp, pixels=pixels, passes=passes, maps=maps) as rec,
        torch.enable_grad() if gradients else torch.inference_mode(),
        autocast or contextlib.nullcontext(),
    ):
        logits = hooks.module(x.detach().requires_grad_(gradients))  # (B, classes)
    return Capture(rec, logits)


def record(
    model: nn.Module, x: Tensor, targets: Tensor | None = None, *, lrp: bool = False
) -> Recording:
    """The recording of ``model`` on ``x``, with gradients of the ``targets`` logits if given.

    Hooks are installed for this one pass and removed after it.

    Args:
        model: a timm VisionTransformer.
        x: (B, C, H, W) the model's input.
        targets: (B,) class per image: the recording then holds ∂y/∂O_l of
            y = Σ_b logits[b, targets_b] (one backward pass); None: a forward pass only.
        lrp: also keep the activations LRP reads.
    """
    hooks = AttentionHooks(model)
    try:
        captured = capture(hooks, x, lrp=lrp, gradients=targets is not None)
    finally:
        hooks.close()
    if targets is None:
        return captured.recording
    return captured.gradients(targets)

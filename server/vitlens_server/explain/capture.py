"""Capture of attention scores, attention maps and their gradients from stock timm ViTs.

`AttentionHooks` is made once per loaded model, but its hooks are on the model only while a
`Recording` is active (`AttentionHooks.record`): a pass outside every recording — Predict, or
the further passes Integrated Gradients, SmoothGrad and token reflection run — goes through the
bare model, exactly timm's fused forward (benchmarks/methods.md measures Predict against it).
Explanation keeps timm's fused attention (`F.scaled_dot_product_attention`) too: instead of
switching the model to its unfused path, the hooks record q and k (after `q_norm`/`k_norm`), v
(from `qkv`) and the attention output O = A·V (the input of `attn.norm`), and the maps are
rebuilt from them:

    S_l  = scale · q kᵀ                      (B, H, N, N)  pre-softmax scores
    A_l  = softmax(S_l)                      (B, H, N, N)  attention
    ∇A_l = ∂y/∂O_l · vᵀ                      (B, H, N, N)  since O_l = A_l v_l

The last line is the exact gradient w.r.t. the post-softmax attention, as an unfused model with a
hook on `attn` would report it. One backward pass, `torch.autograd.grad` w.r.t. the recorded O_l
of all layers, serves the whole batch and never touches parameter `.grad`.

With ``record(lrp=True)`` further hooks (on the model only while such a recording is active)
keep what layer-wise relevance propagation (`vitlens_server.explain.relevance`) reads: every
block's input, the inputs of its Linear layers and its two residual branches, and the
classifier's inputs/outputs (`LrpRecord`). They only keep references to tensors the forward
pass computes anyway.

The active recording is per thread: two threads may each record their own passes through the
same model at the same time, and a thread that is not recording leaves no trace in the other's
(while another thread records, its passes run the hooks, which find no recording of theirs and
keep nothing). The hooks are attached when the first recording starts and removed when the last
one ends (`vitlens_server.models.hook_scope.HookScope`); the attention and the LRP hooks are two
scopes, the LRP one attached only for recordings that ask for it.
`vitlens_server.explain.recording` runs the forward (and backward) passes under the hooks.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from timm.layers import Attention, LayerScale, Mlp
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from vitlens_server.explain.attention_maps import add_map_taps
from vitlens_server.explain.records import (
    AttentionRecord,
    BlockRecord,
    LrpRecord,
    ModelPasses,
    Recording,
)
from vitlens_server.models.hook_scope import HookScope
from vitlens_server.models.loading import READOUTS, readout_kind

__all__ = ["AttentionHooks", "UnsupportedModel"]


class UnsupportedModel(TypeError):
    """The model's attention modules are not of a layout the hooks understand."""


class AttentionHooks:
    """Recording hooks on every attention module of a timm VisionTransformer.

    Make once per loaded model; the hooks are on the model only during `record()`, so passes
    outside every recording run the bare model. Each thread may have one recording active at a
    time, and a hook fills only the recording of the thread running the pass. `close()` removes
    every hook, leaving the model exactly as it was. Every hook is a closure (copied as is), so a
    model can be deep-copied even while it records.
    """

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._attns = [_check_attention(i, block) for i, block in enumerate(model.blocks)]
        self._classifier = _classifier(model)
        self._grid = tuple(model.patch_embed.grid_size)
        self._num_prefix_tokens = int(model.num_prefix_tokens)
        self._readout = _readout_weights(model)
        self._dtype = next(model.parameters()).dtype
        self._local = threading.local()  # .recording: this thread's active `Recording`
        self._attention = HookScope()
        for index, attn in enumerate(self._attns):
            self._attention.forward_hook(attn.qkv, self._on_qkv(index, attn))
            self._attention.forward_hook(attn.q_norm, self._on_tensor(index, "q"))
            self._attention.forward_hook(attn.k_norm, self._on_tensor(index, "k"))
            self._attention.pre_hook(attn.norm, self._on_out(index))
        self._attention.forward_hook(model.norm, self._on_tokens())
        # recordings with maps=True: timm's unfused path in that thread, A_l kept as formed
        self.forms_maps = add_map_taps(self._attention, self._attns, self._local, self._on_map)
        self._lrp = HookScope()
        self.lrp_problem = _lrp_problem(model)
        if self.lrp_problem is None:
            self._add_lrp_hooks(model)

    @property
    def module(self) -> nn.Module:
        """The model the hooks are on."""
        return self._model

    @contextmanager
    def record(
        self,
        lrp: bool = False,
        *,
        pixels: Tensor | None = None,
        passes: ModelPasses | None = None,
        maps: bool = False,
    ) -> Iterator[Recording]:
        """Record, for this thread, the passes it runs inside the ``with`` block.

        The hooks are attached on entry (unless another thread's recording has them attached
        already) and removed on exit after the last recording ends.

        ``lrp``: also keep the activations layer-wise relevance propagation reads
        (`Recording.lrp`); raises `UnsupportedModel` where the model's layout has no LRP rules.
        ``pixels`` (B, C, H, W) in [0, 1] and ``passes`` are stored in the recording as given.
        ``maps``: run timm's unfused attention in this thread and keep each A_l as the pass
        forms it (`vitlens_server.explain.attention_maps`; ignored where `forms_maps` is False).
        """
        if self._active is not None:
            raise RuntimeError("a recording is already active on this model in this thread")
        if lrp and self.lrp_problem is not None:
            raise UnsupportedModel(self.lrp_problem)
        first = self._attns[0]
        recording = Recording(
            layers=[AttentionRecord(scale=float(attn.scale)) for attn in self._attns],
            num_heads=first.num_heads,
            num_prefix_tokens=self._num_prefix_tokens,
            grid=self._grid,
            readout=self._readout,
            classifier=self._classifier,
            pixels=pixels,
            passes=passes,
            lrp=self._new_lrp_record() if lrp else None,
        )
        with ExitStack() as scopes:
            scopes.enter_context(self._attention.attached())
            if lrp:
                scopes.enter_context(self._lrp.attached())
            self._local.recording = recording
            self._local.maps = maps and self.forms_maps
            try:
                yield recording
            finally:
                self._local.recording = None
                self._local.maps = False

    @property
    def attached(self) -> bool:
        """Whether any hook is on the model now (a recording is active in some thread)."""
        return self._attention.is_attached or self._lrp.is_attached

    @property
    def _active(self) -> Recording | None:
        """The recording of the calling thread, or None when it is not recording."""
        return getattr(self._local, "recording", None)

    def close(self) -> None:
        """Remove all hooks, even those of recordings still active."""
        self._attention.close()
        self._lrp.close()

    def _keep(self, tensor: Tensor) -> Tensor:
        """A captured activation in the weights' dtype: under bf16 autocast the methods still
        compute in float32 (`out`, the gradient anchor, is kept as the model made it)."""
        return tensor if tensor.dtype == self._dtype else tensor.to(self._dtype)

    def _on_qkv(self, index: int, attn: nn.Module):
        def hook(_module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> None:
            rec = self._active
            if rec is not None:
                b, n, _ = output.shape  # (B, N, 3·H·D)
                v = output.view(b, n, 3, attn.num_heads, -1)[:, :, 2]  # (B, N, H, D)
                rec.layers[index].v = self._keep(v.transpose(1, 2))

        return hook

    def _on_tensor(self, index: int, name: str):
        def hook(_module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> None:
            rec = self._active
            if rec is not None:
                setattr(rec.layers[index], name, self._keep(output))  # (B, H, N, D)

        return hook

    def _on_map(self, index: int):
        def hook(_module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> None:
            rec = self._active
            if rec is not None:
                rec.layers[index].attn = self._keep(output)  # (B, H, N, N)

        return hook

    def _on_tokens(self):
        def hook(_module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> None:
            rec = self._active
            if rec is not None:
                rec.tokens = self._keep(output)  # (B, N, D)

        return hook

    def _on_out(self, index: int):
        def hook(_module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            rec = self._active
            if rec is not None:
                rec.layers[index].out = inputs[0]  # (B, N, H·D)

        return hook

    def _add_lrp_hooks(self, model: nn.Module) -> None:
        """Hooks keeping `LrpRecord` tensors; they return None, so outputs are unchanged."""
        lrp = self._lrp
        for index, block in enumerate(model.blocks):
            lrp.pre_hook(block, self._lrp_input(index, "x"))
            lrp.pre_hook(block.attn.qkv, self._lrp_input(index, "qkv_in"))
            lrp.pre_hook(block.attn.proj, self._lrp_input(index, "proj_in"))
            lrp.forward_hook(block.ls1, self._lrp_output(index, "attn_branch"))
            lrp.pre_hook(block.mlp.fc1, self._lrp_input(index, "fc1_in"))
            lrp.pre_hook(block.mlp.fc2, self._lrp_input(index, "fc2_in"))
            lrp.forward_hook(block.ls2, self._lrp_output(index, "mlp_branch"))
        for index, head in enumerate(_heads(model)):
            lrp.forward_hook(head, self._lrp_head(index))
        if readout_kind(model) == "avg":
            lrp.pre_hook(model.fc_norm, self._lrp_pooled())

    def _new_lrp_record(self) -> LrpRecord:
        model = self._model
        pool = readout_kind(model)
        heads = _heads(model)
        return LrpRecord(
            layers=[BlockRecord() for _ in self._attns],
            blocks=list(model.blocks),
            heads=heads,
            pool=pool,
            pool_start=0
            if getattr(model, "pool_include_prefix", False)
            else self._num_prefix_tokens,
            head_in=[None] * len(heads),
            head_out=[None] * len(heads),
        )

    def _active_lrp(self) -> LrpRecord | None:
        """The LRP part of this thread's recording, when it records one."""
        rec = self._active
        return None if rec is None else rec.lrp

    def _lrp_input(self, index: int, name: str):
        def hook(_module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            lrp = self._active_lrp()
            if lrp is not None:
                setattr(lrp.layers[index], name, self._keep(inputs[0]))

        return hook

    def _lrp_output(self, index: int, name: str):
        def hook(_module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> None:
            lrp = self._active_lrp()
            if lrp is not None:
                setattr(lrp.layers[index], name, self._keep(output))

        return hook

    def _lrp_head(self, index: int):
        def hook(_module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            lrp = self._active_lrp()
            if lrp is not None:
                lrp.head_in[index] = self._keep(inputs[0])  # (B, D)
                lrp.head_out[index] = self._keep(output)  # (B, C)

        return hook

    def _lrp_pooled(self):
        def hook(_module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            lrp = self._active_lrp()
            if lrp is not None:
                lrp.pooled = self._keep(inputs[0])  # (B, D)

        return hook


def _classifier(model: nn.Module) -> Tensor | None:
    """(C, D) linear head weight; DeiT distilled averages its two heads as its logits do."""
    head, dist = getattr(model, "head", None), getattr(model, "head_dist", None)
    if not isinstance(head, nn.Linear):
        return None
    if isinstance(dist, nn.Linear):
        return (head.weight + dist.weight).detach() / 2
    return head.weight.detach()


def _heads(model: nn.Module) -> list[nn.Linear]:
    """The Linear classifier heads whose outputs the logits average (one, or two for DeiT)."""
    heads = [getattr(model, "head", None)]
    if readout_kind(model) == "distilled":
        heads.append(getattr(model, "head_dist", None))
    return heads


def _lrp_problem(model: nn.Module) -> str | None:
    """Why LRP cannot propagate through ``model``, or None when every part has a rule."""
    kind = readout_kind(model)
    if kind not in READOUTS:
        return f"LRP has no rule for the {kind!r} pooling of this model"
    if getattr(model, "attn_pool", None) is not None:
        return "LRP has no rule for attention pooling"
    if not all(isinstance(head, nn.Linear) for head in _heads(model)):
        return "LRP needs a Linear classifier head"
    scale_types = (nn.Identity, LayerScale)
    for index, block in enumerate(model.blocks):
        attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
        layout = (
            type(block).forward is Block.forward
            and type(attn).forward is Attention.forward
            and getattr(attn, "gate", None) is None
            and isinstance(attn.proj, nn.Linear)
            and type(mlp).forward is Mlp.forward
            and isinstance(mlp.fc1, nn.Linear)
            and isinstance(mlp.fc2, nn.Linear)
            and isinstance(block.ls1, scale_types)
            and isinstance(block.ls2, scale_types)
        )
        if not layout:
            return (
                f"LRP rules cover timm's pre-norm Block (Attention, Mlp, LayerScale); block "
                f"{index} is {type(block).__name__} with {type(attn).__name__} and "
                f"{type(mlp).__name__}"
            )
    return None


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

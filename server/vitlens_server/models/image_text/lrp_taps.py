"""Where each supported tower keeps the activations LRP reads (`LrpTaps`), per block kind.

Every block is pre-norm, x_mid = x + ls1(attn(norm1(x))), out = x_mid + ls2(fc2(act(fc1(
norm2(x_mid))))), in three spellings:

    open_clip ResidualAttentionBlock  ln_1, attn (nn.MultiheadAttention: in_proj, out_proj),
                                      ls_1, ln_2, mlp.c_fc, mlp.c_proj, ls_2
    timm Block                        norm1, attn.qkv, attn.proj, ls1, norm2, mlp.fc1,
                                      mlp.fc2, ls2
    transformers CLIPEncoderLayer     layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2,
                                      mlp.fc1, mlp.fc2 (no layer scale: the branch is the
                                      module's output)

A tower whose head is not "final norm → pooling → one linear projection" gets no taps (None).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

if TYPE_CHECKING:
    from vitlens_server.models.image_text.hooks import TowerHooks

__all__ = ["LrpTaps", "hf_clip_taps", "install_lrp", "open_clip_taps", "timm_taps"]


@dataclass(frozen=True)
class LrpTaps:
    """Where one tower's LRP activations are read, and the weights the rules read (never write).

    Attributes:
        blocks: per layer, `BlockRecord` field → (module, ``"in"`` its first input | ``"out"``
            its output); ``proj_in`` may be missing (rebuilt as A·V).
        head: the final norm, whose output is recorded as ``head_in``.
        weights: () → (per layer ``qkv`` (3·h·d, W) [q; k; v] rows, ``proj`` (W, h·d), ``fc1``
            (F, W), ``fc2`` (W, F); and (D, W) the embedding projection after the final norm
            and pooling), read from the model when called (so on its current device).
    """

    blocks: Sequence[Mapping[str, tuple[nn.Module, str]]]
    head: nn.Module
    weights: Callable[[], tuple[list[dict[str, Tensor]], Tensor]]


def install_lrp(hooks: TowerHooks, lrp: LrpTaps) -> list[RemovableHandle]:
    """Hooks that fill the active recording's `BlockRecord` fields and ``head_in`` (closures,
    like every tap, so copying the model copies no state)."""

    def store(index: int | None, field: str, value: Any) -> None:
        rec = hooks.active
        if rec is None or not rec.record_lrp:
            return
        value = value[0] if isinstance(value, tuple) else value
        if index is None:
            rec.head_in = value.detach()
        else:
            setattr(rec.blocks[index], field, value.detach())

    def on_input(index: int, field: str):
        def hook(_m: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            store(index, field, args[0] if args else next(iter(kwargs.values())))

        return hook

    def on_output(index: int | None, field: str):
        def hook(_m: nn.Module, _args: tuple, output: Any) -> None:
            store(index, field, output)

        return hook

    handles = []
    for index, fields in enumerate(lrp.blocks):
        for field, (module, side) in fields.items():
            if side == "in":
                handles.append(
                    module.register_forward_pre_hook(on_input(index, field), with_kwargs=True)
                )
            else:
                handles.append(module.register_forward_hook(on_output(index, field)))
    handles.append(lrp.head.register_forward_hook(on_output(None, "head_in")))
    return handles


def open_clip_taps(blocks: Sequence[nn.Module], head: nn.Module, projection) -> LrpTaps | None:
    """Taps of open_clip ``ResidualAttentionBlock``s; ``projection`` () → (W, D) parameter or
    Linear (None: no projection, no taps)."""
    if not all(hasattr(b, "ln_1") and hasattr(b.mlp, "c_proj") for b in blocks):
        return None
    taps = [
        {
            "x": (b, "in"),
            "qkv_in": (b.ln_1, "out"),
            "attn_branch": (b.ls_1, "out"),
            "fc1_in": (b.ln_2, "out"),
            "fc2_in": (b.mlp.c_proj, "in"),
            "mlp_branch": (b.ls_2, "out"),
        }
        for b in blocks
    ]

    def weights() -> tuple[list[dict[str, Tensor]], Tensor]:
        found = [
            {
                "qkv": b.attn.in_proj_weight,
                "proj": b.attn.out_proj.weight,
                "fc1": b.mlp.c_fc.weight,
                "fc2": b.mlp.c_proj.weight,
            }
            for b in blocks
        ]
        return found, _projection(projection())

    return LrpTaps(taps, head, weights)


def timm_taps(blocks: Sequence[nn.Module], head: nn.Module, projection: nn.Linear) -> LrpTaps:
    """Taps of timm ``Block``s (final norm ``head``, projection Linear)."""
    taps = [
        {
            "x": (b, "in"),
            "qkv_in": (b.norm1, "out"),
            "proj_in": (b.attn.proj, "in"),
            "attn_branch": (b.ls1, "out"),
            "fc1_in": (b.norm2, "out"),
            "fc2_in": (b.mlp.fc2, "in"),
            "mlp_branch": (b.ls2, "out"),
        }
        for b in blocks
    ]

    def weights() -> tuple[list[dict[str, Tensor]], Tensor]:
        found = [
            {
                "qkv": b.attn.qkv.weight,
                "proj": b.attn.proj.weight,
                "fc1": b.mlp.fc1.weight,
                "fc2": b.mlp.fc2.weight,
            }
            for b in blocks
        ]
        return found, projection.weight

    return LrpTaps(taps, head, weights)


def hf_clip_taps(layers: Sequence[nn.Module], head: nn.Module, projection: nn.Linear) -> LrpTaps:
    """Taps of transformers ``CLIPEncoderLayer``s; q, k, v weights stacked as [q; k; v]."""
    taps = [
        {
            "x": (layer, "in"),
            "qkv_in": (layer.layer_norm1, "out"),
            "proj_in": (layer.self_attn.out_proj, "in"),
            "attn_branch": (layer.self_attn, "out"),
            "fc1_in": (layer.layer_norm2, "out"),
            "fc2_in": (layer.mlp.fc2, "in"),
            "mlp_branch": (layer.mlp, "out"),
        }
        for layer in layers
    ]

    def weights() -> tuple[list[dict[str, Tensor]], Tensor]:
        found = []
        for layer in layers:
            attn = layer.self_attn
            qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
            found.append(
                {
                    "qkv": qkv,
                    "proj": attn.out_proj.weight,
                    "fc1": layer.mlp.fc1.weight,
                    "fc2": layer.mlp.fc2.weight,
                }
            )
        return found, projection.weight

    return LrpTaps(taps, head, weights)


def _projection(found: nn.Linear | Tensor | None) -> Tensor:
    """(D, W) weight of an open_clip projection: a Linear's weight, or a (W, D) parameter's
    transpose (x @ P)."""
    if isinstance(found, nn.Linear):
        return found.weight
    if found is None:
        raise RuntimeError("the tower has no projection")
    return found.T

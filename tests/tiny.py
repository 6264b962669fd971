"""Tiny timm ViTs and paper-equation references shared by the tests."""

from __future__ import annotations

import copy

import timm
import torch
from torch import nn

from vitlens_server.models import ModelSpec
from vitlens_server.models.loading import LoadedModel, WeightsInfo, _read_geometry

TINY_KWARGS = {
    "img_size": 32,
    "patch_size": 8,
    "embed_dim": 24,
    "depth": 3,
    "num_heads": 3,
    "num_classes": 5,
}


TINY_ARCH = "vit_tiny_patch16_224"


def tiny_vit(
    seed: int = 0, dtype: torch.dtype = torch.float32, arch: str = TINY_ARCH, **overrides
) -> nn.Module:
    """A 3-block, 3-head ViT on 32 px images with a 4 x 4 patch grid (N = 17 tokens)."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, **{**TINY_KWARGS, **overrides})
    # Sharpen the random init so attention is far from uniform and maps are informative.
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(4.0)
    return model.eval().to(dtype)


def tiny_loaded(
    seed: int = 0, device: str = "cpu", arch: str = TINY_ARCH, **overrides
) -> LoadedModel:
    module = tiny_vit(seed, arch=arch, **overrides).requires_grad_(False).to(device)
    kwargs = {**TINY_KWARGS, **overrides}
    spec = ModelSpec(name="tiny", architecture=arch, model_kwargs=kwargs, device=device)
    geometry = _read_geometry(module)
    labels = tuple(f"c{i}" for i in range(geometry.num_classes))
    return LoadedModel(
        spec, module, geometry, labels, (0.5,) * 3, (0.5,) * 3, WeightsInfo("random", True)
    )


def unfused_attention_and_grads(
    model: nn.Module, x: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Reference capture through timm's *unfused* path on a copy of ``model``.

    Returns logits (B, C) and, per layer, A_l and ∂y/∂A_l, each (B, H, N, N), with y the sum of
    the target logits — the gradient w.r.t. the post-softmax attention, as Chefer's code takes it.
    """
    ref = copy.deepcopy(model)
    maps: list[torch.Tensor] = []
    for block in ref.blocks:
        block.attn.fused_attn = False

        def keep(_m, _i, out, maps=maps):
            out.retain_grad()
            maps.append(out)

        block.attn.attn_drop.register_forward_hook(keep)
    x = x.clone().requires_grad_(True)
    logits = ref(x)
    logits.gather(1, targets[:, None]).sum().backward()
    return logits.detach(), [a.detach() for a in maps], [a.grad for a in maps]

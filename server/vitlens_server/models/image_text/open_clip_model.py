"""open_clip models from local files: a hub-layout directory or a built-in architecture + file.

Built with open_clip's own classes (``CLIP`` / ``CustomTextCLIP``) from the configuration, then
loaded with tensors read by `weights.read_tensors` (never an unrestricted ``torch.load``) — the
same model ``open_clip.create_model('local-dir:DIR')`` builds, without its weight lookup.

Supported towers: image — open_clip's ``VisionTransformer`` (class-token or average pooling) or a
timm Vision Transformer (``vision_cfg.timm_model_name``, ``timm_pool`` ``token`` or ``avg``);
text — open_clip's ``TextTransformer`` with the CLIP BPE tokenizer bundled with open_clip.
Refused with `ImageTextLoadError`: ResNet (``ModifiedResNet``) and other non-ViT (ConvNeXt...)
image towers, attentional pooling, CoCa, Hugging Face text towers and tokenizers, open_clip's
"custom" attention blocks.

``vision_cfg.timm_model_kwargs`` (a vitlens extension, read and removed before open_clip sees
the configuration): keyword arguments of ``timm.create_model`` for the timm tower, e.g.
``{"depth": 6}`` — open_clip 3.3 cannot express a timm tower other than a named model's default.
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import timm
import torch
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.timm_model import TimmModel
from open_clip.transform import PreprocessCfg, merge_preprocess_dict
from open_clip.transformer import VisionTransformer
from timm.layers import Mlp
from torch import Tensor, nn

from vitlens_server.models.image_text.base import (
    ImageTextLoadError,
    ImageTextModel,
    Preprocess,
    readout_weights,
)
from vitlens_server.models.image_text.hooks import (
    MultiheadAttentionTap,
    TimmAttentionTap,
    TowerHooks,
)
from vitlens_server.models.image_text.lrp_taps import open_clip_taps, timm_taps
from vitlens_server.models.image_text.records import TowerGraph
from vitlens_server.models.image_text.source import ImageTextSource
from vitlens_server.models.image_text.tokenizer import OpenClipBpeTokenizer
from vitlens_server.models.image_text.weights import load_strict, read_tensors
from vitlens_server.models.loading import readout_kind

__all__ = ["CONFIG_FILE", "WEIGHT_FILES", "OpenClipModel", "build_open_clip", "load_open_clip"]

CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)
_TEXT_POOLS = {"argmax": "eot", "eos": "eot", "first": "first", "last": "last"}
_PLACEHOLDER = "test_vit"  # timm's smallest ViT
_BPE_VOCAB = 49408  # open_clip's bundled CLIP BPE: 256 bytes x 2 + 48894 merges + 2 specials


class OpenClipModel(ImageTextModel):
    """An open_clip ``CLIP`` / ``CustomTextCLIP`` with ViT image and Transformer text towers."""

    def __init__(
        self, module: nn.Module, *, source: str, preprocess: Preprocess, model_cfg: dict[str, Any]
    ) -> None:
        text_cfg = model_cfg.get("text_cfg", {})
        text = module.text if isinstance(module, CustomTextCLIP) else module
        self._text_pool = text.pool_type if hasattr(text, "pool_type") else module.text_pool_type
        self._eos_id = getattr(text, "eos_id", getattr(module, "text_eos_id", None))
        tokenizer = OpenClipBpeTokenizer(
            text.context_length, **(text_cfg.get("tokenizer_kwargs") or {})
        )
        image_hooks, image_rows = _image_tower(module.visual)
        try:
            text_hooks = _text_tower(text, self._text_pool)
        except BaseException:
            image_hooks.close()
            raise
        super().__init__(
            module,
            source=source,
            tokenizer=tokenizer,
            preprocess=preprocess,
            image_hooks=image_hooks,
            text_hooks=text_hooks,
            image_read_rows=image_rows,
            embed_dim=int(model_cfg["embed_dim"]),
        )

    def _image_features(self, pixels: Tensor) -> Tensor:
        return self.module.encode_image(pixels)

    def _text_features(self, ids: Tensor, valid: Tensor | None) -> Tensor:
        return self.module.encode_text(ids)

    def pooled_index(self, ids: Tensor) -> Tensor:
        if self._text_pool == "argmax":
            return ids.argmax(dim=-1)
        if self._text_pool == "eos":
            return (ids == self._eos_id).int().argmax(dim=-1)
        if self._text_pool == "first":
            return torch.zeros(len(ids), dtype=torch.long, device=ids.device)
        return torch.full((len(ids),), ids.shape[1] - 1, dtype=torch.long, device=ids.device)

    @property
    def logit_scale(self) -> Tensor:
        return self.module.logit_scale.reshape(())

    @property
    def logit_bias(self) -> Tensor | None:
        bias = getattr(self.module, "logit_bias", None)
        return None if bias is None else bias.reshape(())


def load_open_clip(source: ImageTextSource, *, device: str = "cpu") -> OpenClipModel:
    """Build and load the open_clip model of ``source`` (a hub-layout directory, or a built-in
    architecture with a checkpoint file) on ``device``.

    Raises:
        ImageTextLoadError: missing or unreadable files, an unsupported tower, weights that do
            not fit the configuration.
    """
    if source.architecture is None:
        model_cfg, preprocess_cfg, weights = _read_directory(source.path)
    else:
        model_cfg, preprocess_cfg, weights = _builtin(source.architecture), {}, source.path
    tensors = read_tensors(weights)  # first: a missing or unsafe file fails before any build
    module = build_open_clip(model_cfg)
    preprocess = _preprocess(module.visual, preprocess_cfg)
    model = OpenClipModel(module, source=str(source), preprocess=preprocess, model_cfg=model_cfg)
    try:  # the towers are supported (the adapter refuses others): load the weights
        if isinstance(module, CustomTextCLIP) and "text_projection" in tensors:
            tensors = _to_custom_text(tensors)
        if "logit_scale" in tensors:
            tensors["logit_scale"] = tensors["logit_scale"].reshape(module.logit_scale.shape)
        load_strict(module, tensors, weights, f"the open_clip model of {source}")
    except BaseException:
        model.close()
        raise
    module.eval().requires_grad_(False).to(device)
    return model


def build_open_clip(model_cfg: dict[str, Any]) -> nn.Module:
    """open_clip's model for ``model_cfg`` (random weights), refusing unsupported towers."""
    cfg = copy.deepcopy(model_cfg)
    vision, text = dict(cfg.pop("vision_cfg", {})), dict(cfg.pop("text_cfg", {}))
    timm_kwargs = vision.pop("timm_model_kwargs", None) or {}
    _refuse(cfg, vision, text)
    vision["timm_model_pretrained"] = False  # never downloads
    model_class = CustomTextCLIP if cfg.pop("custom_text", False) else CLIP
    # With timm kwargs open_clip builds a small placeholder tower (its own TimmModel around timm's
    # test_vit; building the named model's default would cost seconds), whose trunk and head
    # are then rebuilt from the named model with the kwargs.
    built = {**vision, "timm_model_name": _PLACEHOLDER} if timm_kwargs else vision
    try:
        module = model_class(**cfg, vision_cfg=built, text_cfg=text)
        if timm_kwargs:
            _rebuild_timm_tower(module.visual, vision, timm_kwargs, int(cfg["embed_dim"]))
    except (TypeError, ValueError, RuntimeError, AssertionError) as err:
        raise ImageTextLoadError(f"open_clip cannot build this model_cfg: {err}") from err
    return module


def _read_directory(path: Path) -> tuple[dict, dict, Path]:
    if not path.is_dir():
        raise ImageTextLoadError(f"open_clip model directory {path} does not exist")
    config = path / CONFIG_FILE
    if not config.is_file():
        raise ImageTextLoadError(
            f"{path} has no {CONFIG_FILE}: an open_clip directory holds {CONFIG_FILE} "
            f"({{'model_cfg': ..., 'preprocess_cfg': ...}}) and {' or '.join(WEIGHT_FILES[:3])}"
        )
    try:
        data = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ImageTextLoadError(f"cannot read {config}: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("model_cfg"), dict):
        raise ImageTextLoadError(f"{config} has no 'model_cfg' object")
    weights = next((path / name for name in WEIGHT_FILES if (path / name).is_file()), None)
    if weights is None:
        raise ImageTextLoadError(
            f"{path} has {CONFIG_FILE} but no weights: expected one of {', '.join(WEIGHT_FILES)}"
        )
    return data["model_cfg"], data.get("preprocess_cfg") or {}, weights


def _builtin(architecture: str) -> dict:
    from open_clip.factory import get_model_config, list_models

    cfg = get_model_config(architecture)
    if cfg is None:
        vits = [name for name in list_models() if name.startswith("ViT-")]
        raise ImageTextLoadError(
            f"{architecture!r} is not a built-in open_clip architecture; ViT ones include "
            f"{', '.join(vits[:8])}, ..."
        )
    return copy.deepcopy(cfg)


def _refuse(cfg: dict, vision: dict, text: dict) -> None:
    if isinstance(vision.get("layers"), (list, tuple)):
        raise ImageTextLoadError(
            f"the image tower is a ResNet (ModifiedResNet, layers {vision['layers']}); vitlens "
            "supports Vision Transformer image towers only"
        )
    if "multimodal_cfg" in cfg:
        raise ImageTextLoadError("CoCa models (multimodal_cfg) are not supported")
    if vision.get("attentional_pool"):
        raise ImageTextLoadError("attentional pooling has no fixed readout row; not supported")
    if text.get("hf_model_name") or text.get("hf_tokenizer_name"):
        raise ImageTextLoadError(
            "Hugging Face text towers / tokenizers in open_clip configs are not supported; "
            "vitlens reads open_clip's TextTransformer with its bundled CLIP BPE"
        )
    if text.get("embed_cls"):
        raise ImageTextLoadError("text towers with an appended class token are not supported")
    if int(text.get("vocab_size", _BPE_VOCAB)) != _BPE_VOCAB:
        raise ImageTextLoadError(
            f"text vocab_size {text['vocab_size']} is not open_clip's CLIP BPE ({_BPE_VOCAB})"
        )


def _rebuild_timm_tower(visual: TimmModel, vision: dict, kwargs: dict, embed_dim: int) -> None:
    """Rebuild the trunk and head `TimmModel` made, with ``kwargs`` passed to ``timm.create_model``
    (what ``TimmModel.__init__`` does, for the projections it supports)."""
    pool, proj = vision.get("timm_pool", "avg"), vision.get("timm_proj", "linear")
    if pool in ("abs_attn", "rot_attn"):
        raise ImageTextLoadError(f"timm_pool {pool!r} (attention pooling) is not supported")
    name = vision["timm_model_name"]
    if proj not in ("linear", "mlp"):
        num_classes = 0 if proj == "none" else embed_dim  # the trunk's own head projects
        visual.trunk = timm.create_model(
            name, pretrained=False, num_classes=num_classes, global_pool=pool, **kwargs
        )
        return
    trunk = timm.create_model(name, pretrained=False, **kwargs)
    trunk.reset_classifier(0, **({"global_pool": pool} if pool else {}))
    width, bias = trunk.num_features, bool(vision.get("timm_proj_bias", False))
    drop = float(vision.get("timm_drop", 0.0))
    if proj == "linear":
        head = {"drop": nn.Dropout(drop), "proj": nn.Linear(width, embed_dim, bias=bias)}
    else:
        head = {"mlp": Mlp(width, 2 * embed_dim, embed_dim, drop=(drop, 0), bias=(True, bias))}
    visual.trunk, visual.head = trunk, nn.Sequential(OrderedDict(head))


def _image_tower(visual: nn.Module) -> tuple[TowerHooks, Tensor]:
    """Hooks and (N,) readout weights of an open_clip or timm ViT image tower."""
    if isinstance(visual, VisionTransformer):
        blocks = list(visual.transformer.resblocks)
        taps = [_mha_tap(block, "image") for block in blocks]
        pool = {"tok": "token", "avg": "avg"}.get(visual.pool_type)
        if pool is None or visual.attn_pool is not None:
            raise ImageTextLoadError(f"image pool_type {visual.pool_type!r} has no readout row")
        grid, prefix = tuple(visual.grid_size), 1
        lrp = None
        if pool == "token" and visual.proj is not None:
            lrp = open_clip_taps(blocks, visual.ln_post, lambda: visual.proj)
    elif isinstance(visual, TimmModel):
        trunk = visual.trunk
        if not all(hasattr(trunk, a) for a in ("blocks", "patch_embed", "num_prefix_tokens")):
            raise ImageTextLoadError(
                f"the timm image tower is a {type(trunk).__name__}, not a Vision Transformer; "
                "vitlens supports ViT image towers only (no ResNet or ConvNeXt)"
            )
        blocks = list(trunk.blocks)
        try:
            taps = [TimmAttentionTap(block.attn) for block in blocks]
        except (TypeError, AttributeError) as err:
            raise ImageTextLoadError(f"unsupported timm attention: {err}") from err
        pool = readout_kind(trunk)
        if pool not in ("token", "avg") or "pool" in visual.head._modules:
            raise ImageTextLoadError(f"timm pooling {pool!r} has no readout row; use token or avg")
        grid, prefix = tuple(trunk.patch_embed.grid_size), int(trunk.num_prefix_tokens)
        proj = getattr(visual.head, "proj", None)
        plain = isinstance(getattr(trunk, "fc_norm", nn.Identity()), nn.Identity)
        lrp = None
        if pool == "token" and plain and isinstance(proj, nn.Linear):
            lrp = timm_taps(blocks, trunk.norm, proj)
        if tuple(trunk.patch_embed.img_size) != tuple(visual.image_size):
            raise ImageTextLoadError(
                f"vision_cfg.image_size {tuple(visual.image_size)} but the timm tower takes "
                f"{tuple(trunk.patch_embed.img_size)}; set timm_model_kwargs.img_size"
            )
    else:
        raise ImageTextLoadError(
            f"the image tower is a {type(visual).__name__}; vitlens supports Vision Transformer "
            "image towers only (open_clip VisionTransformer or a timm ViT), no ResNet or ConvNeXt"
        )
    n = prefix + grid[0] * grid[1]
    heads = int(taps[0].attn.num_heads)
    graph = TowerGraph("image", len(blocks), heads, n, prefix, grid, False, pool)
    start = 0 if getattr(getattr(visual, "trunk", None), "pool_include_prefix", False) else prefix
    rows = readout_weights(n, 0) if pool == "token" else readout_weights(n, slice(start, n))
    return TowerHooks(graph, taps, lrp=lrp), rows


def _text_tower(text: nn.Module, pool_type: str) -> TowerHooks:
    """Hooks on the text transformer of a ``CLIP`` (top-level parts) or a ``TextTransformer``."""
    if not hasattr(text, "transformer") or not hasattr(text.transformer, "resblocks"):
        raise ImageTextLoadError(f"unsupported text tower {type(text).__name__}")
    readout = _TEXT_POOLS.get(pool_type)
    if readout is None:
        raise ImageTextLoadError(f"text pool_type {pool_type!r} has no readout row")
    blocks = list(text.transformer.resblocks)
    taps = [_mha_tap(block, "text") for block in blocks]
    causal = getattr(text, "attn_mask", None) is not None
    n = int(text.context_length)
    graph = TowerGraph(
        "text", len(blocks), int(taps[0].attn.num_heads), n, 0, None, causal, readout
    )
    lrp = None
    if readout == "eot" and hasattr(text, "ln_final") and text.text_projection is not None:
        lrp = open_clip_taps(blocks, text.ln_final, lambda: text.text_projection)
    return TowerHooks(graph, taps, inputs=getattr(text, "token_embedding", None), lrp=lrp)


def _mha_tap(block: nn.Module, tower: str) -> MultiheadAttentionTap:
    try:
        return MultiheadAttentionTap(block.attn)
    except TypeError as err:
        raise ImageTextLoadError(
            f"{tower} tower block {type(block).__name__}: {err}; open_clip's custom attention "
            "blocks (qk_norm, scaled_cosine_attn, scale_heads, scale_attn_inner) are not supported"
        ) from err


def _preprocess(visual: nn.Module, preprocess_cfg: dict) -> Preprocess:
    merged = merge_preprocess_dict(PreprocessCfg(), preprocess_cfg)
    h, w = tuple(visual.image_size)
    return Preprocess(
        input_size=(3, int(h), int(w)),
        mean=tuple(float(m) for m in merged["mean"]),
        std=tuple(float(s) for s in merged["std"]),
        interpolation=str(merged["interpolation"]),
        resize_mode=str(merged["resize_mode"]),
    )


def _to_custom_text(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """A ``CLIP`` state dict for a ``CustomTextCLIP``: text parts under ``text.``."""
    from open_clip.model import convert_to_custom_text_state_dict

    return convert_to_custom_text_state_dict(tensors)

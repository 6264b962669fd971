"""Build a timm Vision Transformer and load its weights without ever unpickling arbitrary code.

Weights come from a local file (safetensors, or a `torch.load(weights_only=True)` checkpoint),
from timm's pretrained cache when it is already on disk (never the network), or are a seeded
random initialisation, which `ModelInfo.weights.random` then reports.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from huggingface_hub import try_to_load_from_cache
from timm.data import ImageNetInfo, resolve_data_config
from torch import nn

from vitlens_server.models.spec import ModelSpec

__all__ = ["LoadedModel", "ModelGeometry", "ModelLoadError", "file_sha256", "load_model"]

log = logging.getLogger(__name__)

_STATE_DICT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")


class ModelLoadError(RuntimeError):
    """A model could not be built or its weights could not be loaded (a startup error)."""


@dataclass(frozen=True)
class ModelGeometry:
    """Shapes read from the model, never assumed (N = num_prefix_tokens + gh * gw)."""

    input_size: tuple[int, int, int]  # (C, H, W)
    patch_size: tuple[int, int]
    grid: tuple[int, int]  # (gh, gw)
    num_prefix_tokens: int
    readout: str  # how the head reads the tokens: "token", "distilled", "avg", or timm's pool name
    num_layers: int
    num_heads: int
    num_classes: int

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.grid[0] * self.grid[1]


@dataclass(frozen=True)
class WeightsInfo:
    source: str
    random: bool
    sha256: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass
class LoadedModel:
    """A model in eval mode on its device, with everything requests need to know about it."""

    spec: ModelSpec
    module: nn.Module
    geometry: ModelGeometry
    labels: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: WeightsInfo

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def device(self) -> torch.device:
        return torch.device(self.spec.device)


def load_model(spec: ModelSpec) -> LoadedModel:
    """Build ``spec.architecture`` with timm and load its weights.

    Raises:
        ModelLoadError: unknown architecture, unreadable or mismatched weights, missing cache.
    """
    if spec.detection:  # an object detector: its own loader
        from vitlens_server.models.detection_serving import load_detector

        return load_detector(spec)  # type: ignore[return-value]
    if spec.vqa:  # a visual question answering source: its own loader
        from vitlens_server.models.vqa_serving import load_vqa

        return load_vqa(spec)  # type: ignore[return-value]
    if spec.image_text:  # an image-text (CLIP) source: its own loader
        from vitlens_server.models.image_text_serving import load_image_text

        return load_image_text(spec)  # type: ignore[return-value]
    sidecar = _read_sidecar(spec.weights)
    kwargs = {**sidecar.get("model_kwargs", {}), **spec.model_kwargs}
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            module = timm.create_model(spec.architecture, pretrained=False, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ModelLoadError(f"unknown timm architecture {spec.architecture!r}") from err
        raise ModelLoadError(f"cannot build {spec.architecture!r}: {err}") from err
    except (TypeError, ValueError) as err:
        raise ModelLoadError(f"cannot build {spec.architecture!r}: {err}") from err

    weights = _load_weights(spec, module, sidecar)
    if spec.precision not in PRECISIONS:
        raise ModelLoadError(
            f"precision must be one of {', '.join(PRECISIONS)}; got {spec.precision!r}"
        )
    if spec.precision == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    module.eval().requires_grad_(False).to(spec.device)  # our copy: weights never train
    geometry = _read_geometry(module)
    data_cfg = resolve_data_config({}, model=module)
    mean = tuple(sidecar.get("mean", data_cfg["mean"]))
    std = tuple(sidecar.get("std", data_cfg["std"]))
    labels = _resolve_labels(spec, sidecar, geometry.num_classes)
    if weights.random:
        log.warning(
            "model %r has RANDOM weights: its predictions and explanations are meaningless",
            spec.name,
        )
    return LoadedModel(spec, module, geometry, labels, mean, std, weights)  # type: ignore[arg-type]


def _read_sidecar(weights: Path | None) -> dict[str, Any]:
    """Metadata stored next to a weights file as ``<weights>.json`` (optional)."""
    if weights is None:
        return {}
    path = weights.with_suffix(".json")
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"cannot read model metadata {path}: {err}") from err


def _load_weights(spec: ModelSpec, module: nn.Module, sidecar: Mapping[str, Any]) -> WeightsInfo:
    metadata = {str(k): str(v) for k, v in sidecar.get("metadata", {}).items()}
    metadata.update(spec.metadata)
    if spec.pretrained:
        path = cached_pretrained_file(module)
        _load_state_dict(module, read_state_dict(path), path, spec)
        return WeightsInfo("timm-cache", random=False, sha256=file_sha256(path), metadata=metadata)
    if spec.weights is None:
        return WeightsInfo("random", random=True, metadata=metadata)
    _load_state_dict(module, read_state_dict(spec.weights), spec.weights, spec)
    return WeightsInfo(
        spec.weights.name, random=False, sha256=file_sha256(spec.weights), metadata=metadata
    )


def _load_state_dict(
    module: nn.Module, state_dict: dict[str, torch.Tensor], path: Path, spec: ModelSpec
) -> None:
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ModelLoadError(
            f"weights {path} do not fit {spec.architecture!r} with "
            f"{dict(spec.model_kwargs) or 'default arguments'}: missing {_few(missing)}, "
            f"unexpected {_few(unexpected)}"
        )


def file_sha256(path: Path) -> str:
    """The SHA-256 of a weights file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cached_pretrained_file(module: nn.Module) -> Path:
    """The model's pretrained weights in the local Hugging Face or torch hub cache.

    Reads only the disk: vitlens never downloads weights.
    """
    cfg = getattr(module, "pretrained_cfg", {}) or {}
    tried = []
    if hub_id := cfg.get("hf_hub_id"):
        cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
            os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
        )
        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(hub_id, filename, cache_dir=cache)
            if isinstance(found, str):
                return Path(found)
        tried.append(f"Hugging Face cache {cache} (repo {hub_id})")
    if url := cfg.get("url"):
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if path.is_file():
            return path
        tried.append(str(path))
    raise ModelLoadError(
        f"pretrained weights for {cfg.get('architecture', type(module).__name__)!r} are not in "
        f"the local cache ({'; '.join(tried) or 'no pretrained source known'}) and vitlens never "
        "downloads them; pass a weights file instead"
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a weights-only torch checkpoint, on the CPU."""
    if not path.is_file():
        raise ModelLoadError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelLoadError(f"cannot read weights {path}: {err}") from err
    for key in _STATE_DICT_KEYS:
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if not isinstance(checkpoint, dict):
        raise ModelLoadError(f"{path} holds no state dict")
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


READOUTS = ("token", "distilled", "avg")
PRECISIONS = ("fp32", "tf32", "bf16")


def readout_kind(module: nn.Module) -> str:
    """How the classifier reads the final tokens.

    ``token``: the class token (ViT, DeiT, models with registers); ``distilled``: the mean of the
    class- and distillation-token heads (DeiT distilled at inference); ``avg``: the mean of the
    patch tokens (``global_pool='avg'``). Any other timm pool (e.g. ``map`` attention pooling) is
    returned by name and has no fixed readout row.
    """
    pool = getattr(module, "global_pool", "token") or "none"
    if pool == "token" and getattr(module, "head_dist", None) is not None:
        return "distilled"
    if pool == "token" and getattr(module, "cls_token", None) is None:
        return "none"
    return pool


def _read_geometry(module: nn.Module) -> ModelGeometry:
    blocks = getattr(module, "blocks", None)
    patch_embed = getattr(module, "patch_embed", None)
    if blocks is None or patch_embed is None or not hasattr(module, "num_prefix_tokens"):
        raise ModelLoadError(
            f"{type(module).__name__} is not a timm VisionTransformer-family model "
            "(needs blocks, patch_embed and num_prefix_tokens)"
        )
    img_size = tuple(patch_embed.img_size)
    in_chans = patch_embed.proj.in_channels
    return ModelGeometry(
        input_size=(in_chans, img_size[0], img_size[1]),
        readout=readout_kind(module),
        patch_size=tuple(patch_embed.patch_size),
        grid=tuple(patch_embed.grid_size),
        num_prefix_tokens=int(module.num_prefix_tokens),
        num_layers=len(blocks),
        num_heads=int(blocks[0].attn.num_heads),
        num_classes=int(module.num_classes),
    )


def _resolve_labels(
    spec: ModelSpec, sidecar: Mapping[str, Any], num_classes: int
) -> tuple[str, ...]:
    labels = spec.labels or sidecar.get("labels")
    if labels is None and num_classes == 1000:
        info = ImageNetInfo()
        labels = [info.index_to_description(i).split(",")[0] for i in range(num_classes)]
    if labels is None:
        labels = [f"class_{i}" for i in range(num_classes)]
    if len(labels) != num_classes:
        raise ModelLoadError(
            f"model {spec.name!r} has {num_classes} classes but {len(labels)} labels"
        )
    return tuple(labels)


def _few(keys: list[str], limit: int = 4) -> str:
    if not keys:
        return "none"
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)})"

"""Write the exemplar CLIP in open_clip's hub layout, and load it back with open_clip.

The directory holds ``open_clip_config.json`` (``{"model_cfg", "preprocess_cfg"}``),
``open_clip_model.safetensors`` (floating tensors stored as fp16; open_clip's loader copies them
into its fp32 model, so they come back widened) and ``vitlens.json`` (labels, prompt template,
training command, seeds, time and the held-out metrics recorded at export).
``open_clip.create_model_and_transforms("local-dir:DIR")`` loads it offline.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import save_file
from torch import nn

from vitlens_server.data.shapes import CLASSES
from vitlens_server.training.clip_eval import PROMPT_TEMPLATE
from vitlens_server.training.clip_model import MEAN, STD
from vitlens_server.training.train import _device_name

__all__ = ["CLIP_ASSET_DIR", "export_clip", "load_clip", "run_metadata"]

CLIP_ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "vitlens-clip"

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
METADATA_NAME = "vitlens.json"


def export_clip(
    model: nn.Module,
    directory: Path,
    *,
    model_cfg: Mapping[str, Any],
    metadata: Mapping[str, Any],
) -> None:
    """Write ``model`` (an open_clip CLIP built from ``model_cfg``) to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: (t.half() if t.is_floating_point() else t).detach().cpu().contiguous()
        for name, t in model.state_dict().items()
    }
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    config = {
        "model_cfg": dict(model_cfg),
        "preprocess_cfg": {
            "size": model_cfg["vision_cfg"]["image_size"],
            "mode": "RGB",
            "mean": list(MEAN),
            "std": list(STD),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    (directory / METADATA_NAME).write_text(json.dumps(dict(metadata), indent=2) + "\n")


def load_clip(directory: Path, device: str = "cpu"):
    """``(model in eval mode, preprocess, tokenizer, metadata)`` of an exported directory, via
    open_clip's own ``local-dir:`` loader (fp32 weights)."""
    name = f"local-dir:{directory}"
    model, _, preprocess = open_clip.create_model_and_transforms(name, device=device)
    metadata_path = directory / METADATA_NAME
    metadata = json.loads(metadata_path.read_text()) if metadata_path.is_file() else {}
    return model.eval(), preprocess, open_clip.get_tokenizer(name), metadata


def run_metadata(
    config: Any,
    command: str,
    precision: str,
    train_seconds: float,
    metrics: dict[str, float],
    curve: list[dict[str, Any]],
) -> dict[str, Any]:
    """``vitlens.json`` of a run of ``config`` (a `ClipTrainConfig`)."""
    return {
        "labels": list(CLASSES),
        "prompt_template": PROMPT_TEMPLATE,
        "mean": list(MEAN),
        "std": list(STD),
        "image_size": config.full_res,
        "weights_dtype": "float16 (open_clip's loader copies them into its float32 model)",
        "training_command": command,
        "seed": config.seed,
        "train_seeds": f"split 'train' (seeds 0 .. {config.total_steps * config.batch_size - 1})",
        "eval_seeds": f"split 'test' ({config.final_eval_count} scenes from seed 20000000)",
        "curve_seeds": "split 'val' (seeds from 10000000)",
        "image_tower_init": "vitlens-demo.safetensors (key mapping: clip_model.demo_to_open_clip)",
        "schedule": f"{config.low_res_steps} steps at {config.low_res}px + {config.full_res_steps}"
        f" at {config.full_res}px, batch {config.batch_size}, AdamW lr {config.lr} (image trunk "
        f"{config.visual_lr}, its position embedding {config.position_lr}, temperature "
        f"{config.logit_scale_lr}), wd {config.weight_decay}, "
        f"warmup {config.warmup_steps} + cosine; {config.two_object_fraction:.0%} two-object "
        f"scenes; {config.focus_shapes or 8} classes per batch, {config.canonical_fraction:.0%} "
        f"canonical captions; frozen: "
        + (
            f"patch/position embeddings, image blocks 0-{config.frozen_blocks - 1}, "
            if config.frozen_blocks
            else ""
        )
        + ("nothing" if config.train_token_embedding else "token embedding (random init)")
        + (
            f"; aux attribute head (clip_aux, weight {config.aux_weight}, dropped at export)"
            if getattr(config, "aux_weight", 0.0)
            else ""
        ),
        "steps": config.total_steps,
        "train_images": config.total_steps * config.batch_size,
        "train_seconds": round(train_seconds, 1),
        "device": _device_name(torch.device("cpu")),
        "precision": precision,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "eval_split": "test",
        "scenes": "crisp" if getattr(config, "crisp", False) else "free",
        "scene_config": "vitlens_server.data.captions.crisp_scene_config(image_size): colours from "
        "the named palette, separated sizes and positions (train and eval alike)"
        if getattr(config, "crisp", False)
        else "vitlens_server.data.SceneConfig(size=image_size)",
        "metrics": metrics,
        "curve": curve,
    }

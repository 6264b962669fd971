"""Tiny random image-text models written in the real on-disk formats, for the loader tests.

open_clip: ``open_clip_config.json`` + ``open_clip_model.safetensors`` (a 2-layer ViT on 32 px
images or a 2-block timm ViT tower; a 2-layer text tower with a 16-token context). Hugging Face:
``CLIPModel(CLIPConfig(...)).save_pretrained`` plus a ``CLIPTokenizer`` whose vocab.json and
merges.txt are built from open_clip's bundled ``bpe_simple_vocab_16e6.txt.gz`` (the OpenAI CLIP
BPE). Random weights are sharpened so attention is far from uniform.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

CONTEXT = 16
IMAGE = 32
VOCAB = 49408

VIT_CFG: dict[str, Any] = {
    "embed_dim": 24,
    "vision_cfg": {
        "image_size": IMAGE,
        "patch_size": 8,
        "width": 32,
        "layers": 2,
        "head_width": 16,
    },
    "text_cfg": {
        "context_length": CONTEXT,
        "vocab_size": VOCAB,
        "width": 32,
        "heads": 2,
        "layers": 2,
    },
}

TIMM_CFG: dict[str, Any] = {
    "embed_dim": 24,
    "vision_cfg": {
        "image_size": IMAGE,
        "timm_model_name": "vit_tiny_patch16_224",
        "timm_model_kwargs": {
            "img_size": IMAGE,
            "patch_size": 8,
            "embed_dim": 32,
            "depth": 2,
            "num_heads": 2,
        },
        "timm_pool": "token",
        "timm_proj": "linear",
    },
    "text_cfg": VIT_CFG["text_cfg"],
}

PREPROCESS = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bilinear"}


def sharpen(module: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw every weight (seeded) with enough scale that attention is peaked."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
            elif "logit_scale" in name:
                param.fill_(2.0)
            else:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    return module.eval()


def build_open_clip_module(model_cfg: dict[str, Any], seed: int = 0) -> nn.Module:
    """The open_clip model of ``model_cfg`` with sharpened random weights (vitlens' builder),
    the same for the same ``seed`` in every run (open_clip draws some 1-d parameters, such as
    the class embedding, from the global generator: seeded here too)."""
    from vitlens_server.models.image_text.open_clip_model import build_open_clip

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        module = build_open_clip(model_cfg)
    return sharpen(module, seed)


def write_open_clip_dir(
    path: Path,
    model_cfg: dict[str, Any],
    module: nn.Module,
    *,
    preprocess_cfg: dict[str, Any] | None = None,
    weights_name: str = "open_clip_model.safetensors",
) -> Path:
    """``path`` as open_clip's hub layout: the config json and the weights file."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or PREPROCESS}
    (path / "open_clip_config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    if weights_name.endswith(".safetensors"):
        save_file(state, str(path / weights_name))
    else:
        torch.save(state, path / weights_name)
    return path


def write_bpe_vocab(path: Path) -> None:
    """vocab.json and merges.txt of the OpenAI CLIP BPE, from open_clip's bundled merges."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe()) as file:
        merges = file.read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    alphabet = list(bytes_to_unicode().values())
    vocab = alphabet + [v + "</w>" for v in alphabet] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (path / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def hf_config():
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config={
            "vocab_size": VOCAB,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": CONTEXT,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": IMAGE,
            "patch_size": 8,
        },
        projection_dim=24,
    )


def write_hf_dir(path: Path, seed: int = 0, *, preprocessor: bool = True) -> Path:
    """A saved ``CLIPModel`` with its ``CLIPTokenizer`` (and a preprocessor config)."""
    from transformers import CLIPModel, CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    model = sharpen(CLIPModel(hf_config()), seed)
    model.save_pretrained(path)
    write_bpe_vocab(path)
    CLIPTokenizer.from_pretrained(path, local_files_only=True).save_pretrained(path)
    if preprocessor:
        pre = {
            "crop_size": {"height": IMAGE, "width": IMAGE},
            "size": {"shortest_edge": IMAGE},
            "image_mean": [0.5, 0.4, 0.3],
            "image_std": [0.2, 0.25, 0.3],
            "resample": 2,
            "do_center_crop": True,
        }
        (path / "preprocessor_config.json").write_text(json.dumps(pre))
    return path

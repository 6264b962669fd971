"""Hugging Face ``CLIPModel`` directories, loaded with ``local_files_only=True``.

A directory as ``CLIPModel.save_pretrained`` writes it (``config.json`` + ``model.safetensors``
or ``pytorch_model.bin``, read with ``weights_only=True``) plus the tokenizer files
(``tokenizer.json``, or ``vocab.json`` + ``merges.txt``) and, when present,
``preprocessor_config.json``. The model keeps the attention kernel transformers picks (SDPA);
recording does not depend on it. Both towers of a ``CLIPModel`` are Transformers: the image
tower reads its class token, the text tower its first end-of-text token (the id argmax for
configs with the pre-2023 ``eos_token_id`` 2).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from vitlens_server.models.image_text.base import (
    ImageTextLoadError,
    ImageTextModel,
    Preprocess,
    readout_weights,
)
from vitlens_server.models.image_text.hooks import HfClipAttentionTap, TowerHooks, causal_mask
from vitlens_server.models.image_text.lrp_taps import LrpTaps, hf_clip_taps
from vitlens_server.models.image_text.records import TowerGraph
from vitlens_server.models.image_text.tokenizer import HfBpeTokenizer

__all__ = ["HfClipModel", "load_hf_clip"]

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


class HfClipModel(ImageTextModel):
    """A transformers ``CLIPModel``."""

    def __init__(self, module: nn.Module, tokenizer, *, source: str, preprocess: Preprocess):
        vision, text = module.config.vision_config, module.config.text_config
        grid = vision.image_size // vision.patch_size
        image_graph = TowerGraph(
            "image",
            vision.num_hidden_layers,
            vision.num_attention_heads,
            1 + grid * grid,
            1,
            (grid, grid),
            False,
            "token",
        )
        context = int(text.max_position_embeddings)
        text_graph = TowerGraph(
            "text", text.num_hidden_layers, text.num_attention_heads, context, 0, None, True, "eot"
        )
        vision_model, text_model = module.vision_model, module.text_model
        image_hooks = _hooks(
            image_graph,
            vision_model.encoder.layers,
            lrp=hf_clip_taps(
                vision_model.encoder.layers, vision_model.post_layernorm, module.visual_projection
            ),
        )
        text_hooks = _hooks(
            text_graph,
            text_model.encoder.layers,
            inputs=text_model.embeddings.token_embedding,
            lrp=hf_clip_taps(
                text_model.encoder.layers, text_model.final_layer_norm, module.text_projection
            ),
        )
        self._eos_id = int(text.eos_token_id)
        super().__init__(
            module,
            source=source,
            tokenizer=HfBpeTokenizer(tokenizer, context),
            preprocess=preprocess,
            image_hooks=image_hooks,
            text_hooks=text_hooks,
            image_read_rows=readout_weights(image_graph.num_tokens, 0),
            embed_dim=int(module.config.projection_dim),
        )

    def _image_features(self, pixels: Tensor) -> Tensor:
        return _pooled(self.module.get_image_features(pixel_values=pixels))

    def _text_features(self, ids: Tensor, valid: Tensor | None) -> Tensor:
        rec = self._text_hooks.active
        if rec is not None:  # the mask CLIPTextModel applies: causal, and padding keys masked
            dtype = self.module.text_projection.weight.dtype
            mask = causal_mask(ids.shape[1], dtype=dtype, device=ids.device)
            if valid is not None:
                padding = torch.zeros(valid.shape, dtype=dtype, device=ids.device)
                padding = padding.masked_fill(~valid.bool(), float("-inf"))
                mask = mask + padding[:, None, None, :]  # (M, 1, L, L)
            rec.mask = mask
        attention_mask = None if valid is None else valid.long()
        return _pooled(self.module.get_text_features(input_ids=ids, attention_mask=attention_mask))

    def pooled_index(self, ids: Tensor) -> Tensor:
        if self._eos_id == 2:  # legacy configs: EOT is the highest id
            return ids.argmax(dim=-1)
        return (ids == self._eos_id).int().argmax(dim=-1)

    @property
    def logit_scale(self) -> Tensor:
        return self.module.logit_scale.reshape(())


def load_hf_clip(path: Path, *, device: str = "cpu") -> HfClipModel:
    """The ``CLIPModel`` in directory ``path``, with its tokenizer, on ``device``.

    Raises:
        ImageTextLoadError: a missing directory or file, a model type other than ``clip``,
            weights that do not load, a preprocessor config that disagrees with the model.
    """
    config = _read_config(path)
    if config.get("model_type") != "clip":
        raise ImageTextLoadError(
            f"{path / 'config.json'} has model_type {config.get('model_type')!r}; hf-clip loads "
            "CLIPModel directories (model_type 'clip') only"
        )
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ImageTextLoadError(f"{path} has no weights: expected {' or '.join(WEIGHT_FILES)}")
    if not any(all((path / f).is_file() for f in files) for files in TOKENIZER_FILES):
        raise ImageTextLoadError(
            f"{path} has no tokenizer: expected tokenizer.json, or vocab.json and merges.txt"
        )
    from transformers import CLIPModel, CLIPTokenizer

    try:
        module = CLIPModel.from_pretrained(
            path, local_files_only=True, weights_only=True, attn_implementation="sdpa"
        )
    except Exception as err:  # transformers raises OSError, ValueError, UnpicklingError...
        raise ImageTextLoadError(
            f"cannot load the CLIPModel in {path}: {err} (vitlens reads .bin weights with "
            "weights_only=True: a pickle holding other objects must be re-saved as safetensors)"
        ) from err
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:
        raise ImageTextLoadError(f"cannot load the CLIP tokenizer in {path}: {err}") from err
    module.eval().requires_grad_(False).to(device)
    preprocess = _preprocess(path, int(module.config.vision_config.image_size))
    return HfClipModel(module, tokenizer, source=f"hf-clip:{path}", preprocess=preprocess)


def _read_config(path: Path) -> dict:
    if not path.is_dir():
        raise ImageTextLoadError(f"Hugging Face CLIP directory {path} does not exist")
    file = path / "config.json"
    if not file.is_file():
        raise ImageTextLoadError(
            f"{path} has no config.json: a CLIPModel directory is what save_pretrained writes"
        )
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ImageTextLoadError(f"cannot read {file}: {err}") from err


def _preprocess(path: Path, image_size: int) -> Preprocess:
    """From ``preprocessor_config.json``; without one, CLIP's (OpenAI mean/std, bicubic)."""
    file = path / "preprocessor_config.json"
    cfg = json.loads(file.read_text()) if file.is_file() else {}
    crop = cfg.get("crop_size", image_size) if cfg.get("do_center_crop", True) else image_size
    crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
    if tuple(crop) != (image_size, image_size):
        raise ImageTextLoadError(
            f"{file} crops {crop} but the vision tower takes {image_size} x {image_size}"
        )
    size = cfg.get("size", {"shortest_edge": image_size})
    return Preprocess(
        input_size=(3, image_size, image_size),
        mean=tuple(float(m) for m in cfg.get("image_mean", _OPENAI_MEAN)),
        std=tuple(float(s) for s in cfg.get("image_std", _OPENAI_STD)),
        interpolation=_RESAMPLE.get(int(cfg.get("resample", 3)), "bicubic"),
        resize_mode="shortest" if isinstance(size, dict) and "shortest_edge" in size else "squash",
    )


def _hooks(
    graph: TowerGraph,
    layers: nn.ModuleList,
    *,
    inputs: nn.Module | None = None,
    lrp: LrpTaps | None = None,
) -> TowerHooks:
    taps = [HfClipAttentionTap(layer.self_attn) for layer in layers]
    return TowerHooks(graph, taps, inputs=inputs, lrp=lrp)


def _pooled(output) -> Tensor:
    """transformers 5 returns a model output whose ``pooler_output`` is projected; 4 a tensor."""
    return output if isinstance(output, Tensor) else output.pooler_output

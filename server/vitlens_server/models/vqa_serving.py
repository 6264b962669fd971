"""A visual question answering model as the server serves it: the adapter, its inputs, its answers.

Source syntax (``--model NAME=hf-vqa:DIR``): a Hugging Face ``save_pretrained`` directory of a
``ViltForQuestionAnswering``, ``VisualBertForQuestionAnswering`` or
``LxmertForQuestionAnswering`` (`vitlens_server.models.bimodal.load_bimodal_model` says which
files), with an optional ``vitlens.json``::

    {"answers": [...], "image_size": 384, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
     "frontend": {"kind": "vit_patch_tokens", "model": "vitlens-clip", "blocks": 5},
     "metadata": {...}}

Images are resized to ``image_size`` (square; default: the ViLT config's ``image_size``, 384 for
the released checkpoints) and normalised with ``mean``/``std`` (default 0.5: ViLT's processor).
Region models (VisualBERT, LXMERT) read detector regions: either the request carries them
(features and boxes per image), or the directory declares a ``frontend`` that makes them from
the pixels — a frozen ViT's patch tokens, one region per patch (`models.bimodal.frontend`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vitlens_server.imaging import normalise_pixels
from vitlens_server.models.bimodal import BimodalInputs, BimodalLoadError, BimodalModel
from vitlens_server.models.bimodal.frontend import PatchFrontEnd, load_clip_visual
from vitlens_server.models.bimodal.loading import load_bimodal_model
from vitlens_server.models.default import CLIP_DIR, CLIP_MODEL_NAME
from vitlens_server.models.loading import WeightsInfo, file_sha256
from vitlens_server.models.spec import ModelSpec

__all__ = ["HF_VQA", "SIDECAR", "LoadedVqaModel", "load_vqa", "vqa_directory"]

log = logging.getLogger(__name__)

HF_VQA = "hf-vqa"
SIDECAR = "vitlens.json"
_NORMALISATION = (0.5, 0.5, 0.5)  # ViLT's image processor
_FRONTENDS = {"vit_patch_tokens"}
_REGION_IMAGE_SIZE = 224  # models on request regions decode images only to check them


@dataclass
class LoadedVqaModel:
    """A loaded VQA model with what requests need to know about it.

    Attributes:
        spec: what was asked for (``spec.source`` names the directory).
        adapter: the `BimodalModel` (eval mode, weights frozen, recording hooks attached).
        frontend: the declared visual front-end turning pixels into regions, or None.
        image_size: the side images are resized to, px.
        mean, std: per-channel normalisation of pixels in [0, 1].
        weights: where the weights came from and their SHA-256.
    """

    spec: ModelSpec
    adapter: BimodalModel
    frontend: PatchFrontEnd | None
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: WeightsInfo

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def device(self) -> torch.device:
        return torch.device(self.spec.device)

    @property
    def labels(self) -> tuple[str, ...]:
        """The answer vocabulary."""
        return self.adapter.answers

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    @property
    def visual_input(self) -> str:
        """``"pixels"`` when the model reads the image itself (ViLT, or through its
        front-end), ``"regions"`` when requests must carry regions."""
        if self.adapter.visual_input == "pixels" or self.frontend is not None:
            return "pixels"
        return "regions"

    @property
    def patch_grid(self) -> tuple[int, int] | None:
        """The heatmap grid of pixel inputs: ViLT's patches, or the front-end's."""
        if self.frontend is not None:
            return tuple(self.frontend.visual.grid_size)  # type: ignore[return-value]
        if self.adapter.visual_input == "pixels":
            side = self.image_size // self.adapter.module.config.patch_size
            return (side, side)
        return None

    def normalise(self, pixels: Tensor) -> Tensor:
        """(B, 3, H, W) pixels in [0, 1] → the model's normalised input."""
        return normalise_pixels(pixels, self.mean, self.std)

    def inputs(
        self,
        questions: list[str],
        pixels: Tensor | None = None,
        regions: tuple[Tensor, Tensor] | None = None,
    ) -> BimodalInputs:
        """One batch: questions with (B, 3, S, S) pixels in [0, 1], or with (features (B, R, F),
        boxes (B, R, 4)) regions, on the model's device."""
        ids, mask, _ = self.adapter.tokenize(questions)
        device = self.adapter.device
        if regions is not None:
            features, boxes = (t.to(device) for t in regions)
            return BimodalInputs(ids, mask, regions=features, boxes=boxes)
        assert pixels is not None
        x = self.normalise(pixels.to(device))
        if self.frontend is None:
            return BimodalInputs(ids, mask, pixels=x)
        with torch.no_grad():
            features, boxes = self.frontend(x)
        return BimodalInputs(ids, mask, regions=features, boxes=boxes)


def vqa_directory(spec: ModelSpec) -> Path:
    """The directory of an ``hf-vqa:DIR`` source."""
    fmt, _, rest = (spec.source or "").partition(":")
    if fmt != HF_VQA or not rest:
        raise BimodalLoadError(f"VQA model source {spec.source!r} must be {HF_VQA}:DIR")
    return Path(rest)


def load_vqa(spec: ModelSpec) -> LoadedVqaModel:
    """Load an ``hf-vqa:DIR`` model, its sidecar and its front-end.

    Raises:
        BimodalLoadError: a file, a setting or the front-end is wrong; the message names it.
    """
    directory = vqa_directory(spec)
    sidecar = _sidecar(directory)
    adapter = load_bimodal_model(directory, device=spec.device)
    frontend = _frontend(directory, sidecar, spec.device)
    config = adapter.module.config
    if frontend is not None:
        default_size = int(frontend.visual.image_size[0])
    elif adapter.visual_input == "pixels":
        default_size = getattr(config, "image_size", None)
    else:  # request regions: the pixels are not read
        default_size = _REGION_IMAGE_SIZE
    image_size = sidecar.get("image_size", default_size)
    if not isinstance(image_size, int) or image_size < 1:
        raise BimodalLoadError(
            f"{directory / SIDECAR}: set 'image_size' (the side images are resized to, px)"
        )
    mean, std = (tuple(sidecar.get(k, _NORMALISATION)) for k in ("mean", "std"))
    if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
        raise BimodalLoadError(f"{directory / SIDECAR}: mean and std need 3 values, std > 0")
    described = {
        str(k): v if isinstance(v, str) else json.dumps(v)
        for k, v in (sidecar.get("metadata") or {}).items()
    }
    weights = WeightsInfo(
        source=str(spec.source),
        random=False,
        sha256=_sha256(directory / "model.safetensors"),
        metadata={**described, **spec.metadata},
    )
    return LoadedVqaModel(spec, adapter, frontend, image_size, mean, std, weights)  # type: ignore[arg-type]


def _frontend(directory: Path, sidecar: dict[str, Any], device: str) -> PatchFrontEnd | None:
    declared = sidecar.get("frontend")
    if declared is None:
        return None
    where = f"{directory / SIDECAR} 'frontend'"
    if not isinstance(declared, dict) or declared.get("kind") not in _FRONTENDS:
        raise BimodalLoadError(f"{where}: kind must be one of {sorted(_FRONTENDS)}")
    model = declared.get("model")
    tower = CLIP_DIR if model == CLIP_MODEL_NAME else directory / str(model)  # relative: to it
    if not (tower / "open_clip_config.json").is_file():
        raise BimodalLoadError(
            f"{where}: model {model!r} is not an open_clip directory (open_clip_config.json)"
        )
    blocks = declared.get("blocks", -1)
    try:
        frontend = PatchFrontEnd(load_clip_visual(tower), layer=int(blocks))
    except (ValueError, OSError) as err:
        raise BimodalLoadError(f"{where}: {err}") from err
    return frontend.to(device)


def _sidecar(directory: Path) -> dict[str, Any]:
    path = directory / SIDECAR
    if not path.is_file():
        return {}
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BimodalLoadError(f"cannot read {path}: {err}") from err
    if not isinstance(found, dict):
        raise BimodalLoadError(f"{path} must hold a JSON object")
    return found


def _sha256(path: Path) -> str:
    """`file_sha256`, or "" when there is no such file."""
    return file_sha256(path) if path.is_file() else ""

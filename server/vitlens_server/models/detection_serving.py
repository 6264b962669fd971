"""An object detector as the server serves it: the DETR adapter, its preprocessing, its weights.

Source syntax (``--model NAME=hf-detr:DIR``): a Hugging Face ``save_pretrained`` directory of a
`DetrForObjectDetection` (`vitlens_server.models.detection.load_detr` says which files), with an
optional ``preprocessor_config.json`` (input size, mean and std) and an optional ``vitlens.json``
whose ``metadata`` (how it was trained, its box mAP) GetModel shows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from vitlens_server.imaging import normalise_pixels
from vitlens_server.models.detection import (
    DetrDetector,
    DetrLoadError,
    Preprocessing,
    load_detr,
    preprocessing,
)
from vitlens_server.models.loading import WeightsInfo, file_sha256
from vitlens_server.models.spec import ModelSpec

__all__ = ["HF_DETR", "LoadedDetector", "detector_directory", "load_detector"]

HF_DETR = "hf-detr"
SIDECAR = "vitlens.json"


@dataclass
class LoadedDetector:
    """A loaded detector with what requests need to know about it.

    Attributes:
        spec: what was asked for (``spec.source`` names the directory).
        adapter: the `DetrDetector` (eval mode, weights frozen).
        preprocessing: the input size and normalisation.
        weights: where the weights came from and their SHA-256.
    """

    spec: ModelSpec
    adapter: DetrDetector
    preprocessing: Preprocessing
    weights: WeightsInfo

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def device(self) -> torch.device:
        return torch.device(self.spec.device)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.adapter.labels

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (3, self.preprocessing.height, self.preprocessing.width)

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.preprocessing.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self.preprocessing.std

    def normalise(self, pixels: Tensor) -> Tensor:
        """(B, 3, H, W) pixels in [0, 1] → the model's normalised input on its device."""
        pixels = pixels.to(self.adapter.device)
        return normalise_pixels(pixels, self.mean, self.std)


def detector_directory(spec: ModelSpec) -> Path:
    """The directory of an ``hf-detr:DIR`` source."""
    fmt, _, rest = (spec.source or "").partition(":")
    if fmt != HF_DETR or not rest:
        raise DetrLoadError(f"detector source {spec.source!r} must be {HF_DETR}:DIR")
    return Path(rest)


def load_detector(spec: ModelSpec) -> LoadedDetector:
    """Load an ``hf-detr:DIR`` model and its preprocessing.

    Raises:
        DetrLoadError: a file or a setting is wrong; the message names it.
    """
    directory = detector_directory(spec)
    adapter = load_detr(directory, device=spec.device)
    weights = WeightsInfo(
        source=str(spec.source),
        random=False,
        sha256=file_sha256(directory / "model.safetensors"),  # load_detr checked it is there
        metadata={**_metadata(directory), **spec.metadata},
    )
    return LoadedDetector(spec, adapter, preprocessing(directory), weights)


def _metadata(directory: Path) -> dict[str, str]:
    path = directory / SIDECAR
    if not path.is_file():
        return {}
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DetrLoadError(f"cannot read {path}: {err}") from err
    metadata = found.get("metadata") if isinstance(found, dict) else None
    if not isinstance(metadata, dict):
        return {}
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}

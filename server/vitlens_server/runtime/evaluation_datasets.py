"""The datasets of Evaluate runs, opened by the kind an evaluand scores.

    Datasets.images     labelled images (and masks) for image models: ``synthetic:N[:seed]
                        [:two_object]`` scenes, a ``server_path`` folder under an allowed root
                        (opened on the decode pool), or ``inline`` samples (decoded there)
    Datasets.questions  scenes with a generated question each for VQA models:
                        ``synthetic_vqa:N[:seed]`` (`evaluate.vqa_plan`)
    Datasets.detections images with every object's mask for detectors:
                        ``synthetic_detection:N[:seed]`` scenes, or a COCO instances folder
                        under an allowed root (`evaluate.detection_datasets`)

Each refuses the other's kinds by field, saying which kind the model takes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vitlens_server.config import ServerConfig
from vitlens_server.domain import ImageInput
from vitlens_server.errors import InvalidArgument, about, clip
from vitlens_server.evaluate import Sample, open_server_path, parse_synthetic
from vitlens_server.evaluate.detection_datasets import open_coco_folder, synthetic_detections
from vitlens_server.evaluate.detection_run import DetectionSample
from vitlens_server.evaluate.vqa_plan import (
    SYNTHETIC_VQA,
    SyntheticVqaDataset,
    parse_synthetic_vqa,
)
from vitlens_server.imaging import ImageDecoder, resize_pixels
from vitlens_server.runtime.api import EvaluateQuery, InlineSample

if TYPE_CHECKING:
    from vitlens_server.runtime.evaluation import ImageEvaluand

__all__ = ["Datasets"]


class Datasets:
    """Where an evaluand's dataset comes from: the request's ``dataset``, opened by kind.

    Args:
        config: the server's settings (dataset roots, pixel and inline limits).
        decode_pool: where inline images are decoded and server folders opened.
    """

    def __init__(self, config: ServerConfig, decode_pool: concurrent.futures.Executor) -> None:
        self._config = config
        self._roots = tuple(Path(r) for r in config.dataset_roots)
        self._decode_pool = decode_pool

    async def images(self, query: EvaluateQuery, evaluand: ImageEvaluand) -> Sequence[Sample]:
        """Labelled images (and masks): ``synthetic``, ``server_path`` or ``inline``."""
        loop = asyncio.get_running_loop()
        config = self._config
        if query.synthetic is not None:
            if query.synthetic.startswith(SYNTHETIC_VQA):
                raise InvalidArgument(
                    f"{SYNTHETIC_VQA} datasets (scenes with generated questions) are for visual "
                    f"question answering models; model {evaluand.name!r} is not one: use "
                    "synthetic:N[:seed][:two_object], server_path or inline",
                    field="dataset.synthetic",
                )
            with about("dataset.synthetic"):
                dataset: Sequence[Sample] = parse_synthetic(query.synthetic)
        elif query.server_path is not None:
            with about("dataset.server_path"):
                dataset = await loop.run_in_executor(
                    self._decode_pool,
                    functools.partial(
                        open_server_path,
                        query.server_path,
                        self._roots,
                        evaluand.labels,
                        max_pixels=config.max_pixels,
                    ),
                )
        elif query.inline is not None:
            _check_inline(query.inline, config.max_inline_samples, config.max_inline_bytes)
            decoder = ImageDecoder(evaluand.input_size, config.max_pixels)
            dataset = await loop.run_in_executor(
                self._decode_pool, _inline, query.inline, decoder, len(evaluand.labels)
            )
        else:
            raise _no_dataset()
        return _Limited(dataset, query.limit) if query.limit else dataset

    def questions(self, query: EvaluateQuery, model: str, size: int) -> SyntheticVqaDataset:
        """Scenes with a question each at ``size`` px: ``synthetic_vqa:N[:seed]`` only."""
        offer = f"{SYNTHETIC_VQA}:N[:seed] (held-out scenes with a generated question each)"
        for given, where in ((query.server_path, "server_path"), (query.inline, "inline")):
            if given is not None:
                raise InvalidArgument(
                    f"VQA model {model!r} is evaluated on questions about images, and "
                    f"dataset.{where} carries none: set dataset.synthetic to {offer}",
                    field=f"dataset.{where}",
                )
        if query.synthetic is None:
            raise _no_dataset()
        if not query.synthetic.startswith(f"{SYNTHETIC_VQA}:"):
            raise InvalidArgument(
                f"VQA model {model!r} is evaluated on questions about images, and "
                f"{clip(query.synthetic)} scenes carry none: use {offer}",
                field="dataset.synthetic",
            )
        return parse_synthetic_vqa(query.synthetic, size).limited(query.limit)

    async def detections(
        self, query: EvaluateQuery, model: str, labels: Sequence[str], size: tuple[int, int]
    ) -> Sequence[DetectionSample]:
        """Images with per-object masks: ``synthetic_detection:N[:seed]`` or a COCO folder."""
        if query.inline is not None:
            raise InvalidArgument(
                f"detector {model!r} is scored on every object of an image, and inline samples "
                "carry one mask each: use dataset.synthetic synthetic_detection:N[:seed] or a "
                "COCO folder in dataset.server_path",
                field="dataset.inline",
            )
        if query.synthetic is not None:
            found = synthetic_detections(query.synthetic, model, labels, size)
        elif query.server_path is not None:
            loop = asyncio.get_running_loop()
            opened = functools.partial(
                open_coco_folder, query.server_path, self._roots, labels,
                max_pixels=self._config.max_pixels,
            )  # fmt: skip
            with about("dataset.server_path"):
                found = await loop.run_in_executor(self._decode_pool, opened)
        else:
            raise _no_dataset()
        return _Limited(found, query.limit) if query.limit else found


def _no_dataset() -> InvalidArgument:
    return InvalidArgument(
        "dataset is empty: set synthetic, server_path or inline", field="dataset"
    )


class _Limited:
    """The first ``limit`` samples of a dataset."""

    def __init__(self, dataset: Sequence[Sample], limit: int) -> None:
        self._dataset, self._count = dataset, min(limit, len(dataset))

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self._count:
            raise IndexError(index)
        return self._dataset[index]


def _check_inline(samples: Sequence[InlineSample], max_samples: int, max_bytes: int) -> None:
    """The inline samples within the server's bounds, before any is decoded."""
    field = "dataset.inline.samples"
    if not samples:
        raise InvalidArgument("dataset.inline has no samples", field=field)
    if len(samples) > max_samples:
        raise InvalidArgument(
            f"dataset.inline has {len(samples)} samples; this server takes at most "
            f"{max_samples} inline (a larger set can be read from a --dataset-root folder)",
            field=field,
        )
    size = sum(_nbytes(s.image) + (0 if s.mask is None else s.mask.nbytes) for s in samples)
    if size > max_bytes:
        raise InvalidArgument(
            f"dataset.inline carries {size:,} bytes of images and masks; this server takes at "
            f"most {max_bytes:,} inline",
            field=field,
        )


def _nbytes(image: ImageInput) -> int:
    return image.pixels.nbytes if image.pixels is not None else len(image.encoded or b"")


def _inline(
    samples: Sequence[InlineSample], decoder: ImageDecoder, num_classes: int
) -> list[Sample]:
    """Inline samples as the runner reads them: (H, W, 3) float32 pixels at the model's input
    size (decoded once, resized as uploads are), masks (1, h, w) bool at the image's own size."""
    out = []
    for i, sample in enumerate(samples):
        where = f"dataset.inline.samples[{i}]"
        if not 0 <= sample.label < num_classes:
            raise InvalidArgument(
                f"{where}.label {sample.label} is not in 0..{num_classes - 1}",
                field=f"{where}.label",
            )
        raw = decoder.read(sample.image)  # (3, h, w)
        masks = None
        if sample.mask is not None:
            masks = _mask(sample.mask, tuple(raw.shape[1:]), f"{where}.mask")[None]
        image = resize_pixels(raw, decoder.size).permute(1, 2, 0).numpy()  # (H, W, 3)
        out.append(Sample(sample.image.id or f"sample_{i}", image, (sample.label,), masks))
    if any(s.masks is None for s in out) and any(s.masks is not None for s in out):
        raise InvalidArgument(
            "give a mask for every inline sample or for none", field="dataset.inline.samples"
        )
    return out


def _mask(mask: np.ndarray, size: tuple[int, int], where: str) -> np.ndarray:
    """An inline mask as (h, w) bool, nonzero on the object; it must match its image's size."""
    if mask.ndim != 2 or tuple(mask.shape) != size:
        raise InvalidArgument(
            f"{where} has shape {tuple(mask.shape)[:8]}; it must be the image's (H, W) = {size}",
            field=where,
        )
    if mask.dtype.kind == "f" and not np.isfinite(mask).all():
        raise InvalidArgument(f"{where} holds NaN or infinite values", field=where)
    return mask != 0

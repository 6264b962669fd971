"""Export of the exemplar detector: the Hugging Face directory users' DETR checkpoints come in.

Files: ``config.json`` and ``model.safetensors`` (float16; the server loads them into float32)
from ``save_pretrained``; ``preprocessor_config.json``, the image processor's settings
(``DetrImageProcessor`` reads it: resize to 224 x 224, the demo's mean and std, no padding);
and ``vitlens.json``, the training record::

    {"task": "object_detection", "image_size": 224, "metadata": {command, time, box mAP}}
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from transformers import DetrForObjectDetection

from vitlens_server.training.detr_model import IMAGE_SIZE, MEAN, STD

__all__ = ["SIDECAR", "export_detr", "preprocessor_config"]

SIDECAR = "vitlens.json"


def preprocessor_config(size: int = IMAGE_SIZE) -> dict[str, Any]:
    """``preprocessor_config.json`` of the exemplar: a fixed square resize, no padding."""
    return {
        "image_processor_type": "DetrImageProcessor",
        "format": "coco_detection",
        "do_resize": True,
        "size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(MEAN),
        "image_std": list(STD),
        "do_pad": False,
        "do_convert_annotations": True,
    }


def export_detr(model: DetrForObjectDetection, directory: Path, metadata: dict[str, Any]) -> None:
    """Write ``model`` to ``directory`` (created; its files replaced)."""
    directory.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(model).cpu().half().save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_config(), indent=2) + "\n"
    )
    sidecar = {
        "task": "object_detection",
        "image_size": IMAGE_SIZE,
        "weights_dtype": "float16 (loaded into float32)",
        "metadata": metadata,
    }
    (directory / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")

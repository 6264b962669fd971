"""The models that ship with the server, servable by name: ``vitlens serve --model NAME``.

``vitlens-demo``, the default model (served when ``vitlens serve`` is given no model), is a timm
classifier whose weights ship in ``assets/`` (written by ``vitlens train-demo``). Without that file
it falls back to seeded random weights, and the server says so in its log and in ``GetModel``
(``weights.random``).

``vitlens-clip``, the exemplar image-text (CLIP) model trained on the same scenes, ships as an
open_clip hub directory in ``assets/vitlens-clip/``; it is served only when named (the default
list stays ``vitlens-demo``, so start-up is not slower). A missing file is an error naming it.

The exemplar VQA models (``vitlens-visualbert``, single stream; ``vitlens-lxmert``, two stream)
are Hugging Face directories in ``assets/vitlens-<arch>/`` (`VQA_FILES`), served when named, as
the CLIP is. No ViLT exemplar ships (none reached the accuracy target); ``vitlens-vilt`` serves
one that ``vqa_train --arch vilt`` exported there.

The exemplar detector, ``vitlens-detr`` (a small DETR on the demo ViT's trunk, trained on scenes
of one to four objects), is a Hugging Face directory in ``assets/vitlens-detr/`` (`DETR_FILES`),
served when named.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path

from vitlens_server.models.spec import ModelSpec

__all__ = [
    "BUILTIN_MODELS",
    "CLIP_DIR",
    "CLIP_FILES",
    "CLIP_MODEL_NAME",
    "DEMO_LABELS",
    "DEMO_MODEL_NAME",
    "DEMO_WEIGHTS",
    "DETR_FILES",
    "DETR_MODEL_NAME",
    "LXMERT_MODEL_NAME",
    "SHIPPED_FOLDERS",
    "VILT_MODEL_NAME",
    "VISUALBERT_MODEL_NAME",
    "VQA_FILES",
    "builtin_spec",
    "clip_spec",
    "demo_spec",
    "detr_spec",
    "vqa_spec",
]

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEMO_WEIGHTS = ASSETS / "vitlens-demo.safetensors"

DEMO_MODEL_NAME = "vitlens-demo"

# The object classes of vitlens' generated scenes, as the shipped weights' sidecar names them
# (read here rather than from `vitlens_server.data`: models never import the scene generator).
DEMO_LABELS: tuple[str, ...] = tuple(
    json.loads(DEMO_WEIGHTS.with_suffix(".json").read_text())["labels"]
)

# A ViT-Tiny/16 at half depth: 224 px input, 14 x 14 patch grid, 6 blocks x 3 heads, 2.9 M params.
DEMO_ARCHITECTURE = "vit_tiny_patch16_224"
DEMO_KWARGS = {"depth": 6, "num_classes": len(DEMO_LABELS)}


def demo_spec(device: str = "cpu", weights: Path | None = DEMO_WEIGHTS) -> ModelSpec:
    """Spec of the default model on ``device``; random weights if ``weights`` is missing."""
    if weights is not None and weights.is_file():
        return ModelSpec(
            name=DEMO_MODEL_NAME,
            architecture=DEMO_ARCHITECTURE,
            weights=weights,
            labels=DEMO_LABELS,
            model_kwargs=DEMO_KWARGS,
            device=device,
        )
    return ModelSpec(
        name=DEMO_MODEL_NAME,
        architecture=DEMO_ARCHITECTURE,
        labels=DEMO_LABELS,
        model_kwargs=DEMO_KWARGS,
        device=device,
        metadata={"note": f"random initialisation (seed 0): {weights} is missing"},
    )


CLIP_MODEL_NAME = "vitlens-clip"
CLIP_DIR = ASSETS / "vitlens-clip"
# The exemplar's files: open_clip's hub layout, and vitlens.json (labels, prompt template).
CLIP_FILES = ("open_clip_config.json", "open_clip_model.safetensors", "vitlens.json")


def clip_spec(device: str = "cpu", directory: Path = CLIP_DIR) -> ModelSpec:
    """Spec of the exemplar CLIP (an ``open_clip:DIR`` source) on ``device``.

    Labels and the prompt template come from the directory's ``vitlens.json``, as for any
    open_clip directory.

    Raises:
        FileNotFoundError: one of `CLIP_FILES` is missing; the message names it.
    """
    for name in CLIP_FILES:
        if not (directory / name).is_file():
            raise FileNotFoundError(
                f"model {CLIP_MODEL_NAME!r}: {directory / name} is missing (the exemplar ships "
                f"in the vitlens-server package: reinstall it, or serve another CLIP with "
                f"--model NAME=open_clip:DIR)"
            )
    return ModelSpec(
        name=CLIP_MODEL_NAME,
        architecture="open_clip",
        source=f"open_clip:{directory}",
        device=device,
    )


VILT_MODEL_NAME = "vitlens-vilt"
VISUALBERT_MODEL_NAME = "vitlens-visualbert"
LXMERT_MODEL_NAME = "vitlens-lxmert"
# The exemplar VQA models' files: save_pretrained's, the question vocabulary, vitlens.json.
VQA_FILES = ("config.json", "model.safetensors", "vocab.txt", "vitlens.json")


def vqa_spec(name: str, device: str = "cpu", directory: Path | None = None) -> ModelSpec:
    """Spec of an exemplar VQA model (an ``hf-vqa:DIR`` source) on ``device``.

    Raises:
        FileNotFoundError: one of `VQA_FILES` is missing; the message names it and how to
            make it.
    """
    directory = directory or ASSETS / name
    arch = name.removeprefix("vitlens-")
    for file in VQA_FILES:
        if not (directory / file).is_file():
            raise FileNotFoundError(
                f"model {name!r}: {directory / file} is missing (train and export the exemplar "
                f"with python -m vitlens_server.training.vqa_train --arch {arch}, or serve "
                f"another model with --model NAME=hf-vqa:DIR)"
            )
    return ModelSpec(name=name, architecture="hf-vqa", source=f"hf-vqa:{directory}", device=device)


DETR_MODEL_NAME = "vitlens-detr"
# The exemplar detector's files: save_pretrained's, the image processor's, vitlens.json.
DETR_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "vitlens.json")


def detr_spec(device: str = "cpu", directory: Path | None = None) -> ModelSpec:
    """Spec of the exemplar detector (an ``hf-detr:DIR`` source) on ``device``.

    Raises:
        FileNotFoundError: one of `DETR_FILES` is missing; the message names it and how to
            make it.
    """
    directory = directory or ASSETS / DETR_MODEL_NAME
    for file in DETR_FILES:
        if not (directory / file).is_file():
            raise FileNotFoundError(
                f"model {DETR_MODEL_NAME!r}: {directory / file} is missing (train and export the "
                "exemplar with python -m vitlens_server.training.detr_train, or serve another "
                "detector with --model NAME=hf-detr:DIR)"
            )
    return ModelSpec(
        name=DETR_MODEL_NAME, architecture="hf-detr", source=f"hf-detr:{directory}", device=device
    )


# The model folders that ship in assets/, with the files each must hold (the packaging test
# checks every folder there is listed and wheels carry them).
SHIPPED_FOLDERS: Mapping[str, tuple[str, ...]] = {
    CLIP_MODEL_NAME: CLIP_FILES,
    VISUALBERT_MODEL_NAME: VQA_FILES,
    LXMERT_MODEL_NAME: VQA_FILES,
    DETR_MODEL_NAME: DETR_FILES,
}

# The models servable by name alone; each builds its spec for a device.
BUILTIN_MODELS: Mapping[str, Callable[[str], ModelSpec]] = {
    DEMO_MODEL_NAME: demo_spec,
    CLIP_MODEL_NAME: clip_spec,
    VILT_MODEL_NAME: lambda device: vqa_spec(VILT_MODEL_NAME, device),
    VISUALBERT_MODEL_NAME: lambda device: vqa_spec(VISUALBERT_MODEL_NAME, device),
    LXMERT_MODEL_NAME: lambda device: vqa_spec(LXMERT_MODEL_NAME, device),
    DETR_MODEL_NAME: detr_spec,
}


def builtin_spec(name: str, device: str, precision: str = "fp32") -> ModelSpec | None:
    """The spec of a model that ships with the server (`BUILTIN_MODELS`); None for other names.

    Raises:
        FileNotFoundError: the model's files are missing.
    """
    build = BUILTIN_MODELS.get(name)
    return None if build is None else dataclasses.replace(build(device), precision=precision)

"""Export of an exemplar VQA model: a Hugging Face directory vitlens serves as it is.

Files: ``config.json`` and ``model.safetensors`` (float16; `load_exported` and the server load
them into float32) from ``save_pretrained``, ``vocab.txt`` (the question vocabulary, one token
per line, [PAD] first) and ``vitlens.json``::

    {"task": "visual_question_answering", "answers": [...], "image_size": 160,
     "mean": [...], "std": [...], "visual_input": "pixels" | "regions",
     "frontend": {"kind": "vit_patch_tokens", "model": "vitlens-clip", "blocks": 5},
     "metadata": {how it was trained, its held-out accuracy}}

``frontend`` (the region models, VisualBERT and LXMERT) declares where region features come
from: the patch tokens after ``blocks`` blocks of the shipped exemplar CLIP's image tower, one
region per patch.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    BertTokenizer,
    LxmertForQuestionAnswering,
    ViltForQuestionAnswering,
    VisualBertForQuestionAnswering,
)

from vitlens_server.data.questions import ANSWERS, vocab_lines
from vitlens_server.models.bimodal.frontend import PatchFrontEnd, load_clip_visual
from vitlens_server.models.default import CLIP_DIR
from vitlens_server.training.vqa_net import MEAN, STD, VqaNet

__all__ = ["SIDECAR", "export_vqa", "load_exported"]

SIDECAR = "vitlens.json"
# config.json's model_type → the exemplar's architecture name (`vqa_net.ARCHS`) and class.
_CLASSES = {
    "vilt": ("vilt", ViltForQuestionAnswering),
    "visual_bert": ("visualbert", VisualBertForQuestionAnswering),
    "lxmert": ("lxmert", LxmertForQuestionAnswering),
}


def export_vqa(net: VqaNet, directory: Path, metadata: dict[str, Any]) -> None:
    """Write ``net`` to ``directory`` (created; its files replaced)."""
    directory.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(net.model).cpu().half().save_pretrained(directory)
    (directory / "vocab.txt").write_text("\n".join(vocab_lines()) + "\n")
    sidecar: dict[str, Any] = {
        "task": "visual_question_answering",
        "answers": list(ANSWERS),
        "image_size": int(metadata["config"]["image_size"]),
        "mean": list(MEAN),
        "std": list(STD),
        "visual_input": "pixels" if net.frontend is None else "regions",
    }
    if net.frontend is not None:
        sidecar["frontend"] = {
            "kind": "vit_patch_tokens",
            "model": CLIP_DIR.name,
            "blocks": net.frontend.blocks,
        }
    sidecar["weights_dtype"] = "float16 (loaded into float32)"
    sidecar["metadata"] = metadata
    (directory / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")


def load_exported(directory: str | Path) -> tuple[VqaNet, int]:
    """An exported exemplar as a `VqaNet` (float32, eval mode) and its image side in px."""
    directory = Path(directory)
    sidecar = json.loads((directory / SIDECAR).read_text())
    model_type = AutoConfig.from_pretrained(directory).model_type
    if model_type not in _CLASSES:
        raise ValueError(f"{directory}/config.json: model_type {model_type!r} is not an exemplar")
    arch, model_class = _CLASSES[model_type]
    model = model_class.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
    tokenizer = BertTokenizer(vocab=str(directory / "vocab.txt"), do_lower_case=True)
    frontend = None
    if "frontend" in sidecar:
        frontend = PatchFrontEnd(load_clip_visual(), layer=int(sidecar["frontend"]["blocks"]))
    return VqaNet(arch, model, tokenizer, frontend).eval(), int(sidecar["image_size"])

"""Bi-modal VQA models (ViLT, VisualBERT, LXMERT) from local Hugging Face directories.

`load_bimodal_model` reads a ``save_pretrained`` directory and returns a `BimodalModel`: answer
logits for a batch of questions with images (`BimodalInputs`), tokenization, the model's
attention graph (seed 003 §3.2: single stream or two stream), recording of every declared
attention map during a forward pass (`BimodalModel.record`, `BimodalRecording`), the batch's
token bookkeeping (`BimodalTokens`) and the readout of the engine's relevance into text and
image parts (`BimodalModel.readout`).

Nothing here imports torch or transformers until a name is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "BimodalInputs",
    "BimodalLoadError",
    "BimodalModel",
    "BimodalRecording",
    "BimodalTokens",
    "LxmertAdapter",
    "ViltAdapter",
    "VisualBertAdapter",
    "load_bimodal_model",
    "single_stream_graph",
    "two_stream_graph",
]

_LAZY = {
    "BimodalInputs": "base",
    "BimodalLoadError": "base",
    "BimodalModel": "base",
    "BimodalRecording": "records",
    "BimodalTokens": "records",
    "LxmertAdapter": "lxmert",
    "ViltAdapter": "vilt",
    "VisualBertAdapter": "visual_bert",
    "load_bimodal_model": "loading",
    "single_stream_graph": "graphs",
    "two_stream_graph": "graphs",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
    return getattr(module, name)

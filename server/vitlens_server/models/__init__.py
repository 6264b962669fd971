"""Model specs, weight loading and the registry of loaded models.

`ModelSpec` (and `models.default`) never import torch; the rest loads on first use, so the
settings and the RPC layer can name models without pulling in torch and timm.
"""

from __future__ import annotations

import importlib
from typing import Any

from vitlens_server.models.spec import ModelSpec

__all__ = ["LoadedModel", "ModelGeometry", "ModelRegistry", "ModelSpec", "load_model"]

_LAZY = {
    "LoadedModel": "vitlens_server.models.loading",
    "ModelGeometry": "vitlens_server.models.loading",
    "load_model": "vitlens_server.models.loading",
    "ModelRegistry": "vitlens_server.models.registry",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)

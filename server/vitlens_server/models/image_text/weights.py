"""Read checkpoint tensors without unpickling arbitrary objects, and load them strictly."""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from vitlens_server.models.image_text.base import ImageTextLoadError

__all__ = ["load_strict", "read_tensors"]

_NESTED_KEYS = ("state_dict", "model", "state_dict_ema")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file or a ``torch.load(weights_only=True)`` checkpoint.

    A checkpoint wrapped as ``{"state_dict": ...}`` (open_clip's training checkpoints) is
    unwrapped and a DistributedDataParallel ``module.`` prefix dropped.

    Raises:
        ImageTextLoadError: the file is missing, unreadable, a pickle holding more than tensors
            (which vitlens never unpickles), a TorchScript archive, or holds no tensors.
    """
    if not path.is_file():
        raise ImageTextLoadError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            checkpoint = load_file(str(path), device="cpu")
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ImageTextLoadError(
            f"{path} is a pickle that torch.load(weights_only=True) refuses: it holds objects "
            "other than tensors, and vitlens never unpickles arbitrary code. Re-save its state "
            "dict as safetensors (safetensors.torch.save_file(model.state_dict(), ...)) or with "
            f"torch.save(model.state_dict(), ...). ({str(err).splitlines()[0]})"
        ) from err
    except (RuntimeError, OSError, ValueError, zipfile.BadZipFile) as err:
        hint = (
            " (a TorchScript archive, e.g. OpenAI's original .pt? convert it to a state dict)"
            if "constants.pkl" in str(err) or "TorchScript" in str(err)
            else ""
        )
        raise ImageTextLoadError(f"cannot read weights {path}: {err}{hint}") from err
    for key in _NESTED_KEYS:
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise ImageTextLoadError(f"{path} holds no state dict")
    tensors = {str(k).removeprefix("module."): v for k, v in checkpoint.items()}
    not_tensors = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ImageTextLoadError(f"{path}: entries that are not tensors: {_few(not_tensors)}")
    return tensors


def load_strict(
    module: nn.Module, tensors: Mapping[str, torch.Tensor], path: Path, what: str
) -> None:
    """``module.load_state_dict(tensors)``, every key and shape matching, as float32 weights.

    Raises:
        ImageTextLoadError: naming the missing, unexpected and mis-shaped keys.
    """
    own = module.state_dict()
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in tensors.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    if wrong or missing or unexpected:
        raise ImageTextLoadError(
            f"weights {path} do not fit {what}: missing {_few(missing)}, unexpected "
            f"{_few(unexpected)}, shapes (checkpoint vs model) {_few(wrong)}; check that the "
            "configuration is the one the checkpoint was trained with"
        )
    floats = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    module.load_state_dict(floats, strict=True)


def _few(keys: list[str], limit: int = 4) -> str:
    if not keys:
        return "none"
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)})"

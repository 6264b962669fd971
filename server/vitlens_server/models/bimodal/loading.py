"""Load a Hugging Face bi-modal VQA model directory: ViLT, VisualBERT or LXMERT.

A directory as ``save_pretrained`` writes it:

``config.json``
    ``model_type`` ``vilt``, ``visual_bert`` or ``lxmert`` picks the adapter.
``model.safetensors`` (or sharded: ``model.safetensors.index.json`` + its shards)
    the weights, with the answer head. ``pytorch_model.bin`` (a pickle) is refused.
``vocab.txt`` or ``tokenizer.json``
    the BERT WordPiece tokenizer (``tokenizer_config.json``'s ``do_lower_case`` is honoured).
``vitlens.json`` (optional)
    ``{"answers": [...]}``, the answer of each logit; without it ``config.json``'s
    ``id2label``. LXMERT's head has ``num_qa_labels`` logits and ignores ``id2label``, so the
    two must agree.

The model is loaded with ``attn_implementation="eager"`` (all three compute attention in
Python; the masks are only right in eager mode), in float32, in eval mode, weights frozen.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch

from vitlens_server.models.bimodal.base import BimodalLoadError, BimodalModel

__all__ = ["MODEL_TYPES", "load_bimodal_model", "load_tokenizer"]

# model_type → (transformers class, adapter module, adapter class)
MODEL_TYPES: dict[str, tuple[str, str, str]] = {
    "vilt": ("ViltForQuestionAnswering", "vilt", "ViltAdapter"),
    "visual_bert": ("VisualBertForQuestionAnswering", "visual_bert", "VisualBertAdapter"),
    "lxmert": ("LxmertForQuestionAnswering", "lxmert", "LxmertAdapter"),
}
SIDECAR = "vitlens.json"
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def load_bimodal_model(directory: str | Path, device: str = "cpu") -> BimodalModel:
    """The adapter of the VQA model saved in ``directory``, on ``device``. Local files only.

    Raises:
        BimodalLoadError: a missing or unreadable file, an unknown ``model_type``, pickled
            weights, weights without the answer head, or answers that do not match the head;
            the message names the file or setting to fix.
    """
    import transformers

    path = Path(directory)
    config = _read_json(path, "config.json", what="a save_pretrained model directory")
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise BimodalLoadError(
            f"{path / 'config.json'} has model_type {model_type!r}; bi-modal models are "
            f"{', '.join(MODEL_TYPES)}"
        )
    _check_weights(path)
    vocab_size = config.get("vocab_size")
    tokenizer = load_tokenizer(path, vocab_size=vocab_size if isinstance(vocab_size, int) else None)
    class_name, module_name, adapter_name = MODEL_TYPES[model_type]
    adapter = getattr(
        importlib.import_module(f"vitlens_server.models.bimodal.{module_name}"), adapter_name
    )
    module = _load_module(getattr(transformers, class_name), path)
    answers = _answers(path, module.config, adapter.head_size(module), model_type)
    module.eval().requires_grad_(False).to(device)
    return adapter(module, tokenizer=tokenizer, answers=answers, source=f"{model_type}:{path}")


def load_tokenizer(path: Path, *, vocab_size: int | None = None) -> Any:
    """The ``BertTokenizer`` of ``path``: ``tokenizer.json``, else ``vocab.txt``.

    (transformers 5 ignores ``BertTokenizer(vocab_file=...)``: the vocabulary goes in
    ``vocab=``.) ``vocab_size``: the model's; every token id must be below it.

    Raises:
        BimodalLoadError: no tokenizer file, an unreadable one, or a vocabulary that does not
            fit the model.
    """
    from transformers import BertTokenizer

    try:
        if (path / "tokenizer.json").is_file():
            tokenizer = BertTokenizer.from_pretrained(path, local_files_only=True)
            file = path / "tokenizer.json"
        elif (path / "vocab.txt").is_file():
            file = path / "vocab.txt"
            settings = {}
            if (path / "tokenizer_config.json").is_file():
                settings = _read_json(path, "tokenizer_config.json", what="")
            lower = bool(settings.get("do_lower_case", True))
            tokenizer = BertTokenizer(vocab=str(file), do_lower_case=lower)
        else:
            raise BimodalLoadError(
                f"{path} has no tokenizer: expected vocab.txt or tokenizer.json (BERT WordPiece)"
            )
    except BimodalLoadError:
        raise
    except Exception as err:  # tokenizers raises Exception subclasses of its own
        raise BimodalLoadError(f"cannot load the BERT tokenizer in {path}: {err}") from err
    for name in ("cls_token", "sep_token", "pad_token"):
        token = getattr(tokenizer, name)
        if token is None or tokenizer.convert_tokens_to_ids(token) == tokenizer.unk_token_id:
            raise BimodalLoadError(f"{file} has no {name} ({token!r}) in its vocabulary")
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise BimodalLoadError(
            f"{file} has {len(tokenizer)} tokens but config.json's vocab_size is {vocab_size}"
        )
    return tokenizer


def _read_json(path: Path, name: str, *, what: str) -> dict[str, Any]:
    if not path.is_dir():
        raise BimodalLoadError(f"bi-modal model directory {path} does not exist")
    file = path / name
    if not file.is_file():
        raise BimodalLoadError(f"{path} has no {name}" + (f": {what} needs one" if what else ""))
    try:
        found = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BimodalLoadError(f"cannot read {file}: {err}") from err
    if not isinstance(found, dict):
        raise BimodalLoadError(f"{file} must hold a JSON object")
    return found


def _check_weights(path: Path) -> None:
    if any((path / name).is_file() for name in WEIGHTS):
        return
    pickled = [name for name in PICKLED if (path / name).is_file()]
    if pickled:
        raise BimodalLoadError(
            f"{path / pickled[0]} is a pickle, which vitlens never loads; convert it to "
            "model.safetensors (load it once where you trust it, then "
            "model.save_pretrained(dir, safe_serialization=True))"
        )
    raise BimodalLoadError(f"{path} has no weights: expected {' or '.join(WEIGHTS)}")


def _load_module(cls: type, path: Path) -> torch.nn.Module:
    try:
        module, info = cls.from_pretrained(
            path,
            local_files_only=True,
            use_safetensors=True,
            attn_implementation="eager",
            dtype=torch.float32,
            output_loading_info=True,
        )
    except Exception as err:  # transformers raises OSError, ValueError, RuntimeError...
        raise BimodalLoadError(
            f"cannot load the {cls.__name__} in {path} (config.json + model.safetensors): {err}"
        ) from err
    if module.config._attn_implementation != "eager":
        raise BimodalLoadError(
            f"{path / 'config.json'}: attention implementation "
            f"{module.config._attn_implementation!r}; vitlens needs 'eager'"
        )
    missing = sorted(info.get("missing_keys", ()))
    if missing:
        shown = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
        raise BimodalLoadError(
            f"{path / 'model.safetensors'} lacks weights of {cls.__name__} ({shown}): is it a "
            "VQA checkpoint with its answer head?"
        )
    return module


def _answers(path: Path, config: Any, head_size: int, model_type: str) -> tuple[str, ...]:
    """The answer of each logit: ``vitlens.json`` "answers", else config.json ``id2label``."""
    head = "num_qa_labels" if model_type == "lxmert" else "num_labels"
    sidecar = _read_json(path, SIDECAR, what="") if (path / SIDECAR).is_file() else {}
    if "answers" in sidecar:
        answers = sidecar["answers"]
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise BimodalLoadError(f'{path / SIDECAR}: "answers" must be a list of strings')
        if len(answers) != head_size:
            raise BimodalLoadError(
                f"{path / SIDECAR} lists {len(answers)} answers but the answer head has "
                f"{head_size} logits (config.json {head})"
            )
        return tuple(answers)
    labels = {int(k): str(v) for k, v in (config.id2label or {}).items()}
    if sorted(labels) != list(range(head_size)):
        raise BimodalLoadError(
            f"{path / 'config.json'} id2label has {len(labels)} answers but the answer head has "
            f"{head_size} logits ({head}); set id2label to match, or list the answers in "
            f'{path / SIDECAR} as {{"answers": [...]}}'
        )
    return tuple(labels[i] for i in range(head_size))

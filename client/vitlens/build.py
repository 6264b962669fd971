"""Request messages from the SDK's arguments, shared by `vitlens.Client` and
`vitlens.aio.AsyncClient`; every builder raises (TypeError, ValueError) before any network use."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from google.protobuf import struct_pb2

from vitlens.detection import build_detection_options, check_threshold
from vitlens.images import ImageInput, to_images
from vitlens.v1 import tensor_pb2, vitlens_pb2
from vitlens.vqa import QuestionsSpec, Regions, RegionsSpec, build_questions, build_regions

__all__ = [
    "TargetSpec",
    "build_answer_request",
    "build_explain_request",
    "build_predict_request",
    "build_target",
]

TargetSpec = int | Sequence[int] | None
"""Class(es) to explain: None (the predicted class), one index for every image, or one index
per image."""

_GRIDS = {"tokens": vitlens_pb2.OUTPUT_GRID_TOKENS, "input": vitlens_pb2.OUTPUT_GRID_INPUT}
_DTYPES = {"float32": tensor_pb2.DTYPE_FLOAT32, "float16": tensor_pb2.DTYPE_FLOAT16}


def _index(x: Any, what: str) -> int:
    if isinstance(x, bool):
        raise TypeError(f"{what} must be an int, got bool")
    try:
        return operator.index(x)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(x).__name__}") from None


def build_target(target: TargetSpec, top_k: int | None, num_images: int) -> vitlens_pb2.Target:
    """The `Target` message for ``target`` / ``top_k`` (at most one of them may be set)."""
    if target is not None and top_k is not None:
        raise ValueError("pass either target or top_k, not both")
    if top_k is not None:
        k = _index(top_k, "top_k")
        if k < 1:
            raise ValueError(f"top_k must be at least 1, got {k}")
        return vitlens_pb2.Target(top_k=k)
    if target is None:
        return vitlens_pb2.Target(predicted=True)
    if isinstance(target, str | bytes):
        raise TypeError("target must be an int or a sequence of ints")
    if isinstance(target, Iterable):
        indices = [_index(t, "target") for t in target]
        if len(indices) != num_images:
            raise ValueError(f"got {len(indices)} targets for {num_images} images")
        return vitlens_pb2.Target(per_image=vitlens_pb2.ClassIndices(indices=indices))
    return vitlens_pb2.Target(class_index=_index(target, "target"))


def _struct(options: Mapping[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    try:
        s.update(dict(options))
    except (TypeError, ValueError) as e:
        raise TypeError(f"method_options must hold JSON-like values: {e}") from None
    return s


def _choice(table: Mapping[str, int], value: str, what: str) -> int:
    try:
        return table[str(value)]
    except KeyError:
        raise ValueError(f"{what} must be one of {sorted(table)}, got {value!r}") from None


def build_explain_request(
    images: ImageInput | Iterable[ImageInput],
    *,
    method: str = "generic",
    model: str = "",
    target: TargetSpec = None,
    top_k: int | None = None,
    grid: str = "tokens",
    relevance: bool = False,
    dtype: str = "float32",
    top_k_predictions: int = 5,
    method_options: Mapping[str, Any] | None = None,
    ids: Sequence[str] | None = None,
    texts: Sequence[str] = (),
    questions: QuestionsSpec = (),
    regions: Sequence[RegionsSpec] | Regions | None = None,
    detection_threshold: float | None = None,
    max_detections: int = 0,
    queries: Sequence[int] | None = None,
) -> vitlens_pb2.ExplainRequest:
    """The `ExplainRequest` for `Client.explain`'s arguments; raises before any network use.

    ``detection`` is set only when a detection argument differs from its default
    (`vitlens.detection.build_detection_options`); ``target`` is then left unset, as detection
    models require, and ``target``/``top_k`` are refused.
    """
    msgs = to_images(images, ids=ids)
    detection = build_detection_options(detection_threshold, max_detections, queries)
    if detection is not None and (target is not None or top_k is not None):
        raise ValueError(
            "target and top_k choose classes to explain; detection models explain detections "
            "(detection_threshold, max_detections, queries)"
        )
    options = vitlens_pb2.ExplainOptions(
        grid=_choice(_GRIDS, grid, "grid"),
        return_relevance=relevance,
        output_dtype=_choice(_DTYPES, dtype, "dtype"),
        top_k_predictions=_index(top_k_predictions, "top_k_predictions"),
    )
    if method_options:
        options.method_options.CopyFrom(_struct(method_options))
    request = vitlens_pb2.ExplainRequest(
        model=model,
        method=method,
        images=msgs,
        options=options,
        texts=_texts(texts, "texts"),
        questions=build_questions(questions, len(msgs)),
        regions=build_regions(regions, len(msgs)),
    )
    if detection is None:
        request.target.CopyFrom(build_target(target, top_k, len(msgs)))
    else:
        request.detection.CopyFrom(detection)
    return request


def build_predict_request(
    images: ImageInput | Iterable[ImageInput],
    *,
    model: str = "",
    top_k: int = 5,
    ids: Sequence[str] | None = None,
    prompts: Sequence[str] = (),
    questions: QuestionsSpec = (),
    regions: Sequence[RegionsSpec] | Regions | None = None,
    detection_threshold: float | None = None,
) -> vitlens_pb2.PredictRequest:
    """The `PredictRequest` for `Client.predict`'s (and `Client.answer`'s) arguments;
    ``detection_threshold`` is set only when given (in [0, 1))."""
    msgs = to_images(images, ids=ids)
    request = vitlens_pb2.PredictRequest(
        model=model,
        images=msgs,
        top_k=_index(top_k, "top_k"),
        prompts=_texts(prompts, "prompts"),
        questions=build_questions(questions, len(msgs)),
        regions=build_regions(regions, len(msgs)),
    )
    if detection_threshold is not None:
        request.detection_threshold = check_threshold(detection_threshold)
    return request


def build_answer_request(
    images: ImageInput | Iterable[ImageInput],
    questions: QuestionsSpec,
    *,
    model: str = "",
    top_k: int = 5,
    regions: Sequence[RegionsSpec] | Regions | None = None,
    ids: Sequence[str] | None = None,
) -> vitlens_pb2.PredictRequest:
    """The `PredictRequest` for `Client.answer`'s arguments (at least one question)."""
    asked = [questions] if isinstance(questions, str) else list(questions)
    if not asked:
        raise ValueError("give a question: one for every image, or one per image")
    return build_predict_request(
        images, model=model, top_k=top_k, ids=ids, questions=asked, regions=regions
    )


def _texts(texts: Sequence[str], name: str) -> list[str]:
    """A list of strings (one string is refused: it would be split into characters)."""
    if isinstance(texts, str):
        raise TypeError(f"{name} takes a sequence of strings, not one string")
    found = list(texts)
    if not all(isinstance(t, str) for t in found):
        raise TypeError(f"{name} must be strings")
    return found

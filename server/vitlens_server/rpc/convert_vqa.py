"""The visual question answering fields of the protobuf messages ↔ the domain (`rpc.convert`).

Requests: ``questions`` (one per image, or one asked of every image) and ``regions`` (one
`Regions` per image: (R, F) float features and (R, 4) boxes as fractions of the image) are
checked for what the wire can get wrong (counts, shapes, dtypes, non-finite numbers, boxes off
the image), each refusal naming its field (``questions[2]``, ``regions[1].boxes``). Whether the
model takes questions or regions, their characters, tokens and feature width are the data
plane's to judge (`runtime.vqa`), with the server's text limits.

Replies: per explanation, the regions' relevance and the relevance matrices.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vitlens.tensors import TensorFormatError, numpy_to_tensor, tensor_to_numpy
from vitlens.v1 import tensor_pb2, vitlens_pb2
from vitlens_server.domain import ExplainResult, RegionsInput
from vitlens_server.errors import InvalidArgument

__all__ = ["matrices", "questions", "region_relevance", "regions"]

_FLOATS = (tensor_pb2.DTYPE_FLOAT32, tensor_pb2.DTYPE_FLOAT16)


# ------------------------------------------------------------------------------ requests


def questions(found: Sequence[str], num_images: int) -> tuple[str, ...]:
    """One question per image: ``found`` as is, or its single question asked of every image.

    Raises:
        InvalidArgument: on ``questions`` when there are neither 1 nor ``num_images`` of them,
            on ``questions[i]`` when one is empty (or only white space).
    """
    asked = tuple(found)
    if not asked:
        return ()
    if len(asked) not in (1, num_images):
        raise InvalidArgument(
            f"questions has {len(asked)} questions for {num_images} images: give one per "
            "image, or one for all",
            field="questions",
        )
    for i, question in enumerate(asked):
        if not question.strip():
            where = f"questions[{i}]"
            raise InvalidArgument(f"{where} is empty; ask a non-empty question", field=where)
    if len(asked) == 1 and num_images > 1:
        return asked * num_images
    return asked


def regions(found: Sequence[vitlens_pb2.Regions], num_images: int) -> tuple[RegionsInput, ...]:
    """Each image's regions as owned float32 arrays, checked; none when the request has none.

    Raises:
        InvalidArgument: on ``regions`` when their count is not ``num_images``; on
            ``regions[i].features`` / ``regions[i].boxes`` for a missing or malformed tensor,
            a wrong shape or dtype, a non-finite number, or a box off the image or inverted.
    """
    if not found:
        return ()
    if len(found) != num_images:
        raise InvalidArgument(
            f"regions has {len(found)} entries for {num_images} images: give one Regions per "
            "image, in image order",
            field="regions",
        )
    return tuple(_image_regions(r, f"regions[{i}]") for i, r in enumerate(found))


def _image_regions(message: vitlens_pb2.Regions, where: str) -> RegionsInput:
    features = _float_matrix(message, "features", f"{where}.features")  # (R, F)
    boxes = _float_matrix(message, "boxes", f"{where}.boxes")  # (R, 4)
    field = f"{where}.boxes"
    if boxes.shape[1] != 4:
        raise InvalidArgument(
            f"{field} has shape {boxes.shape}; boxes are (R, 4): x1, y1, x2, y2", field=field
        )
    if boxes.shape[0] != features.shape[0]:
        raise InvalidArgument(
            f"{field} has {boxes.shape[0]} boxes for {features.shape[0]} regions "
            f"({where}.features); give one box per region",
            field=field,
        )
    outside = np.flatnonzero(((boxes < 0.0) | (boxes > 1.0)).any(axis=1))
    if outside.size:
        raise InvalidArgument(
            f"{field}: box {int(outside[0])} is {boxes[outside[0]].tolist()}; coordinates are "
            "fractions of the image's width and height, in [0, 1]",
            field=field,
        )
    inverted = np.flatnonzero((boxes[:, 0] > boxes[:, 2]) | (boxes[:, 1] > boxes[:, 3]))
    if inverted.size:
        raise InvalidArgument(
            f"{field}: box {int(inverted[0])} is {boxes[inverted[0]].tolist()}; give "
            "(x1, y1, x2, y2) with x1 <= x2 and y1 <= y2",
            field=field,
        )
    return RegionsInput(features=features, boxes=boxes, where=where)


def _float_matrix(message: vitlens_pb2.Regions, name: str, field: str) -> np.ndarray:
    """The (R, C) tensor ``name`` of ``message``, R and C >= 1, finite, as owned float32."""
    if not message.HasField(name):
        raise InvalidArgument(f"{field} is missing", field=field)
    tensor = getattr(message, name)
    try:
        view = tensor_to_numpy(tensor, copy=False)
    except TensorFormatError as err:
        raise InvalidArgument(f"{field}: {err}", field=field) from err
    if tensor.dtype not in _FLOATS:
        raise InvalidArgument(
            f"{field} is {tensor_pb2.Dtype.Name(tensor.dtype)}; send DTYPE_FLOAT32 or "
            "DTYPE_FLOAT16",
            field=field,
        )
    if view.ndim != 2 or 0 in view.shape:
        raise InvalidArgument(
            f"{field} has shape {view.shape}; give a 2-D (regions, values) tensor with at "
            "least one region",
            field=field,
        )
    array = np.array(view, dtype=np.float32, order="C")  # (R, C), owned and writable
    if not np.isfinite(array).all():
        row = int(np.flatnonzero(~np.isfinite(array).all(axis=1))[0])
        raise InvalidArgument(f"{field}: region {row} has a non-finite value", field=field)
    return array


# ------------------------------------------------------------------------------- replies


def region_relevance(result: ExplainResult, k: int) -> list[float]:
    """Explanation ``k`` of a B = 1 result: one relevance per request region (none without)."""
    if result.regions is None:
        return []
    return [float(v) for v in result.regions[0][k]]  # (K, R) row k


def matrices(result: ExplainResult, k: int) -> list[vitlens_pb2.RelevanceMatrix]:
    """Explanation ``k`` of a B = 1 result: every relevance matrix, in the result's dtype."""
    if result.matrices is None:
        return []
    return [
        vitlens_pb2.RelevanceMatrix(
            queries=m.queries, keys=m.keys, matrix=numpy_to_tensor(m.matrix)
        )
        for m in result.matrices[0][k]
    ]

"""Fuzz strategies for the inputs of visual question answering requests: the served VQA
models, ``questions`` and ``regions`` (`tests.rpc.fuzz.vqa`).

Questions are one per image or one for all (valid); hostile ones are empty or blank, only
control or format characters, BERT's special tokens, over the server's character limit, within
it but past the ViLT's tokens, 100 kB, or too many or too few for the images. Regions are one
`Regions` per image of (R, F) float features at the model's width and (R, 4) boxes in [0, 1]
(valid); hostile ones have the wrong count, width, dtype or shape, NaN or ±Inf, finite values
the model's arithmetic overflows, boxes off the image, inverted or not four columns, zero
regions, or more than the server takes.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from tests.rpc.fuzz.basics import (
    UNKNOWN_ENUMS,
    Catalog,
    Mutations,
    Param,
    hostile_strings,
)
from tests.rpc.fuzz.images import hostile_tensors
from vitlens.v1 import tensor_pb2, vitlens_pb2

__all__ = [
    "QUESTIONS",
    "VqaLimits",
    "VqaModel",
    "bimodal_methods",
    "foreign_methods",
    "many_regions",
    "question_lists",
    "region_lists",
    "vqa_inputs",
]

F32, F16 = tensor_pb2.DTYPE_FLOAT32, tensor_pb2.DTYPE_FLOAT16
HUGE_REGIONS = 100_000  # (R, R) attention would take 80 GB
QUESTIONS = (
    "is there a star?",
    "what colour is the disc?",
    "how many objects are there?",
    "where is the red cross?",
    "what color is the cat?",
    "how many dogs?",
    "Is There A RING",
)


@dataclass(frozen=True)
class VqaModel:
    """A served VQA model: its name, answer count, and 0 (reads pixels) or its region width."""

    name: str
    answers: int
    feature_dim: int = 0


@dataclass(frozen=True)
class VqaLimits:
    """The served VQA models (pixels first), the other models, and the server's limits."""

    models: tuple[VqaModel, ...]
    others: tuple[str, ...]
    max_images: int
    max_chars: int
    max_regions: int

    def catalog(self, model: VqaModel) -> Catalog:
        return _catalog(model.name, model.answers, self.max_images)


@functools.cache
def _catalog(model: str, answers: int, max_images: int) -> Catalog:
    """The bi-modal methods (and Evaluate's ``random``) and the VQA metrics, with options."""
    import vitlens_server.evaluate.vqa_run  # noqa: F401  (registers VQA_METRICS)
    from vitlens_server.evaluate.vqa_plan import RANDOM, VQA_METHODS, VQA_METRICS
    from vitlens_server.explain.methods.reference import RandomParams
    from vitlens_server.explain.params import describe_params
    from vitlens_server.runtime.vqa import GenericParams

    def params(cls: type | None) -> tuple[Param, ...]:
        infos = describe_params(cls) if cls is not None else []
        return tuple(Param(p.name, p.type, tuple(p.choices)) for p in infos)

    table = {"generic": GenericParams, RANDOM: RandomParams}
    return Catalog(
        model=model,
        num_classes=answers,
        num_layers=2,
        max_images=max_images,
        methods={name: params(table.get(name)) for name in VQA_METHODS},
        metrics={name: params(spec.options) for name, spec in VQA_METRICS.items()},
    )


def bimodal_methods() -> list[str]:
    from vitlens_server.explain.bimodal import BIMODAL_METHODS

    return list(BIMODAL_METHODS)


def foreign_methods() -> list[str]:
    """Methods of the classifier and the image-text models, ``random`` among them."""
    from vitlens_server.explain import METHODS
    from vitlens_server.explain.image_text import IMAGE_TEXT_METHODS

    return sorted(set(METHODS) | set(IMAGE_TEXT_METHODS))


# --------------------------------------------------------------------------- questions


def bad_questions(limits: VqaLimits) -> st.SearchStrategy[str]:
    n = limits.max_chars
    odd = ["", " ", "\t\n", "\u3000\u00a0", "\u200b", "\ufeff", "\x00", "\x07\x1b[2J", "?"]
    odd += ["\u0301", "💥", "[SEP] [CLS] [PAD]", "[MASK] is [UNK]?", "##s ##s"]
    sized = ["x" * (n + 1), "é" * (n + 1), "é" * n, "?" * n, "is " * (n // 3), "💥" * n]
    return st.one_of(
        st.sampled_from(odd),
        st.sampled_from(sized),  # over the characters, or within them and past the tokens
        st.text(st.characters(codec="utf-8"), min_size=1, max_size=20),
        hostile_strings(),
    )


@st.composite
def question_lists(draw: st.DrawFn, n: int, limits: VqaLimits, hostile: bool) -> list[str]:
    """One question per image or one for all; when ``hostile``, one or all bad, none, the
    wrong count, or hundreds."""
    good = st.sampled_from(QUESTIONS)
    valid = st.one_of(st.lists(good, min_size=n, max_size=n), good.map(lambda q: [q]))
    if not hostile:
        return draw(valid)
    kind = draw(st.sampled_from(["one_bad", "all_bad", "count", "none", "many"]))
    if kind == "one_bad":
        questions = draw(valid) or [draw(good)]
        questions[draw(st.integers(0, len(questions) - 1))] = draw(bad_questions(limits))
        return questions
    if kind == "all_bad":
        most = min(max(n, 1), limits.max_images + 1)
        return draw(st.lists(bad_questions(limits), min_size=1, max_size=most))
    if kind == "count":
        counts = sorted({0, n - 1, n + 1, 2 * n + 1} - {-1, 1, n}) or [n + 1]
        k = draw(st.sampled_from(counts))
        return draw(st.lists(good, min_size=k, max_size=k))
    return [] if kind == "none" else [draw(good)] * 300


# --------------------------------------------------------------------------- regions


def _tensor(array: np.ndarray, dtype: int = F32) -> tensor_pb2.Tensor:
    wire = np.ascontiguousarray(array, dtype="<f2" if dtype == F16 else "<f4")
    return tensor_pb2.Tensor(dtype=dtype, shape=wire.shape, data=wire.tobytes())


def _boxes(rng: np.random.Generator, count: int) -> np.ndarray:
    low = rng.random((count, 2)) * 0.6  # (x1, y1)
    return np.concatenate([low, low + rng.random((count, 2)) * 0.4], axis=1)  # (R, 4)


@st.composite
def valid_regions(draw: st.DrawFn, width: int) -> vitlens_pb2.Regions:
    """1-6 regions of ``width`` features, float32 or float16; boxes may be the whole image,
    a point, or a corner."""
    count, dtype = draw(st.integers(1, 6)), draw(st.sampled_from([F32, F16]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    boxes = _boxes(rng, count)
    edges = [None, (0, 0, 1, 1), (0.5, 0.5, 0.5, 0.5), (1, 1, 1, 1), (-0.0, 0, 0, 0)]
    edge = draw(st.sampled_from(edges))
    if edge is not None:
        boxes[0] = edge
    features = rng.standard_normal((count, width))
    return vitlens_pb2.Regions(features=_tensor(features, dtype), boxes=_tensor(boxes, dtype))


@functools.cache
def many_regions(count: int, width: int) -> vitlens_pb2.Regions:
    """``count`` zero-feature regions over the whole image (built once: megabytes)."""
    boxes = np.tile(np.array([0.0, 0.0, 1.0, 1.0]), (count, 1))
    return vitlens_pb2.Regions(features=_tensor(np.zeros((count, width))), boxes=_tensor(boxes))


REGION_FLAWS = (
    "width", "nonfinite", "overflow", "outside", "inverted", "columns", "box_count", "zero",
    "missing", "dtype", "rank", "tensor", "huge",
)  # fmt: skip


@st.composite
def hostile_regions(draw: st.DrawFn, width: int, max_regions: int) -> vitlens_pb2.Regions:
    """One image's regions with one thing wrong (`REGION_FLAWS`)."""
    flaw = draw(st.sampled_from(REGION_FLAWS))
    if flaw == "huge":
        return many_regions(draw(st.sampled_from([max_regions + 1, HUGE_REGIONS])), width)
    count = draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    features, boxes, dtype = rng.standard_normal((count, width)), _boxes(rng, count), F32
    row = draw(st.integers(0, count - 1))
    if flaw == "width":
        other = draw(st.sampled_from([1, width - 1, width + 1, 2 * width, 2048]))
        features = rng.standard_normal((count, other))
    elif flaw == "nonfinite":
        spoilt = features if draw(st.booleans()) else boxes
        value = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        spoilt[row, draw(st.integers(0, 3))] = value
    elif flaw == "overflow":  # finite on the wire; the model's float32 sums are not
        big, dtype = draw(st.sampled_from([(3e38, F32), (-3e38, F32), (65504.0, F16)]))
        features[row] = big
    elif flaw == "outside":
        value = draw(st.sampled_from([-1e-6, -1.0, 1.001, 2.0, 1e30]))
        boxes[row, draw(st.integers(0, 3))] = value
    elif flaw == "inverted":
        boxes[row] = draw(st.sampled_from([(0.8, 0.2, 0.1, 0.9), (0.2, 0.8, 0.9, 0.1)]))
    elif flaw == "columns":
        shapes = [boxes[:, :3], boxes[:, :1], np.pad(boxes, ((0, 0), (0, 1))), boxes.T]
        boxes = shapes[draw(st.integers(0, len(shapes) - 1))]
    elif flaw == "box_count":
        boxes = _boxes(rng, draw(st.sampled_from([count - 1, count + 1])))
    elif flaw == "zero":
        features, boxes = np.zeros((0, width)), np.zeros((0, 4))
    elif flaw == "rank":
        ranks = [features.reshape(-1), features[None], features[:1, :1].reshape(())]
        features = ranks[draw(st.integers(0, len(ranks) - 1))]
    regions = vitlens_pb2.Regions(features=_tensor(features, dtype), boxes=_tensor(boxes, dtype))
    if flaw == "missing":
        for name in draw(st.sampled_from([["features"], ["boxes"], ["features", "boxes"]])):
            regions.ClearField(name)
    elif flaw == "dtype":
        tensor = regions.features if draw(st.booleans()) else regions.boxes
        odd = [tensor_pb2.DTYPE_UINT8, tensor_pb2.DTYPE_UNSPECIFIED, *UNKNOWN_ENUMS]
        tensor.dtype = draw(st.sampled_from(odd))
        if tensor.dtype == tensor_pb2.DTYPE_UINT8:  # a well-formed uint8 tensor
            tensor.data = tensor.data[: len(tensor.data) // 4]
    elif flaw == "tensor":
        name = draw(st.sampled_from(["features", "boxes"]))
        getattr(regions, name).CopyFrom(draw(hostile_tensors()))
    return regions


@st.composite
def region_lists(
    draw: st.DrawFn, n: int, model: VqaModel, limits: VqaLimits, hostile: bool
) -> list[vitlens_pb2.Regions]:
    """None for a model on pixels, one per image for one on regions; when ``hostile``, one or
    all bad, the wrong count, hundreds, or good regions for the pixel model."""
    width = model.feature_dim or 16
    per_image = st.lists(valid_regions(width), min_size=n, max_size=n)
    if not hostile:
        return draw(per_image) if model.feature_dim else []
    bad = hostile_regions(width, limits.max_regions)
    kind = draw(st.sampled_from(["per_image", "one_bad", "all_bad", "count", "none", "many"]))
    if kind == "per_image":
        return draw(per_image)
    if kind == "one_bad":
        regions = draw(st.lists(valid_regions(width), min_size=max(n, 1), max_size=max(n, 1)))
        regions[draw(st.integers(0, len(regions) - 1))] = draw(bad)
        return regions
    if kind == "all_bad":
        return draw(st.lists(bad, min_size=1, max_size=min(max(n, 1), limits.max_images + 1)))
    if kind == "count":
        k = draw(st.sampled_from(sorted({0, n - 1, n + 1} - {-1, n})))
        return draw(st.lists(valid_regions(width), min_size=k, max_size=k))
    return [] if kind == "none" else [draw(valid_regions(width))] * 300


def vqa_inputs(
    draw: st.DrawFn, mut: Mutations, n: int, model: VqaModel, limits: VqaLimits
) -> dict[str, list]:
    """A request's ``questions`` and ``regions`` for ``n`` images on ``model``, each hostile
    as ``mut`` allows."""
    return {
        "questions": mut.draw(
            draw, "questions", question_lists(n, limits, False), question_lists(n, limits, True)
        ),
        "regions": mut.draw(
            draw,
            "regions",
            region_lists(n, model, limits, False),
            region_lists(n, model, limits, True),
        ),
    }

"""The SDK's visual question answering side: questions, detector regions and answers.

A VQA model (`ModelInfo.vqa`) answers a question about an image with a class over its labels,
the answer vocabulary. `Client.answer` asks; `Client.explain(..., questions=...)` explains the
answer, each `Explanation` then carrying the question tokens' relevance
(`Explanation.question`), the image's (``heatmap``, or ``region_relevance`` on request regions)
and, with ``relevance=True``, every relevance matrix (`Explanation.matrices`).

Models that read detector regions (`ModelInfo.visual_input` ``"regions"``) take one `Regions`
per image: (R, F) features, F = `ModelInfo.region_feature_dim`, and (R, 4) boxes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from vitlens.results import Prediction
from vitlens.tensors import numpy_to_tensor
from vitlens.v1 import vitlens_pb2

__all__ = [
    "Answer",
    "QuestionsSpec",
    "Regions",
    "RegionsSpec",
    "answers_from_proto",
    "build_questions",
    "build_regions",
]


@dataclass(frozen=True, eq=False)
class Regions:
    """One image's detector regions.

    Attributes:
        features: (R, F) float region features, F = `ModelInfo.region_feature_dim`.
        boxes: (R, 4) boxes (x1, y1, x2, y2) as fractions of the image's width and height, in
            [0, 1], with x1 <= x2 and y1 <= y2.
    """

    features: ArrayLike
    boxes: ArrayLike

    def to_proto(self, where: str = "regions") -> vitlens_pb2.Regions:
        """The `Regions` message; ValueError (naming ``where``) for a wrong shape or dtype."""
        features = _floats(self.features, f"{where}.features")
        boxes = _floats(self.boxes, f"{where}.boxes")
        if features.ndim != 2 or features.shape[0] < 1 or features.shape[1] < 1:
            raise ValueError(
                f"{where}.features must be (R, F) with at least one region, got {features.shape}"
            )
        if boxes.shape != (features.shape[0], 4):
            raise ValueError(
                f"{where}.boxes must be (R, 4) = ({features.shape[0]}, 4), one box per region, "
                f"got {boxes.shape}"
            )
        return vitlens_pb2.Regions(features=numpy_to_tensor(features), boxes=numpy_to_tensor(boxes))


RegionsSpec = Regions | tuple[ArrayLike, ArrayLike]
"""One image's regions: a `Regions`, or a (features, boxes) pair."""

QuestionsSpec = str | Sequence[str]
"""One question asked of every image, or one per image in image order."""


def _floats(values: ArrayLike, what: str) -> np.ndarray:
    """float16 kept, every other real dtype cast to float32."""
    array = np.asarray(values)
    if array.dtype.kind not in "fiub":
        raise TypeError(f"{what} must hold numbers, got dtype {array.dtype}")
    return array if array.dtype == np.float16 else array.astype(np.float32, copy=False)


def build_questions(questions: QuestionsSpec, num_images: int) -> list[str]:
    """The request's questions: one string is one question for every image.

    Raises:
        TypeError: a question is not a string.
        ValueError: neither 1 nor ``num_images`` questions, or an empty one.
    """
    found = [questions] if isinstance(questions, str) else list(questions)
    if not all(isinstance(q, str) for q in found):
        raise TypeError("questions must be strings")
    if found and len(found) not in (1, num_images):
        raise ValueError(
            f"got {len(found)} questions for {num_images} images: give one per image, or one "
            "for all"
        )
    for i, question in enumerate(found):
        if not question.strip():
            raise ValueError(f"questions[{i}] is empty")
    return found


def build_regions(regions: Sequence[RegionsSpec] | Regions | None, num_images: int) -> list:
    """One `Regions` message per image (none for None); a lone `Regions` is one image's.

    Raises:
        TypeError: an entry is neither a `Regions` nor a (features, boxes) pair.
        ValueError: not one entry per image, or an entry of the wrong shape.
    """
    if regions is None:
        return []
    found = [regions] if isinstance(regions, Regions) else list(regions)
    if len(found) != num_images:
        raise ValueError(f"got regions for {len(found)} images, not {num_images}: one per image")
    messages = []
    for i, entry in enumerate(found):
        if not isinstance(entry, Regions):
            if not isinstance(entry, tuple | list) or len(entry) != 2:
                raise TypeError(f"regions[{i}] must be a vitlens.Regions or (features, boxes)")
            entry = Regions(*entry)
        messages.append(entry.to_proto(f"regions[{i}]"))
    return messages


@dataclass(frozen=True)
class Answer:
    """A VQA model's answers to one question about one request image, most probable first.

    Attributes:
        id: the request image's id.
        question: the question asked of it.
        predictions: answers (index into `ModelInfo.labels`, the answer, probability, logit).
    """

    id: str
    question: str
    predictions: tuple[Prediction, ...]

    @classmethod
    def from_proto(cls, c: vitlens_pb2.Classification, question: str) -> Answer:
        return cls(c.id, question, tuple(Prediction.from_proto(p) for p in c.predictions))

    @property
    def top(self) -> Prediction:
        """The most probable answer."""
        if not self.predictions:
            raise ValueError(f"image {self.id!r} has no answers")
        return self.predictions[0]

    @property
    def text(self) -> str:
        """The most probable answer, in words."""
        return self.top.label

    def __str__(self) -> str:
        return f"{self.question} -> {self.text} ({self.top.probability:.1%})"


def answers_from_proto(
    response: vitlens_pb2.PredictResponse, questions: Sequence[str]
) -> list[Answer]:
    """One `Answer` per image of a Predict answer to ``questions`` (one for all, or one each)."""
    results = response.results
    asked = list(questions) * len(results) if len(questions) == 1 else list(questions)
    if len(asked) != len(results):
        raise ValueError(f"{len(results)} answers for {len(asked)} questions")
    return [Answer.from_proto(c, q) for c, q in zip(results, asked, strict=True)]

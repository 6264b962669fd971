"""Scenes and questions for the exemplar VQA models: training batches and held-out sets.

A training batch is a function of its step (a resumed run sees what an uninterrupted one
would): ``batch_size`` crisp scenes from the "train" seeds, ``two_object_fraction`` of them with
two objects, each with one question drawn by `vitlens_server.data.questions.sample_question`
(kinds uniform, answers balanced within a kind). A held-out set (`held_out`) alternates one- and
two-object scenes of the "val" or "test" seeds and cycles through the question kinds, so every
kind is asked of both scene types.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from transformers import BertTokenizer

from vitlens_server.data import Scene, render_scene, split_seeds
from vitlens_server.data.captions import crisp_scene_config
from vitlens_server.data.questions import (
    KINDS,
    Question,
    answer_index,
    question_mask,
    sample_question,
)

__all__ = ["QuestionBatch", "held_out", "make_batch", "patch_targets", "tokenize"]


@dataclass(frozen=True)
class QuestionBatch:
    """B scenes with one question each.

    Attributes:
        images: (B, S, S, 3) uint8.
        questions: the B questions.
        answers: (B,) answer indices into `ANSWERS`.
        scenes: the rendered scenes (masks for segmentation).
    """

    images: np.ndarray
    questions: tuple[Question, ...]
    answers: Tensor
    scenes: tuple[Scene, ...]


def _batch(scenes: Sequence[Scene], questions: Sequence[Question]) -> QuestionBatch:
    answers = torch.tensor([answer_index(q.answer) for q in questions])
    images = np.stack([s.image for s in scenes])
    return QuestionBatch(images, tuple(questions), answers, tuple(scenes))


def make_batch(
    step: int, *, batch_size: int, size: int, two_object_fraction: float, seed: int = 0
) -> QuestionBatch:
    """The training batch of ``step``: scenes ``step * batch_size ...`` of the "train" split."""
    rng = np.random.default_rng([seed, step])
    seeds = split_seeds("train", batch_size, base_seed=step * batch_size)
    two = rng.random(batch_size) < two_object_fraction
    config = crisp_scene_config(size)
    scenes = [
        render_scene(s, two_object=bool(t), config=config) for s, t in zip(seeds, two, strict=True)
    ]
    return _batch(scenes, [sample_question(scene, rng) for scene in scenes])


def held_out(split: str, start: int, count: int, *, size: int) -> QuestionBatch:
    """Scenes ``start .. start + count`` of held-out ``split`` ("val" or "test"): scene i has
    two objects when i is odd and is asked a question of kind ``KINDS[i % len(KINDS)]``, or of
    the next kind the scene has when it has none of that kind (a shape question needs a colour
    that names one object: two objects of one colour have none)."""
    if split == "train":
        raise ValueError("held-out questions come from the 'val' or 'test' split")
    config = crisp_scene_config(size)
    scenes, questions = [], []
    salt = zlib.crc32(split.encode())
    for i, seed in enumerate(split_seeds(split, count, base_seed=start), start=start):
        scene = render_scene(seed, two_object=i % 2 == 1, config=config)
        scenes.append(scene)
        questions.append(_question_of_kind(scene, [salt, i], i % len(KINDS)))
    return _batch(scenes, questions)


def _question_of_kind(scene: Scene, seed: list[int], first: int) -> Question:
    """A question of kind ``KINDS[first]``, else of the next kind in `KINDS` the scene has."""
    for step in range(len(KINDS)):
        kind = KINDS[(first + step) % len(KINDS)]
        try:
            return sample_question(scene, np.random.default_rng(seed), kind=kind)
        except ValueError:  # the scene has no question of this kind
            continue
    raise ValueError(f"scene {scene.seed} has no question of any kind")


def tokenize(
    tokenizer: BertTokenizer, questions: Sequence[Question], device: torch.device
) -> tuple[Tensor, Tensor]:
    """Token ids and attention mask, (B, T) each, padded to the longest question."""
    encoded = tokenizer([q.text for q in questions], padding=True, return_tensors="pt")
    return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)


def patch_targets(batch: QuestionBatch, cells: int) -> Tensor:
    """The grounding target of each of ``cells`` square patches tiling the images (a side of
    sqrt(cells) patches), (B, cells) float in [0, 1] in raster order: the fraction of its pixels
    inside `question_mask` (the objects the question is about; none for a "no" or a "zero")."""
    masks = np.stack(
        [question_mask(s, q) for s, q in zip(batch.scenes, batch.questions, strict=True)]
    )  # (B, H, W)
    b, h, w = masks.shape
    side = math.isqrt(cells)
    if side * side != cells or h % side or w % side:
        raise ValueError(f"{cells} patches do not tile {h} x {w} px images as a square grid")
    shares = masks.reshape(b, side, h // side, side, w // side).mean(axis=(2, 4))
    return torch.from_numpy(shares.reshape(b, -1).astype(np.float32))

"""Batches of image-text jobs: requests that share texts and method run as one `explain_pairs`.

A job is one request (or a chunk of one): its images, the candidate texts (the request's texts,
or the model's label prompts), what to explain among them, and the output options. Jobs of one
batch that share their texts, method, grid and relevance option are fused: one forward of all
their images and the texts once, one backward per round of pairs (`explain_pairs`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from vitlens_server.domain import ExplainResult, Predictions, TargetSpec, TextRelevance
from vitlens_server.explain.engine import resize_maps, top_k_predictions
from vitlens_server.explain.image_text import PairMaps, explain_pairs, text_positions
from vitlens_server.explain.params import NoParams
from vitlens_server.models.image_text import ImageTextModel, TokenizedTexts

__all__ = [
    "ImageTextExplainJob",
    "ImageTextPredictJob",
    "TextCache",
    "by_group",
    "explain_jobs",
    "group_indices",
    "predict_jobs",
]


@dataclass(frozen=True)
class ImageTextExplainJob:
    """Explain (B, 3, H, W) ``pixels`` in [0, 1] against ``texts``.

    ``target`` None: every text, in order (K = M); else it selects among the texts as a
    classifier's target selects among classes (the label prompts of zero-shot). ``params``:
    the method's parsed options (`explain.params.parse_params` of its registered dataclass).
    """

    pixels: Tensor
    texts: tuple[str, ...]
    method: str
    target: TargetSpec | None = None
    params: object = NoParams()
    grid: Literal["tokens", "input"] = "tokens"
    relevance: bool = False
    top_k_predictions: int = 5
    output_dtype: Literal["float32", "float16"] = "float32"

    @property
    def group(self) -> tuple:
        """Jobs with equal groups run as one `explain_pairs`."""
        return (self.texts, self.method, self.params, self.grid, self.relevance)


@dataclass(frozen=True)
class ImageTextPredictJob:
    """Zero-shot classify (B, 3, H, W) ``pixels`` in [0, 1] against ``texts``; top ``top_k``."""

    pixels: Tensor
    texts: tuple[str, ...]
    top_k: int


class TextCache:
    """Per replica: the tokenization and (no-grad) embeddings of recently used text sets."""

    def __init__(self, model: ImageTextModel, size: int = 8) -> None:
        self.model = model
        self.size = size
        self._tokens: dict[tuple[str, ...], TokenizedTexts] = {}
        self._embeds: dict[tuple[str, ...], Tensor] = {}

    def tokens(self, texts: tuple[str, ...]) -> TokenizedTexts:
        return self._get(self._tokens, texts, lambda: self.model.tokenize(texts))

    def embeds(self, texts: tuple[str, ...]) -> Tensor:
        """(M, D) unit text embeddings, computed once per text set while it stays cached."""

        def encode() -> Tensor:
            with torch.inference_mode():
                return self.model.encode_texts(self.tokens(texts))

        return self._get(self._embeds, texts, encode)

    def _get(self, store: dict, key: tuple[str, ...], make: Callable[[], object]):
        found = store.pop(key, None)
        if found is None:
            found = make()
        store[key] = found  # most recent last
        while len(store) > self.size:
            store.pop(next(iter(store)))
        return found


def predict_jobs(cache: TextCache, jobs: Sequence[ImageTextPredictJob]) -> list[Predictions]:
    """Jobs sharing texts take one image forward; the texts' embeddings come from ``cache``."""
    model = cache.model
    results: list[Predictions | None] = [None] * len(jobs)
    for members in group_indices(jobs, lambda j: j.texts):
        pixels = torch.cat([jobs[i].pixels for i in members]).to(model.device)
        with torch.inference_mode():
            images = model.encode_images(model.preprocess.normalise(pixels))  # (B, D)
            logits = model.similarity(images, cache.embeds(jobs[members[0]].texts)).float()
        first = 0
        for i in members:
            rows = logits[first : first + len(jobs[i].pixels)]
            first += len(jobs[i].pixels)
            results[i] = top_k_predictions(rows, jobs[i].top_k)
    return results  # type: ignore[return-value]


def explain_jobs(
    cache: TextCache,
    jobs: Sequence[ImageTextExplainJob],
    *,
    interrupted: Callable[[], bool] | None = None,
) -> list[ExplainResult]:
    """Every job's `ExplainResult` (B x K explanations, each with its text relevance)."""
    return by_group(jobs, lambda j: j.group, lambda g: _explain_group(cache, g, interrupted))


def _explain_group(
    cache: TextCache, jobs: list[ImageTextExplainJob], interrupted: Callable[[], bool] | None
) -> list[ExplainResult]:
    started = time.perf_counter()
    model = cache.model
    first = jobs[0]
    texts = cache.tokens(first.texts)
    pixels = torch.cat([job.pixels for job in jobs]).to(model.device)
    offsets = np.cumsum([0] + [len(job.pixels) for job in jobs])
    chosen: list[np.ndarray] = []  # per job, (B_j, K_j) text indices

    def choose(logits: Tensor) -> list[tuple[int, int]]:
        pairs = []
        for job, start in zip(jobs, offsets, strict=False):
            targets = _targets(logits[start : start + len(job.pixels)], job.target)
            chosen.append(targets)
            pairs += [(start + b, int(m)) for b, row in enumerate(targets) for m in row]
        return pairs

    logits, maps = explain_pairs(
        model,
        model.preprocess.normalise(pixels),
        texts,
        choose,
        method=first.method,
        params=first.params,
        images=pixels,
        matrix=first.relevance,
        interrupted=interrupted,
    )
    seconds = time.perf_counter() - started
    results, used = [], 0
    for job, start, targets in zip(jobs, offsets, chosen, strict=False):
        count = targets.size
        rows = logits[start : start + len(job.pixels)]
        found = maps[used : used + count]
        results.append(_result(job, rows, targets, found, texts, model.image_graph.grid, seconds))
        used += count
    return results


def _targets(logits: Tensor, target: TargetSpec | None) -> np.ndarray:
    """(B, K) text indices to explain for (B, M) logits."""
    batch, count = logits.shape
    if target is None:
        return np.tile(np.arange(count), (batch, 1))
    if target.kind == "index":
        return np.full((batch, 1), target.indices[0])
    if target.kind == "per_image":
        return np.asarray(target.indices, dtype=np.int64).reshape(batch, 1)
    k = target.k if target.kind == "top_k" else 1
    return logits.topk(k, dim=1).indices.cpu().numpy()


def _result(
    job: ImageTextExplainJob,
    logits: Tensor,
    targets: np.ndarray,
    maps: Sequence[PairMaps],
    texts: TokenizedTexts,
    grid: tuple[int, int],
    seconds: float,
) -> ExplainResult:
    batch, k = targets.shape
    heatmaps = torch.stack([m.heatmap for m in maps]).reshape(batch, k, *maps[0].heatmap.shape)
    size = tuple(job.pixels.shape[-2:]) if job.grid == "input" else grid
    heatmaps = resize_maps(heatmaps, size)  # saliency's pixel maps: patch means on "tokens"
    dtype = np.float16 if job.output_dtype == "float16" else np.float32
    relevance = None
    if job.relevance:
        matrices = torch.stack([m.matrix for m in maps])
        relevance = matrices.reshape(batch, k, *matrices.shape[1:]).cpu().numpy().astype(dtype)
    probabilities = logits.softmax(dim=1)
    index = torch.as_tensor(targets, device=logits.device)
    text_rows = []
    for b in range(batch):
        row = []
        for j in range(k):
            m = int(targets[b, j])
            where = text_positions(texts, m)
            values = maps[b * k + j].text[where].float().cpu().numpy()
            row.append(TextRelevance(texts.texts[m], texts.tokens[m][where], values))
        text_rows.append(tuple(row))
    return ExplainResult(
        predictions=top_k_predictions(logits, job.top_k_predictions),
        targets=targets.astype(np.int64),
        target_probabilities=probabilities.gather(1, index).cpu().numpy(),
        target_logits=logits.gather(1, index).cpu().numpy(),
        heatmaps=heatmaps.float().cpu().numpy().astype(dtype),
        relevance=relevance,
        compute_seconds=seconds,
        texts=tuple(text_rows),
    )


def by_group(jobs: Sequence, key: Callable, run: Callable[[list], Sequence]) -> list:
    """``run(group)`` for each group of jobs with equal ``key`` (one result per job of the
    group, in its order); every job's result, in the jobs' order."""
    results: list = [None] * len(jobs)
    for members in group_indices(jobs, key):
        for i, result in zip(members, run([jobs[i] for i in members]), strict=True):
            results[i] = result
    return results


def group_indices(jobs: Sequence, key: Callable) -> list[list[int]]:
    """Indices of the jobs, grouped by ``key`` in order of first appearance."""
    groups: dict[object, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(key(job), []).append(i)
    return list(groups.values())

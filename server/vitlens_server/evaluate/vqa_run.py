"""An Evaluate run on a VQA model: seed 003's token perturbation tests and question segmentation.

The run is CPU-side orchestration on its own thread; every model call goes through ``calls``
(`VqaCalls`: in the server the model's `VqaWorker`, batched with live traffic). Per chunk of
items: one Predict of the unperturbed pairs (the x = 0 point of every curve, shared by all
methods), then per method one explanation (the prediction, or with ``explain_label`` the
ground-truth answer; ``random`` needs none), whose text relevance (per word token) and image
relevance (per patch token, the patch grid in raster order) every metric reads:

    perturbation_image / perturbation_text   the modality's tokens removed by relevance (the
        model's own absent input, `BimodalModel.remove_tokens`), positive = most relevant first,
        negative = least relevant first, ⌊p·n⌋ of an item's n tokens at p = 0.1 ... 0.9
        (METHODS.md's 10 % steps); a hit is the top-1 answer equal to the ground truth (seed
        003 scores accuracy whatever the map explains). ``positive_auc`` / ``negative_auc``
        (x100, `perturbation_auc`) per item, curves ``positive`` / ``negative`` (mean hits at
        x = 0, 0.1, ..., 0.9): the classifier ``perturbation`` metric's shape. Every perturbed
        pair is one Predict pair with keep masks (`VqaPredictJob.text_keep` / ``image_keep``);
        the removal order and counts are `vqa_metrics.token_ranks` and its counting, so the hits
        equal `vqa_metrics.token_perturbation` on the model.
    segmentation   the explained answer's image map (patch grid) against the union of the masks
        of the objects the question is about (`vqa_metrics.question_segmentation`); questions
        about nothing (a "no", a "zero") are skipped, so ``n`` counts the scored items.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from vitlens_server.domain import ExplainResult, MetricSummary, Progress, Summary, TargetSpec
from vitlens_server.evaluate.perturbation import CHEFER_STEPS, _fraction_count, perturbation_auc
from vitlens_server.evaluate.registry import Curve, Scores
from vitlens_server.evaluate.runner import Cancelled
from vitlens_server.evaluate.segmentation import SegmentationOptions
from vitlens_server.evaluate.vqa_metrics import question_masks, question_segmentation, token_ranks
from vitlens_server.evaluate.vqa_plan import (
    RANDOM,
    SyntheticVqaDataset,
    VqaPlan,
    VqaPlannedMethod,
    register_vqa_metric,
)
from vitlens_server.explain.vqa_batch import (
    VqaExplainJob,
    VqaPredictJob,
    explain_vqa_jobs,
    predict_vqa_jobs,
)
from vitlens_server.models.vqa_serving import LoadedVqaModel

__all__ = ["VqaCalls", "VqaChunk", "VqaLocalCalls", "run_vqa_evaluation"]


class VqaCalls(Protocol):
    """Synchronous access to a VQA model, from the run's own thread."""

    def explain(self, job: VqaExplainJob) -> ExplainResult: ...

    def answers(self, jobs: Sequence[VqaPredictJob]) -> list[Tensor]:
        """Each job's (B,) long top-1 answers, all jobs submitted at once."""
        ...

    def words(self, questions: Sequence[str]) -> tuple[tuple[str, ...], ...]:
        """Each question's word tokens as the model reads them (`TextRelevance.tokens`)."""
        ...


@dataclass(frozen=True, eq=False)
class VqaChunk:
    """B items explained by one method, as the metrics read them.

    Attributes:
        pixels: (B, 3, S, S) float32 in [0, 1] at the model's input size.
        questions: the B question texts.
        truth: (B,) long, the model's index of each ground-truth answer.
        predicted: (B,) long, its top-1 answer to the unperturbed pair.
        text: (B, W) the explained answer's relevance per word token, 0 past an item's words.
        text_valid: (B, W) bool, True at an item's word tokens.
        maps: (B, gh, gw) its image relevance on the patch grid (tokens in raster order).
        masks: (B, S, S) bool, the objects each question is about.
        calls: the model.
    """

    pixels: Tensor
    questions: tuple[str, ...]
    truth: Tensor
    predicted: Tensor
    text: Tensor
    text_valid: Tensor
    maps: Tensor
    masks: Tensor
    calls: VqaCalls


@register_vqa_metric(
    "perturbation_image",
    description="Seed 003 image-token perturbation: answer accuracy as patch tokens go.",
)
def perturbation_image(ctx: VqaChunk, options: object) -> Scores:
    """``positive_auc`` / ``negative_auc`` (B,) x100 and hit curves (B, 10) over image tokens."""
    image = ctx.maps.flatten(1)  # (B, M)
    return _perturbation(ctx, "image_keep", image, torch.ones_like(image, dtype=torch.bool))


@register_vqa_metric(
    "perturbation_text",
    description="Seed 003 text-token perturbation: answer accuracy as question words go.",
)
def perturbation_text(ctx: VqaChunk, options: object) -> Scores:
    """``positive_auc`` / ``negative_auc`` (B,) x100 and hit curves (B, 10) over word tokens."""
    return _perturbation(ctx, "text_keep", ctx.text, ctx.text_valid)


@register_vqa_metric(
    "segmentation",
    options=SegmentationOptions,
    description="Image map versus the mask of the question's objects: pixel accuracy, IoU, F1.",
)
def segmentation(ctx: VqaChunk, options: SegmentationOptions) -> Scores:
    """`question_segmentation` of the items whose question is about an object."""
    found = question_segmentation(ctx.maps, ctx.masks, threshold=options.threshold)
    return Scores({key: value[found.valid] for key, value in found.scores.items()})


def _perturbation(ctx: VqaChunk, keep_field: str, relevance: Tensor, valid: Tensor) -> Scores:
    """Both directions' hits: 2 x len(CHEFER_STEPS) Predict jobs of the B pairs, at once."""
    totals = valid.sum(dim=1).tolist()
    limits = torch.tensor([[_fraction_count(p, n) for n in totals] for p in CHEFER_STEPS])
    jobs = []
    for positive in (True, False):
        ranks = token_ranks(relevance, valid, descending=positive)  # (B, N)
        for limit in limits:  # (B,)
            keep = {keep_field: ranks >= limit[:, None]}
            jobs.append(VqaPredictJob(ctx.pixels, ctx.questions, 1, **keep))
    answers = torch.stack(ctx.calls.answers(jobs)).reshape(2, len(CHEFER_STEPS), -1)  # (2, S, B)
    unperturbed = (ctx.predicted == ctx.truth)[:, None]  # (B, 1)
    values, curves = {}, {}
    for i, sign in enumerate(("positive", "negative")):
        hits = torch.cat([unperturbed, (answers[i] == ctx.truth).T], dim=1)  # (B, S+1)
        values[f"{sign}_auc"] = perturbation_auc(hits)
        curves[sign] = Curve((0.0, *CHEFER_STEPS), hits.double())
    return Scores(values, curves)


def run_vqa_evaluation(
    plan: VqaPlan,
    dataset: SyntheticVqaDataset,
    calls: VqaCalls,
    *,
    answers: Tensor,
    grid: tuple[int, int],
    progress: Callable[[Progress], None] = lambda _: None,
    cancelled: threading.Event | None = None,
) -> list[MetricSummary]:
    """Run ``plan`` over ``dataset``; one summary per method x metric, in plan order.

    ``answers`` (len(ANSWERS),) long: the model's index of each generated answer
    (`vqa_plan.answer_indices`); ``grid`` (gh, gw): its patch grid. Raises `Cancelled` once
    ``cancelled`` is set.
    """
    cancelled = cancelled or threading.Event()
    collected = {(m.name, k.name): _Collected() for m in plan.methods for k in plan.metrics}
    total, done, started = len(dataset) * len(plan.methods), 0, time.monotonic()
    for first in range(0, len(dataset), plan.chunk_size):
        _stop_if(cancelled)
        batch = dataset.chunk(first, min(plan.chunk_size, len(dataset) - first))
        pixels = torch.from_numpy(batch.images).permute(0, 3, 1, 2).float() / 255  # (B, 3, S, S)
        questions = tuple(q.text for q in batch.questions)
        truth = answers[batch.answers]  # (B,)
        (predicted,) = calls.answers([VqaPredictJob(pixels, questions, 1)])
        masks = question_masks(batch.scenes, batch.questions)  # (B, S, S)
        for method in plan.methods:
            _stop_if(cancelled)
            relevance = _relevance(plan, method, pixels, questions, truth, first, grid, calls)
            ctx = VqaChunk(pixels, questions, truth, predicted, *relevance, masks, calls)
            for metric in plan.metrics:
                _stop_if(cancelled)
                collected[(method.name, metric.name)].add(metric.spec.fn(ctx, metric.options))
            done += len(questions)
            rate = done / max(time.monotonic() - started, 1e-9)
            progress(Progress(done, total, rate, (total - done) / rate, method.name))
    return [collected[key].summary(*key) for key in collected]


def _relevance(
    plan: VqaPlan,
    method: VqaPlannedMethod,
    pixels: Tensor,
    questions: tuple[str, ...],
    truth: Tensor,
    first: int,
    grid: tuple[int, int],
    calls: VqaCalls,
) -> tuple[Tensor, Tensor, Tensor]:
    """(text (B, W), text_valid (B, W), maps (B, gh, gw)) of the method's explained answer."""
    if method.name == RANDOM:
        return _random(method.params.seed, first, grid, calls.words(questions))
    target = TargetSpec("per_image", tuple(truth.tolist())) if plan.explain_label else TargetSpec()
    job = VqaExplainJob(
        pixels, questions, method.name, target=target,
        averaging=getattr(method.params, "averaging", "gradient"), top_k_predictions=1,
    )  # fmt: skip
    result = calls.explain(job)
    rows = [texts[0].relevance for texts in result.texts]  # (n_b,) per item
    text, valid = _padded([torch.from_numpy(np.asarray(r, np.float32)) for r in rows])
    return text, valid, torch.from_numpy(result.heatmaps[:, 0]).float()


def _random(
    seed: int, first: int, grid: tuple[int, int], words: tuple[tuple[str, ...], ...]
) -> tuple[Tensor, Tensor, Tensor]:
    """U[0, 1) per word token and per patch token, from (``seed``, the item's dataset index)."""
    text, image = [], []
    for b, tokens in enumerate(words):
        rng = np.random.default_rng([seed, first + b])
        text.append(torch.from_numpy(rng.random(len(tokens), dtype=np.float32)))
        image.append(torch.from_numpy(rng.random(grid, dtype=np.float32)))
    return (*_padded(text), torch.stack(image))


def _padded(rows: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Rows of different lengths → (B, W) zero-padded and (B, W) bool valid."""
    width = max(1, max(len(r) for r in rows))
    values = torch.zeros(len(rows), width)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, row in enumerate(rows):
        values[b, : len(row)], valid[b, : len(row)] = row, True
    return values, valid


def _stop_if(cancelled: threading.Event) -> None:
    if cancelled.is_set():
        raise Cancelled("the evaluation was cancelled")


@dataclass
class _Collected:
    """One method x metric's per-chunk values and curves; an empty value (every question of
    the run about nothing, for segmentation) is reported with n = 0 and a NaN mean."""

    values: dict[str, list[np.ndarray]] = field(default_factory=dict)
    curves: dict[str, tuple[list[float], list[np.ndarray]]] = field(default_factory=dict)

    def add(self, scores: Scores) -> None:
        for name, tensor in scores.values.items():
            self.values.setdefault(name, []).append(tensor.detach().double().cpu().numpy())
        for name, curve in scores.curves.items():
            parts = self.curves.setdefault(name, (list(map(float, curve.x)), []))[1]
            parts.append(curve.y.detach().double().cpu().numpy())

    def summary(self, method: str, metric: str) -> MetricSummary:
        stats = {}
        for name, parts in self.values.items():
            values = np.concatenate(parts)
            stats[name] = Summary.of(values) if len(values) else Summary(float("nan"), 0, 0, 0)
        curves = {
            name: (x, np.concatenate(parts).mean(axis=0).tolist())
            for name, (x, parts) in self.curves.items()
        }
        return MetricSummary(method, metric, stats, curves)


class VqaLocalCalls:
    """`VqaCalls` in process: the model called directly (tests, notebooks), explanations in
    batches of at most ``max_batch_size`` pairs, as a worker splits them (None: one batch)."""

    def __init__(self, model: LoadedVqaModel, max_batch_size: int | None = None) -> None:
        self.model, self.max_batch_size = model, max_batch_size

    def explain(self, job: VqaExplainJob) -> ExplainResult:
        size = self.max_batch_size or job.size
        parts = [
            dataclasses.replace(
                job,
                pixels=job.pixels[start : start + size],
                questions=job.questions[start : start + size],
                target=job.target.subset(range(start, min(start + size, job.size))),
            )
            for start in range(0, job.size, size)
        ]
        return ExplainResult.concat([explain_vqa_jobs(self.model, [part])[0] for part in parts])

    def answers(self, jobs: Sequence[VqaPredictJob]) -> list[Tensor]:
        return [torch.from_numpy(p.indices[:, 0]) for p in predict_vqa_jobs(self.model, jobs)]

    def words(self, questions: Sequence[str]) -> tuple[tuple[str, ...], ...]:
        return word_tokens(self.model, questions)


def word_tokens(model: LoadedVqaModel, questions: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """Each question's word tokens: the tokenizer's pieces, without CLS and SEP."""
    return tuple(tuple(model.adapter.tokenizer.tokenize(q)) for q in questions)

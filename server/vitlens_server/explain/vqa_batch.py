"""Batches of VQA jobs: requests that share method and output options run as one explanation.

A job is one request (or a chunk of one): its images (pixels, or request regions), one question
per image, what to explain, and the output options. Jobs of a batch with equal `VqaExplainJob
.group` are fused into one `explain_bimodal` call: one forward pass of all their (image,
question) pairs, one backward pass per target rank. Each job's answers, heatmaps (on the patch
grid: ViLT's patches, or the front-end's patches a region model reads), per-region relevance
(request regions), question-token relevance and, on request, its relevance matrices — cropped to
the item's own tokens, so a result never depends on its batch-mates — come back as an
`ExplainResult`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from vitlens_server.domain import (
    ExplainResult,
    Predictions,
    RelevanceMatrix,
    TargetSpec,
    TextRelevance,
)
from vitlens_server.explain.bimodal import BIMODAL_METHODS, BimodalExplanation, explain_bimodal
from vitlens_server.explain.engine import resize_maps, top_k_predictions
from vitlens_server.explain.image_text_batch import by_group, group_indices
from vitlens_server.models.bimodal import BimodalInputs, BimodalTokens
from vitlens_server.models.vqa_serving import LoadedVqaModel

__all__ = ["VqaExplainJob", "VqaPredictJob", "explain_vqa_jobs", "predict_vqa_jobs"]

Regions = tuple[tuple[Tensor, Tensor], ...]  # per image: features (R, F), boxes (R, 4)


@dataclass(frozen=True)
class VqaExplainJob:
    """Explain B (image, question) pairs.

    ``pixels`` (B, 3, S, S) in [0, 1], and for models on request regions ``regions`` per
    image (which the model then reads instead); ``questions`` one per image; ``target``
    selects among the answers as a classifier's target selects among classes; ``averaging``
    generic's head averaging.
    """

    pixels: Tensor
    questions: tuple[str, ...]
    method: str
    regions: Regions | None = None
    target: TargetSpec = field(default_factory=TargetSpec)
    averaging: str = "gradient"
    grid: Literal["tokens", "input"] = "tokens"
    relevance: bool = False
    top_k_predictions: int = 5
    output_dtype: Literal["float32", "float16"] = "float32"

    @property
    def size(self) -> int:
        return len(self.questions)

    @property
    def group(self) -> tuple:
        """Jobs with equal groups run as one explanation."""
        return (
            self.method,
            self.averaging,
            self.grid,
            self.relevance,
            self.target.count,
            self.regions is None,
        )


@dataclass(frozen=True)
class VqaPredictJob:
    """Answer B (image, question) pairs (``regions`` as for `VqaExplainJob`); the top
    ``top_k`` answers of each.

    ``text_keep`` (B, W) / ``image_keep`` (B, M) bool, for token perturbation (seed 003 §4):
    False at the tokens removed as the model's own absent input (`BimodalModel.remove_tokens`).
    Column j of ``text_keep`` is the question's j-th word token (`TextRelevance.tokens`: CLS and
    SEP always stay); column m of ``image_keep`` its m-th image token (the patch grid in raster
    order, or the m-th region); columns past an item's tokens are ignored. None: all are read.
    """

    pixels: Tensor
    questions: tuple[str, ...]
    top_k: int
    regions: Regions | None = None
    text_keep: Tensor | None = None
    image_keep: Tensor | None = None

    def __post_init__(self) -> None:
        for name, keep in (("text_keep", self.text_keep), ("image_keep", self.image_keep)):
            if keep is not None and (keep.dim() != 2 or keep.shape[0] != self.size):
                raise ValueError(f"{name} must be ({self.size}, N); got {tuple(keep.shape)}")

    @property
    def size(self) -> int:
        return len(self.questions)

    def rows(self, rows: slice) -> VqaPredictJob:
        """The job of pairs ``rows`` (keep masks included)."""
        return dataclasses.replace(
            self,
            pixels=self.pixels[rows],
            questions=self.questions[rows],
            regions=None if self.regions is None else self.regions[rows],
            text_keep=None if self.text_keep is None else self.text_keep[rows],
            image_keep=None if self.image_keep is None else self.image_keep[rows],
        )


def batch_inputs(model: LoadedVqaModel, jobs: Sequence[VqaExplainJob | VqaPredictJob]):
    """The jobs' pairs as one `BimodalInputs` (regions padded to the most of any image)."""
    questions = [q for job in jobs for q in job.questions]
    if jobs[0].regions is None:
        pixels = torch.cat([job.pixels for job in jobs])
        return model.inputs(questions, pixels=pixels)
    regions = [r for job in jobs for r in job.regions or ()]
    most = max(len(features) for features, _ in regions)
    width = regions[0][0].shape[1]
    features = torch.zeros(len(regions), most, width)
    boxes = torch.zeros(len(regions), most, 4)
    mask = torch.zeros(len(regions), most, dtype=torch.long)
    for b, (f, box) in enumerate(regions):
        features[b, : len(f)], boxes[b, : len(f)], mask[b, : len(f)] = f, box, 1
    inputs = model.inputs(questions, regions=(features, boxes))
    return BimodalInputs(
        inputs.ids, inputs.text_mask, regions=inputs.regions, boxes=inputs.boxes,
        region_mask=mask.to(inputs.ids.device),
    )  # fmt: skip


def predict_vqa_jobs(model: LoadedVqaModel, jobs: Sequence[VqaPredictJob]) -> list[Predictions]:
    """One forward pass for all the jobs' pairs (their removed tokens taken out)."""
    results: list[Predictions | None] = [None] * len(jobs)
    for members in group_indices(jobs, lambda j: j.regions is None):
        group = [jobs[i] for i in members]
        with torch.inference_mode():
            logits = model.adapter(_removed(model, group, batch_inputs(model, group))).float()
        first = 0
        for i in members:
            results[i] = top_k_predictions(logits[first : first + jobs[i].size], jobs[i].top_k)
            first += jobs[i].size
    return results  # type: ignore[return-value]


def _removed(
    model: LoadedVqaModel, jobs: Sequence[VqaPredictJob], inputs: BimodalInputs
) -> BimodalInputs:
    """``inputs`` without the tokens the jobs' keep masks remove (unchanged if none has one)."""
    texts = [job.text_keep for job in jobs if job.text_keep is not None]
    images = [job.image_keep for job in jobs if job.image_keep is not None]
    if not texts and not images:
        return inputs
    tokens = model.adapter.tokens(inputs)
    text = image = None
    if texts:
        width = max(keep.shape[1] for keep in texts)
        keep = _kept(jobs, "text_keep", width).to(tokens.text_valid.device)  # (B, W) per word
        valid = tokens.text_valid  # (B, T), the word tokens in order
        word = valid.long().cumsum(dim=1) - 1  # (B, T): which word each position is
        text = valid & (word < width) & ~keep.gather(1, word.clamp(0, width - 1))
    if images:
        valid = tokens.image_valid  # (B, M)
        image = valid & ~_kept(jobs, "image_keep", valid.shape[1]).to(valid.device)
    return model.adapter.remove_tokens(inputs, text=text, image=image)


def _kept(jobs: Sequence[VqaPredictJob], name: str, width: int) -> Tensor:
    """(ΣB, width) bool: the jobs' ``name`` masks cut or padded (True) to ``width``; all True
    for a job without one."""
    rows = []
    for job in jobs:
        keep = torch.ones(job.size, width, dtype=torch.bool)
        given = getattr(job, name)
        if given is not None:
            cols = min(width, given.shape[1])
            keep[:, :cols] = given[:, :cols].bool().cpu()
        rows.append(keep)
    return torch.cat(rows)


def explain_vqa_jobs(
    model: LoadedVqaModel,
    jobs: Sequence[VqaExplainJob],
    *,
    interrupted: Callable[[], bool] | None = None,
) -> list[ExplainResult]:
    """Every job's `ExplainResult` (B x K explanations)."""
    return by_group(jobs, lambda j: j.group, lambda g: _explain_group(model, g, interrupted))


def _explain_group(
    model: LoadedVqaModel, jobs: list[VqaExplainJob], interrupted: Callable[[], bool] | None
) -> list[ExplainResult]:
    started = time.perf_counter()
    first = jobs[0]
    inputs = batch_inputs(model, jobs)
    offsets = np.cumsum([0] + [job.size for job in jobs])

    def choose(logits: Tensor) -> Tensor:
        return torch.cat(
            [
                _targets(logits[start : start + job.size], job.target)
                for job, start in zip(jobs, offsets, strict=False)
            ]
        )

    out = explain_bimodal(
        model.adapter,
        inputs,
        BIMODAL_METHODS[first.method],
        targets=choose,
        averaging=first.averaging,
        matrices=first.relevance,
        interrupted=interrupted,
    )
    seconds = time.perf_counter() - started
    _, _, words = model.adapter.tokenize([q for job in jobs for q in job.questions])
    return [
        _result(model, job, out, inputs, words, slice(int(start), int(start) + job.size), seconds)
        for job, start in zip(jobs, offsets, strict=False)
    ]


def _targets(logits: Tensor, target: TargetSpec) -> Tensor:
    """(B, K) answer indices to explain for (B, A) logits."""
    batch = logits.shape[0]
    if target.kind == "index":
        return torch.full((batch, 1), target.indices[0], device=logits.device)
    if target.kind == "per_image":
        return torch.tensor(target.indices, device=logits.device).reshape(batch, 1)
    k = target.k if target.kind == "top_k" else 1
    return logits.topk(k, dim=1).indices


def _result(
    model: LoadedVqaModel,
    job: VqaExplainJob,
    out: BimodalExplanation,
    inputs: BimodalInputs,
    words: tuple[tuple[str, ...], ...],
    rows: slice,
    seconds: float,
) -> ExplainResult:
    dtype = np.float16 if job.output_dtype == "float16" else np.float32
    logits, targets = out.logits[rows].float(), out.targets[rows]  # (B, A), (B, K)
    tokens = out.tokens
    image = out.image[rows].float()  # (B, K, M)
    regions = None
    if job.regions is None:
        heatmaps = _heatmaps(model, tokens, image, rows)
        if job.grid == "input":
            heatmaps = resize_maps(heatmaps, (model.image_size, model.image_size))
        heatmaps_np = heatmaps.cpu().numpy().astype(dtype)
    else:
        counts = [len(f) for f, _ in job.regions]
        regions = tuple(image[b, :, :n].cpu().numpy().astype(dtype) for b, n in enumerate(counts))
        heatmaps_np = np.zeros((job.size, targets.shape[1], 0, 0), dtype=dtype)
    texts = []
    for b in range(job.size):
        item = rows.start + b
        valid = tokens.text_valid[item].cpu()
        strings = tuple(w for w, keep in zip(words[item], valid.tolist(), strict=False) if keep)
        values = out.text[item].float().cpu()[:, : len(valid)][:, valid].numpy()
        texts.append(
            tuple(TextRelevance(job.questions[b], strings, values[k]) for k in range(len(values)))
        )
    probabilities = logits.softmax(dim=1)
    return ExplainResult(
        predictions=top_k_predictions(logits, job.top_k_predictions),
        targets=targets.cpu().numpy().astype(np.int64),
        target_probabilities=probabilities.gather(1, targets).cpu().numpy(),
        target_logits=logits.gather(1, targets).cpu().numpy(),
        heatmaps=heatmaps_np,
        relevance=None,
        compute_seconds=seconds,
        texts=tuple(texts),
        regions=regions,
        matrices=_matrices(out, inputs, rows, dtype) if job.relevance else None,
    )


def _heatmaps(model: LoadedVqaModel, tokens: BimodalTokens, image: Tensor, rows: slice) -> Tensor:
    """(B, K, gh, gw) image relevance on the patch grid: ViLT's patch cells, or the front-end's
    patches in raster order."""
    b, k, m = image.shape
    if tokens.patch_cells is not None:
        own = dataclasses.replace(
            tokens, patch_cells=tokens.patch_cells[rows], image_valid=tokens.image_valid[rows]
        )
        return torch.stack([own.to_grid(image[:, j]) for j in range(k)], dim=1)
    grid = model.patch_grid
    assert grid is not None and grid[0] * grid[1] == m, (grid, m)
    return image.reshape(b, k, *grid)


def _matrices(
    out: BimodalExplanation, inputs: BimodalInputs, rows: slice, dtype: type
) -> tuple[tuple[tuple[RelevanceMatrix, ...], ...], ...]:
    """Per item, per rank, every matrix cropped to the item's own tokens."""
    assert out.matrices is not None
    tokens = out.tokens
    items = []
    for item in range(rows.start, rows.stop):
        keep = _own_positions(tokens, inputs, item)
        ranks = []
        for relevance in out.matrices:
            pairs = []
            for (queries, keys), matrix in sorted(relevance.matrices.items()):
                m = matrix[item][keep[queries]][:, keep[keys]]
                pairs.append(RelevanceMatrix(queries, keys, m.float().cpu().numpy().astype(dtype)))
            ranks.append(tuple(pairs))
        items.append(tuple(ranks))
    return tuple(items)


def _own_positions(tokens: BimodalTokens, inputs: BimodalInputs, item: int) -> dict[str, Tensor]:
    """Per token set, the positions of item ``item``'s own tokens (not batch padding)."""
    text_mask = inputs.text_mask[item].bool()
    text = tokens.text_positions[text_mask.to(tokens.text_positions.device)]
    image = tokens.image_positions[tokens.image_valid[item].to(tokens.image_positions.device)]
    if tokens.text_set != tokens.image_set:
        return {tokens.text_set: text, tokens.image_set: image}
    size = tokens.sizes[tokens.text_set]
    own = torch.zeros(size, dtype=torch.bool, device=text.device)
    others = torch.ones(size, dtype=torch.bool, device=text.device)
    own[text], own[image] = True, True
    others[tokens.text_positions], others[tokens.image_positions] = False, False
    return {tokens.text_set: torch.nonzero(own | others).flatten()}  # + an image CLS

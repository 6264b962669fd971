"""Explanations of DETR detections: each detection's relevance over the image and over the queries.

One forward pass of B images keeps every attention map (`DetrDetector.run`). The detections of
image b are its queries whose most probable object class has probability above a threshold
(`select_detections`), ranked by that probability; detection (b, r) — query q_br, class c_br —
is explained for its class logit y_br = logits[b, q_br, c_br], as seed 003's DETR code does.
Images do not interact, so the r-th detections of all images share one gradient: the sum over b
of y_br. The ranks' gradients come from one vectorised backward pass
(``torch.autograd.grad(..., is_grads_batched=True)``, R one-hot rows over the (B, R) targets) or
from R ordinary backward passes through the same graph; both serve a whole batch, and both beat
one call per detection 4.4x at 8 detections per image on the 2-core CPU, where the R passes are
3-7 % faster than the vectorised one (`scripts/bench_detr.py`, benchmarks/detr_explain.md). So
the default is the R passes on CPU and the vectorised pass on CUDA, where one pass instead of R
saves kernel launches (not yet measured: no GPU was lent; `scripts/gpu_checks.sh` times both).
The method then turns each rank's maps into relevance matrices over `detr_graph`:

    generic          Eq. 6 on the encoder, Eq. 6-7 on decoder self-attention, Eq. 10 on
                     cross-attention (`explain.graph.propagate`); detection j's map is row j of
                     R^{queries image} (seed 003 §3.1)
    raw_attention    the last cross-attention map, head mean, row j; not class-specific
    rollout          rollout of the encoder and of the decoder self-attention, Eq. 12 with the
                     last cross-attention map: R^{qi} = (R^{qq})ᵀ·Ā·R^{ii}
    gradcam          the last cross-attention map weighted per head by its mean gradient, ReLU
    partial_lrp      the last cross-attention map's LRP relevance (R^A)⁺, head mean, row j
    transformer_attribution
                     Eq. 13 averaging, mean_h((∇A ⊙ R^A)⁺), with Eq. 6 on the encoder's and the
                     decoder's self-attention; the last cross-attention map averaged the same way
                     (seed 003's baseline, `graph.attribution`)
    generic, averaging=lrp
                     the rules above with Eq. 13's averaging (seed 003 §3.3)

R^A, each map's LRP relevance from the detection's one-hot class logit, comes from
`explain.detection_lrp` (one walk per rank serves every image).

A detection's query relevance is row j of R^{queries queries}: how much each query's state
mattered to it. Methods without gradients compute one set of matrices for all ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from vitlens_server.explain.bimodal import BimodalMethod
from vitlens_server.explain.detection_lrp import detr_attention_relevances, record_detr_lrp
from vitlens_server.explain.graph import (
    GraphRelevance,
    LayerMaps,
    attribution,
    gradcam,
    partial_lrp,
    propagate,
    raw_attention,
    read_rows,
    rollout,
)
from vitlens_server.explain.passes import raise_if_interrupted
from vitlens_server.models.detection.detr import DETECTION, QUERIES, DetrDetector, DetrPass

__all__ = [
    "DETECTION_METHODS",
    "DetectionExplanation",
    "explain_detections",
    "select_detections",
]


DETECTION_METHODS: dict[str, BimodalMethod] = {
    m.name: m
    for m in (
        BimodalMethod(
            "generic",
            "Chefer, Gur & Wolf (ICCV 2021) Eq. 5-10 over DETR's attention graph: encoder and "
            "decoder self-attention (Eq. 6-7) and cross-attention (Eq. 10) updates from "
            "gradient-weighted attention; detection j's map is row j of R^{queries image}",
            gradient=True,
            lrp=False,
            class_specific=True,
            combine=propagate,
        ),
        BimodalMethod(
            "raw_attention",
            "the detection's query's row of the last cross-attention map, head mean; not "
            "class-specific",
            gradient=False,
            lrp=False,
            class_specific=False,
            combine=raw_attention,
        ),
        BimodalMethod(
            "rollout",
            "attention rollout (Abnar & Zuidema 2020) on the encoder and the decoder "
            "self-attention, joined by seed 003 Eq. 12 through the last cross-attention map",
            gradient=False,
            lrp=False,
            class_specific=False,
            combine=rollout,
        ),
        BimodalMethod(
            "gradcam",
            "Grad-CAM on the last cross-attention map (as seed 003 adapts it): heads weighted "
            "by their mean gradient, head mean, ReLU",
            gradient=True,
            lrp=False,
            class_specific=True,
            combine=gradcam,
        ),
        BimodalMethod(
            "partial_lrp",
            "partial LRP (Voita et al. 2019, a baseline of seed 003): the last cross-attention "
            "map's LRP relevance, positive part, head mean",
            gradient=False,
            lrp=True,
            class_specific=True,
            combine=partial_lrp,
        ),
        BimodalMethod(
            "transformer_attribution",
            "Transformer Attribution (Chefer, Gur & Wolf, CVPR 2021) as seed 003 runs it on "
            "DETR: mean_h((dy/dA * R^A)+) accumulated over self-attention, the last "
            "cross-attention map averaged the same way",
            gradient=True,
            lrp=True,
            class_specific=True,
            combine=attribution,
        ),
    )
}


def select_detections(
    logits: Tensor, threshold: float = 0.5, most: int | None = None
) -> tuple[Tensor, ...]:
    """Per image, the queries (n_b,) whose top object class has probability > ``threshold``,
    most probable first, at most ``most``. logits: (B, Q, C + 1)."""
    scores = logits.detach().float().softmax(-1)[..., :-1].amax(-1)  # (B, Q)
    found = []
    for row in scores:
        order = row.argsort(descending=True)
        kept = order[row[order] > threshold]
        found.append(kept if most is None else kept[:most])
    return tuple(found)


@dataclass(frozen=True)
class DetectionExplanation:
    """B images' detections, explained.

    Attributes:
        logits: (B, Q, C + 1) class logits; boxes: (B, Q, 4) (cx, cy, w, h), fractions.
        queries: per image, the explained queries (n_b,) in rank order.
        classes: per image, the explained class of each (n_b,).
        image: per image, (n_b, N) relevance of the N image tokens for each detection.
        query_relevance: per image, (n_b, Q) relevance of every query for each detection.
        grid: (gh, gw) of the image tokens (row-major).
    """

    logits: Tensor
    boxes: Tensor
    queries: tuple[Tensor, ...]
    classes: tuple[Tensor, ...]
    image: tuple[Tensor, ...]
    query_relevance: tuple[Tensor, ...]
    grid: tuple[int, int]

    def heatmaps(self, b: int) -> Tensor:
        """Image b's detection maps on the token grid, (n_b, gh, gw)."""
        return self.image[b].reshape(-1, *self.grid)


Selection = Sequence[Tensor] | Callable[[Tensor], Sequence[Tensor]]


def explain_detections(
    detector: DetrDetector,
    pixels: Tensor,
    method: BimodalMethod,
    *,
    select: Selection | None = None,
    averaging: str = "gradient",
    batched: bool | None = None,
    interrupted: Callable[[], bool] | None = None,
) -> DetectionExplanation:
    """Explain the detections of B normalised images (B, 3, H, W) with ``method``.

    Args:
        select: per image the query indices to explain, (n_b,) each, or a function of the
            (B, Q, C + 1) logits giving them; None: `select_detections` at 0.5.
        averaging: ``generic``'s head averaging, ``"gradient"`` (Eq. 5) or ``"lrp"`` (Eq. 13).
        batched: one vectorised backward pass for every rank, or (False) one pass per rank;
            None: vectorised on CUDA, per rank elsewhere (module docstring).
        interrupted: checked before the backward pass(es) and each rank's relevance.
    """
    if averaging not in ("gradient", "lrp"):
        raise ValueError(f"averaging must be 'gradient' or 'lrp', got {averaging!r}")
    use_lrp = method.lrp or (method.name == "generic" and averaging == "lrp")
    with torch.enable_grad(), record_detr_lrp(detector) if use_lrp else nullcontext() as tape:
        run = detector.run(pixels, with_grad=method.gradient)
        chosen = _chosen(run.logits, select)
        rank_queries, valid = _padded(chosen, run.logits.device)  # (B, R) each
        classes = run.logits.detach()[..., :-1].argmax(-1).gather(1, rank_queries)  # (B, R)
        raise_if_interrupted(interrupted)
        vectorised = pixels.is_cuda if batched is None else batched
        grads = (
            _gradients(run, rank_queries, classes, valid, vectorised) if method.gradient else None
        )
    graph = detector.graph()
    ranks = rank_queries.shape[1]
    images, queries = [], []
    shared = None
    if not method.gradient and not use_lrp:
        shared = method.combine(graph, _layers(run, None))
    for rank in range(ranks):
        raise_if_interrupted(interrupted)
        if shared is not None:
            relevance = shared
        else:
            layers = _layers(run, None if grads is None else [g[rank] for g in grads])
            if use_lrp:
                found = detr_attention_relevances(
                    detector, tape, run.maps, rank_queries[:, rank], classes[:, rank]
                )
                layers = [LayerMaps(r, m.gradient) for r, m in zip(found, layers, strict=True)]
            relevance = method.combine(graph, layers)
        rows = rank_queries[:, rank]
        images.append(relevance.read(DETECTION, rows=rows)["image"])  # (B, N)
        queries.append(_query_rows(relevance, rows))  # (B, Q)
    image = torch.stack(images, 1) if ranks else run.logits.new_zeros(len(chosen), 0, 0)
    query = torch.stack(queries, 1) if ranks else run.logits.new_zeros(len(chosen), 0, 0)
    counts = [len(c) for c in chosen]
    return DetectionExplanation(
        logits=run.logits.detach(),
        boxes=run.boxes.detach(),
        queries=tuple(chosen),
        classes=tuple(classes[b, :n] for b, n in enumerate(counts)),
        image=tuple(image[b, :n] for b, n in enumerate(counts)),
        query_relevance=tuple(query[b, :n] for b, n in enumerate(counts)),
        grid=run.grid,
    )


def _chosen(logits: Tensor, select: Selection | None) -> list[Tensor]:
    found = select_detections(logits) if select is None else select
    if callable(found):
        found = found(logits.detach())
    chosen = [torch.as_tensor(q, dtype=torch.long, device=logits.device) for q in found]
    if len(chosen) != logits.shape[0]:
        raise ValueError(f"select gives {len(chosen)} images' queries for {logits.shape[0]}")
    for b, q in enumerate(chosen):
        if q.dim() != 1 or (len(q) and (q.min() < 0 or q.max() >= logits.shape[1])):
            raise ValueError(f"image {b}: queries must be (n,) indices below {logits.shape[1]}")
    return chosen


def _padded(chosen: list[Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """(B, R) query of each image's rank r (0 past its detections) and (B, R) validity."""
    ranks = max((len(q) for q in chosen), default=0)
    queries = torch.zeros(len(chosen), ranks, dtype=torch.long, device=device)
    valid = torch.zeros(len(chosen), ranks, dtype=torch.bool, device=device)
    for b, q in enumerate(chosen):
        queries[b, : len(q)], valid[b, : len(q)] = q, True
    return queries, valid


def _gradients(
    run: DetrPass, queries: Tensor, classes: Tensor, valid: Tensor, batched: bool
) -> list[Tensor]:
    """∂y/∂A per edge, (R, B, h, q, k): rank r's maps hold ∂(Σ_b y_br)/∂A."""
    batch, ranks = queries.shape
    if ranks == 0:
        return [m.new_zeros(0, *m.shape) for m in run.maps]
    items = torch.arange(batch, device=queries.device)[:, None]
    scores = run.logits[items, queries, classes] * valid  # (B, R)
    if batched:
        one_hot = torch.eye(ranks, dtype=scores.dtype, device=scores.device)  # (R, R)
        rows = one_hot[:, None, :].expand(ranks, batch, ranks)  # (R, B, R): rank r's targets
        return list(torch.autograd.grad(scores, run.maps, rows, is_grads_batched=True))
    per_rank = [
        torch.autograd.grad(scores[:, r].sum(), run.maps, retain_graph=r < ranks - 1)
        for r in range(ranks)
    ]
    return [torch.stack(maps) for maps in zip(*per_rank, strict=True)]


def _layers(run: DetrPass, grads: list[Tensor] | None) -> list[LayerMaps]:
    if grads is None:
        return [LayerMaps(a.detach()) for a in run.maps]
    return [LayerMaps(a.detach(), g) for a, g in zip(run.maps, grads, strict=True)]


def _query_rows(relevance: GraphRelevance, rows: Tensor) -> Tensor:
    """(B, Q): row ``rows[b]`` of R^{queries queries} of each image."""
    return read_rows(relevance.matrix(QUERIES, QUERIES), rows)

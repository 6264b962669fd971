"""Jobs, the batch they form, and the method steps the engine runs over one forward pass.

`Explainer.explain_batch` (engine.py) builds a `Batch` of its jobs, runs one forward pass for all
of them (`Forward`), then the steps below: `gradient_outcomes` (one backward pass per target rank
serving every gradient job) and `forward_outcomes` (every other job). Each returns one `Outcome`
per job it served: the method's outputs, one per explained class, or the exception that failed
that job alone. `Interrupted` always propagates: it stops the whole batch.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from vitlens_server.domain import TargetSpec
from vitlens_server.explain.passes import Interrupted, raise_if_interrupted
from vitlens_server.explain.recording import Capture
from vitlens_server.explain.records import Recording
from vitlens_server.explain.registry import MethodOutput, MethodSpec, Pass

__all__ = [
    "Batch",
    "ExplainJob",
    "Forward",
    "Outcome",
    "explained_classes",
    "forward_outcomes",
    "gradient_outcomes",
]

Outcome = tuple[MethodOutput, ...] | Exception
"""A job's method outputs, one per explained class (K), or the exception that failed it."""

Interruption = Callable[[], bool] | None


@dataclass(frozen=True)
class ExplainJob:
    """One batch to explain. ``pixels`` is (B, C, H, W) float32 in [0, 1] at the input size."""

    pixels: Tensor
    method: MethodSpec
    params: object
    target: TargetSpec
    grid: Literal["tokens", "input", "native"] = "tokens"  # native: as the method makes it
    relevance: bool = False
    top_k_predictions: int = 5
    output_dtype: Literal["float32", "float16"] = "float32"


@dataclass(frozen=True)
class Batch:
    """Jobs explained from one capture.

    Attributes:
        jobs: the jobs, in order.
        rows: each job's rows in ``pixels``.
        pixels: (ΣB, C, H, W) every job's images, concatenated.
        passes: the union of the passes the jobs' methods need.
    """

    jobs: tuple[ExplainJob, ...]
    rows: tuple[slice, ...]
    pixels: Tensor
    passes: Pass

    @classmethod
    def of(cls, jobs: Sequence[ExplainJob]) -> Batch:
        rows, first = [], 0
        for job in jobs:
            rows.append(slice(first, first + job.pixels.shape[0]))
            first += job.pixels.shape[0]
        pixels = torch.cat([job.pixels for job in jobs]) if len(jobs) > 1 else jobs[0].pixels
        passes = functools.reduce(operator.or_, (job.method.passes for job in jobs))
        return cls(tuple(jobs), tuple(rows), pixels, passes)

    @functools.cached_property
    def gradient_jobs(self) -> tuple[int, ...]:
        """Indices of the jobs whose methods read attention gradients (`Pass.BACKWARD`)."""
        return tuple(i for i, job in enumerate(self.jobs) if Pass.BACKWARD in job.method.passes)


@dataclass(frozen=True)
class Forward:
    """The batch's one forward pass.

    Attributes:
        capture: its recording and logits (with the graph when the batch has gradient jobs).
        scores: (ΣB, classes) float32 logits, detached.
        targets: per job, (B_i, K_i) the classes it explains, in rank order.
    """

    capture: Capture
    scores: Tensor
    targets: tuple[Tensor, ...]


def explained_classes(logits: Tensor, target: TargetSpec) -> Tensor:
    """(B, K) class indices to explain, from (B, classes) logits."""
    batch = logits.shape[0]
    if target.kind == "top_k":
        return logits.topk(target.k, dim=1).indices
    if target.kind == "index":
        return torch.full((batch, 1), target.indices[0], device=logits.device)
    if target.kind == "per_image":
        return torch.tensor(target.indices, device=logits.device).view(batch, 1)
    return logits.argmax(dim=1, keepdim=True)


def gradient_outcomes(
    batch: Batch, forward: Forward, interrupted: Interruption
) -> dict[int, Outcome]:
    """The gradient jobs: one backward pass per target rank k, then each job's method.

    Backward k serves every job explaining more than k classes (the others weigh 0 in it) whose
    method has not failed; ``interrupted`` is asked before each backward and each method call.
    """
    jobs = batch.gradient_jobs
    if not jobs:
        return {}
    ranks = max(forward.targets[i].shape[1] for i in jobs)
    outputs: dict[int, list[MethodOutput]] = {i: [] for i in jobs}
    failed: dict[int, Exception] = {}
    for rank in range(ranks):
        live = [i for i in jobs if rank < forward.targets[i].shape[1] and i not in failed]
        if not live:
            break
        raise_if_interrupted(interrupted)
        rec = _rank_gradients(batch, forward, live, rank, retain=rank < ranks - 1)
        with torch.no_grad():
            for i in live:
                sub = rec.narrow(batch.rows[i])
                outcome = _call(batch.jobs[i], sub, forward.targets[i][:, rank], interrupted)
                if isinstance(outcome, Exception):
                    failed[i] = outcome
                else:
                    outputs[i].append(outcome)
    return {i: failed.get(i, tuple(outputs[i])) for i in jobs}


def forward_outcomes(
    batch: Batch, forward: Forward, interrupted: Interruption
) -> dict[int, Outcome]:
    """The jobs without gradients: one method call per explained class, or one map repeated for
    every class when the method is class-agnostic."""
    recording = forward.capture.recording
    outcomes: dict[int, Outcome] = {}
    with torch.no_grad():
        for i, job in enumerate(batch.jobs):
            if i not in batch.gradient_jobs:
                rec = recording.narrow(batch.rows[i])
                outcomes[i] = _forward_method(job, rec, forward.targets[i], interrupted)
    return outcomes


def _rank_gradients(
    batch: Batch, forward: Forward, live: list[int], rank: int, *, retain: bool
) -> Recording:
    """The recording with the gradients of the rank-``rank`` class logits of the ``live`` jobs."""
    logits = forward.capture.logits  # (ΣB, classes)
    index = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    weight = torch.zeros(logits.shape[0], dtype=logits.dtype, device=logits.device)
    for i in live:
        index[batch.rows[i]] = forward.targets[i][:, rank]
        weight[batch.rows[i]] = 1
    return forward.capture.gradients(index, weight, retain=retain)


def _forward_method(
    job: ExplainJob, rec: Recording, targets: Tensor, interrupted: Interruption
) -> Outcome:
    classes = targets.shape[1]
    outputs = []
    for rank in range(classes if job.method.class_specific else 1):
        outcome = _call(job, rec, targets[:, rank], interrupted)
        if isinstance(outcome, Exception):
            return outcome
        outputs.append(outcome)
    return tuple(outputs) if job.method.class_specific else tuple(outputs) * classes


def _call(
    job: ExplainJob, rec: Recording, targets: Tensor, interrupted: Interruption
) -> MethodOutput | Exception:
    """``job``'s method on its rows for ``targets`` (B,); its failure is returned, not raised."""
    raise_if_interrupted(interrupted)
    try:
        if not job.relevance:
            rec = dataclasses.replace(rec, relevance_wanted=False)
        return job.method.fn(rec, targets, job.params)
    except Interrupted:
        raise
    except Exception as err:  # this job only
        return err

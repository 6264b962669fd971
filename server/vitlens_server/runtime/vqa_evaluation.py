"""Evaluate on a visual question answering model: seed 003's perturbation tests, segmentation.

`VqaEvaluand` is the `runtime.evaluation.Evaluand` of a VQA model. It prepares an
`evaluate.vqa_run` run:

    methods   the bi-modal methods (`explain.bimodal.BIMODAL_METHODS`, options as Explain's) and
              the reference row ``random`` (`evaluate.vqa_plan`)
    metrics   ``perturbation_image``, ``perturbation_text``, ``segmentation``
    dataset   ``synthetic_vqa:N[:seed]`` only (`Datasets.questions`): held-out scenes at the
              model's input size with a generated question each; server folders and inline
              samples carry no questions
    target    the model's answer (default) or, with ``explain_label``, the ground-truth one;
              perturbation hits are scored against the ground truth either way

The model must read pixels (ViLT, or a region model through its declared front-end: scenes have
no detector regions) and be able to give every generated answer (matched by name). Every model
call goes through the model's `VqaWorker`, batched with live traffic: explanations as Explain
jobs, perturbed pairs as Predict jobs with keep masks (`VqaPredictJob.text_keep` /
``image_keep``), split into the worker's batches and submitted together.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence

import torch

from vitlens_server.domain import ExplainResult
from vitlens_server.errors import FailedPrecondition
from vitlens_server.evaluate.vqa_plan import answer_indices, plan_vqa_evaluation
from vitlens_server.evaluate.vqa_run import run_vqa_evaluation, word_tokens
from vitlens_server.explain.params import NoParams
from vitlens_server.explain.vqa_batch import VqaExplainJob, VqaPredictJob
from vitlens_server.models.vqa_serving import LoadedVqaModel
from vitlens_server.runtime.api import EvaluateQuery
from vitlens_server.runtime.evaluation import Datasets, Submit, Work
from vitlens_server.runtime.vqa import GenericParams
from vitlens_server.runtime.vqa_worker import VqaWorker

__all__ = ["VqaEvaluand"]

CHUNK_ITEMS = 32  # items explained per Explain call (the classifier runs' chunk)


class VqaEvaluand:
    """A VQA model as Evaluate scores it."""

    def __init__(self, served: LoadedVqaModel, worker: VqaWorker) -> None:
        self._served, self._worker = served, worker
        self.name = served.name

    async def prepare(self, query: EvaluateQuery, datasets: Datasets, submit: Submit) -> Work:
        served = self._served
        plan = plan_vqa_evaluation(
            query.methods,
            query.metrics,
            method_options=query.method_options,
            metric_options=query.metric_options,
            explain_label=query.explain_label,
            method_params=_method_params,
            model=self.name,
            chunk_size=min(CHUNK_ITEMS, self._worker.max_queue_images),
        )
        grid = served.patch_grid
        if served.visual_input != "pixels" or grid is None:
            raise FailedPrecondition(
                f"VQA model {self.name!r} reads detector regions from each request, and "
                "synthetic_vqa scenes have none: Evaluate scores models that read pixels (ViLT, "
                "or a region model with a declared front-end, docs/vqa_models.md)"
            )
        answers = answer_indices(served.labels, self.name)
        dataset = datasets.questions(query, self.name, served.image_size)
        calls = _WorkerCalls(served, self._worker, submit)
        return functools.partial(
            run_vqa_evaluation, plan, dataset, calls, answers=answers, grid=grid
        )


def _method_params(name: str) -> type:
    """A bi-modal method's options, as Explain parses them (`runtime.vqa`)."""
    return GenericParams if name == "generic" else NoParams


class _WorkerCalls:
    """`evaluate.vqa_run.VqaCalls` through the model's worker; each call waits for room."""

    def __init__(self, served: LoadedVqaModel, worker: VqaWorker, submit: Submit) -> None:
        self._served, self._worker, self._submit = served, worker, submit

    def explain(self, job: VqaExplainJob) -> ExplainResult:
        return self._submit(self._worker.explain(job, wait_for_room=True))[0]

    def answers(self, jobs: Sequence[VqaPredictJob]) -> list[torch.Tensor]:
        """Every job split into the worker's batches (the keep masks with their rows), all
        submitted at once so they batch together."""
        size = self._worker.max_batch_size
        parts = [
            [job.rows(slice(start, start + size)) for start in range(0, job.size, size)]
            for job in jobs
        ]
        flat = [part for job_parts in parts for part in job_parts]
        done = self._submit(self._gather(flat))
        out, first = [], 0
        for job_parts in parts:
            out.append(torch.cat(done[first : first + len(job_parts)]))
            first += len(job_parts)
        return out

    async def _gather(self, jobs: list[VqaPredictJob]) -> list[torch.Tensor]:
        """The jobs' top-1 answers; one failing (or the run withdrawing) cancels the rest."""
        tasks = [asyncio.ensure_future(self._worker.predict(j, wait_for_room=True)) for j in jobs]
        try:
            done = await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()  # after a failure: the others are withdrawn (no-op once done)
        return [torch.from_numpy(predictions.indices[:, 0]) for predictions, _ in done]

    def words(self, questions: Sequence[str]) -> tuple[tuple[str, ...], ...]:
        return word_tokens(self._served, questions)

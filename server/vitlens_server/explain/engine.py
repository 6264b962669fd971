"""Run one batch through a model: one forward pass, the backward passes its methods need, and
the methods, as the typed steps of `vitlens_server.explain.batch`.

`Explainer` owns the model's cached `AttentionHooks`. Recordings are per thread, so several
threads may explain with one `Explainer` at the same time (e.g. one per `Cost` class).
Everything stays on the model's device until the final host copy of the outputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vitlens_server.domain import ExplainResult, Predictions, TargetSpec
from vitlens_server.errors import InvalidArgument
from vitlens_server.explain.batch import (
    Batch,
    ExplainJob,
    Forward,
    Outcome,
    explained_classes,
    forward_outcomes,
    gradient_outcomes,
)
from vitlens_server.explain.capture import AttentionHooks
from vitlens_server.explain.passes import ExtraPasses, raise_if_interrupted
from vitlens_server.explain.recording import capture
from vitlens_server.explain.registry import METHODS, MethodOutput, MethodSpec, Pass
from vitlens_server.models import LoadedModel

__all__ = ["Explainer", "resize_maps", "top_k_predictions"]


def resize_maps(heatmaps: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, K, h, w) maps → (B, K, *size): a pixel map onto the token grid as patch means, a
    token map onto the input as bilinear upsampling; unchanged at its own size."""
    if heatmaps.shape[-2] > size[0]:
        return F.adaptive_avg_pool2d(heatmaps, size)
    if heatmaps.shape[-2] < size[0]:
        return F.interpolate(heatmaps, size=size, mode="bilinear", align_corners=False)
    return heatmaps


class Explainer:
    """Classifies and explains batches with one loaded model."""

    def __init__(self, model: LoadedModel, *, max_pass_rows: int = 64) -> None:
        """``max_pass_rows``: images per further model pass of a method (the memory bound of
        the SmoothGrad samples / IG steps run together, `ExtraPasses.max_rows`)."""
        self.model = model
        self.max_pass_rows = max_pass_rows
        # Forward-only passes form the attention maps on timm's unfused path where that costs
        # nothing: on CPU, in fp32 (benchmarks/methods_roof: the unfused forward runs as fast
        # as the fused one there); elsewhere the fused kernel runs and the maps are rebuilt.
        self._maps_in_pass = model.device.type == "cpu" and model.spec.precision != "bf16"
        self.hooks = AttentionHooks(model.module)
        self._dtype = next(model.module.parameters()).dtype
        shape = (1, -1, 1, 1)
        self._mean = torch.tensor(model.mean, device=model.device, dtype=self._dtype).view(shape)
        self._std = torch.tensor(model.std, device=model.device, dtype=self._dtype).view(shape)

    def close(self) -> None:
        self.hooks.close()

    def refusal(self, method: MethodSpec) -> str | None:
        """Why ``method`` cannot explain this model in an Explain request, or None if it can."""
        if method.needs_mask:
            return (
                f"method {method.name!r} needs a ground-truth mask and is available only in "
                "Evaluate, on datasets that carry masks; Explain requests have no mask input"
            )
        geometry = self.model.geometry
        if not method.applies_to(geometry.readout):
            return (
                f"method {method.name!r} applies to models whose classifier reads "
                f"{' or '.join(method.readouts)} tokens, and model {self.model.name!r} reads "
                f"{geometry.readout!r}; see GetModel for the methods this model supports"
            )
        if Pass.LRP in method.passes and self.hooks.lrp_problem is not None:
            return (
                f"method {method.name!r} cannot explain model {self.model.name!r}: "
                f"{self.hooks.lrp_problem}"
            )
        return None

    def supported_methods(self) -> list[MethodSpec]:
        """The registered methods Explain accepts for this model."""
        return [spec for spec in METHODS.specs() if self.refusal(spec) is None]

    def check(self, method: MethodSpec, params: object, target: TargetSpec) -> None:
        """Reject a job that cannot run on this model, before it is queued."""
        refusal = self.refusal(method)
        if refusal is not None:
            raise InvalidArgument(refusal, field="method")
        geometry = self.model.geometry
        check = getattr(params, "check", None)
        if check is not None:  # options against the model (e.g. start_layer below its depth)
            check(geometry.num_layers)
        target.check(geometry.num_classes, self.model.name)

    def predict(self, pixels: Tensor, top_k: int) -> Predictions:
        """Classify (B, C, H, W) pixels on the fused fast path."""
        return top_k_predictions(self.logits(pixels), top_k)

    def logits(self, pixels: Tensor) -> Tensor:
        """(B, C, H, W) pixels in [0, 1] → (B, classes) float32 logits, fused fast path."""
        with torch.inference_mode(), self.autocast():
            return self.model.module(self.normalize(pixels)).float()

    def explain(
        self, job: ExplainJob, *, interrupted: Callable[[], bool] | None = None
    ) -> ExplainResult:
        """Run the passes ``job.method`` needs and the method itself."""
        (result,) = self.explain_batch([job], interrupted=interrupted)
        if isinstance(result, BaseException):
            raise result
        return result

    def explain_batch(
        self,
        jobs: Sequence[ExplainJob],
        *,
        interrupted: Callable[[], bool] | None = None,
    ) -> list[ExplainResult | Exception]:
        """Explain several jobs (requests, or chunks of them) from one capture.

        The images of all jobs go through one forward pass; when any job needs gradients, one
        backward pass per target rank serves every such job (images explaining fewer classes
        contribute nothing to the later ranks). Each job's method then reads its own rows of the
        recording. A method failing for one job fails only that job: its slot in the returned
        list holds the exception. A failure of the passes themselves (e.g. out of memory)
        raises, for the caller to split the batch. A job whose method `refusal` rejects fails
        alone with that `InvalidArgument` (`check` raises it before queueing).

        ``interrupted`` is asked before the forward pass, before each backward pass, before
        each method call and before each further model pass a method runs (`ExtraPasses`);
        when it returns True, `Interrupted` is raised and the batch's work stops there.
        """
        refusals = [self.refusal(job.method) for job in jobs]
        runnable = [job for job, refusal in zip(jobs, refusals, strict=True) if refusal is None]
        results = iter(self._explain_batch(runnable, interrupted) if runnable else [])
        return [InvalidArgument(r) if r is not None else next(results) for r in refusals]

    def _explain_batch(
        self, jobs: Sequence[ExplainJob], interrupted: Callable[[], bool] | None
    ) -> list[ExplainResult | Exception]:
        start = time.perf_counter()
        batch = Batch.of(jobs)
        raise_if_interrupted(interrupted)
        forward = self._forward(batch, interrupted)
        outcomes = gradient_outcomes(batch, forward, interrupted)
        outcomes |= forward_outcomes(batch, forward, interrupted)
        compute_s = time.perf_counter() - start
        return [
            self._result(job, forward.scores[rows], targets, outcomes[i], compute_s)
            for i, (job, rows, targets) in enumerate(
                zip(batch.jobs, batch.rows, forward.targets, strict=True)
            )
        ]

    def extra_passes(
        self, pixels: Tensor, interrupted: Callable[[], bool] | None = None
    ) -> ExtraPasses:
        """Model passes for the methods that run their own (`Pass.EXTRA`) on (B, C, H, W)
        ``pixels`` in [0, 1]."""
        pixels = pixels.to(self.model.device, self._dtype)
        return ExtraPasses(
            self.model.module,
            self.normalize,
            self.autocast,
            pixels,
            interrupted,
            max_rows=self.max_pass_rows,
        )

    def autocast(self) -> torch.autocast:
        """bfloat16 autocast around model passes when the model's precision is ``bf16``."""
        enabled = self.model.spec.precision == "bf16"
        return torch.autocast(self.model.device.type, torch.bfloat16, enabled=enabled)

    def normalize(self, pixels: Tensor) -> Tensor:
        """(B, C, H, W) pixels in [0, 1] → the model's input: on its device, in its dtype,
        normalised by its mean and std."""
        x = pixels.to(self.model.device, self._dtype, non_blocking=True)
        return (x - self._mean) / self._std

    def _forward(self, batch: Batch, interrupted: Callable[[], bool] | None) -> Forward:
        """One forward pass of every job's images under the hooks."""
        pixels = batch.pixels.to(self.model.device)
        passes = self.extra_passes(pixels, interrupted) if Pass.EXTRA in batch.passes else None
        gradients = bool(batch.gradient_jobs)
        captured = capture(
            self.hooks,
            self.normalize(batch.pixels),
            lrp=Pass.LRP in batch.passes,
            gradients=gradients,
            autocast=self.autocast(),
            pixels=pixels,
            passes=passes,
            maps=not gradients and self._maps_in_pass,
        )
        scores = captured.logits.detach().float()
        targets = tuple(
            explained_classes(scores[rows], job.target)
            for rows, job in zip(batch.rows, batch.jobs, strict=True)
        )
        return Forward(captured, scores, targets)

    def _result(
        self,
        job: ExplainJob,
        logits: Tensor,
        targets: Tensor,
        outcome: Outcome,
        compute_s: float,
    ) -> ExplainResult | Exception:
        """A job's host-side result from its (B, classes) logits, (B, K) targets and outputs."""
        if isinstance(outcome, Exception):
            return outcome
        try:
            return self._finish(job, logits, targets, outcome, compute_s)
        except Exception as err:  # isolated to this job, reported to it
            return err

    def _finish(
        self,
        job: ExplainJob,
        logits: Tensor,
        targets: Tensor,
        outputs: Sequence[MethodOutput],
        compute_s: float,
    ) -> ExplainResult:
        with torch.no_grad():
            heatmaps = torch.stack([o.heatmap for o in outputs], dim=1)  # (B, K, h, w)
            geometry = self.model.geometry
            if job.grid != "native":
                size = geometry.input_size[1:] if job.grid == "input" else geometry.grid
                heatmaps = resize_maps(heatmaps, size)
            relevance = None
            if job.relevance:
                relevance = torch.stack([o.relevance for o in outputs], dim=1)  # (B, K, N, N)
            probs = logits.softmax(dim=1)
            host = job.output_dtype
            return ExplainResult(
                predictions=top_k_predictions(logits, job.top_k_predictions),
                targets=targets.cpu().numpy(),
                target_probabilities=probs.gather(1, targets).cpu().numpy(),
                target_logits=logits.gather(1, targets).float().cpu().numpy(),
                heatmaps=heatmaps.float().cpu().numpy().astype(host, copy=False),
                relevance=None
                if relevance is None
                else relevance.float().cpu().numpy().astype(host, copy=False),
                compute_seconds=compute_s,
            )


def top_k_predictions(logits: Tensor, k: int) -> Predictions:
    """The k most probable classes of (B, classes) logits, on the host."""
    k = min(k, logits.shape[1])
    probs = logits.float().softmax(dim=1)
    top = probs.topk(k, dim=1)
    return Predictions(
        indices=top.indices.cpu().numpy(),
        probabilities=top.values.cpu().numpy(),
        logits=logits.float().gather(1, top.indices).cpu().numpy(),
    )

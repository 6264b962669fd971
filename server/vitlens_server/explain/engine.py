"""Run one batch through a model: forward, the backward passes a method needs, the method.

`Explainer` owns the model's cached `AttentionHooks`; it is driven by one worker thread at a time.
Everything stays on the model's device until the final host copy of the outputs.
"""

from __future__ import annotations

import functools
import operator
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from vitlens_server.domain import ExplainResult, Predictions, TargetSpec
from vitlens_server.errors import InvalidArgument
from vitlens_server.explain.capture import AttentionHooks
from vitlens_server.explain.registry import METHODS, MethodOutput, MethodSpec, Pass
from vitlens_server.models import LoadedModel

__all__ = [
    "ExplainJob",
    "ExplainResult",
    "Explainer",
    "Predictions",
    "TargetSpec",
    "resize_maps",
    "top_k_predictions",
]


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

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
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
            raise InvalidArgument(refusal)
        geometry = self.model.geometry
        check = getattr(params, "check", None)
        if check is not None:
            check(geometry.num_layers)
        classes = geometry.num_classes
        if target.kind == "top_k" and not 1 <= target.k <= classes:
            raise InvalidArgument(f"target.top_k must lie in [1, {classes}]; got {target.k}")
        for index in target.indices:
            if not 0 <= index < classes:
                raise InvalidArgument(
                    f"class index {index} is out of range; model {self.model.name!r} has "
                    f"{classes} classes (0..{classes - 1})"
                )

    def predict(self, pixels: Tensor, top_k: int) -> Predictions:
        """Classify (B, C, H, W) pixels on the fused fast path."""
        return top_k_predictions(self.logits(pixels), top_k)

    def logits(self, pixels: Tensor) -> Tensor:
        """(B, C, H, W) pixels in [0, 1] → (B, classes) float32 logits, fused fast path."""
        with torch.inference_mode(), self.autocast():
            return self.model.module(self._normalize(pixels)).float()

    def explain(self, job: ExplainJob) -> ExplainResult:
        """Run the passes ``job.method`` needs and the method itself."""
        (result,) = self.explain_batch([job])
        if isinstance(result, BaseException):
            raise result
        return result

    def explain_batch(self, jobs: Sequence[ExplainJob]) -> list[ExplainResult | Exception]:
        """Explain several jobs (requests, or chunks of them) from one capture.

        The images of all jobs go through one forward pass; when any job needs gradients, one
        backward pass per target rank serves every such job (images explaining fewer classes
        contribute nothing to the later ranks). Each job's method then reads its own rows of the
        recording. A method failing for one job fails only that job: its slot in the returned
        list holds the exception. A failure of the passes themselves (e.g. out of memory)
        raises, for the caller to split the batch.
        """
        start = time.perf_counter()
        pixels = torch.cat([job.pixels for job in jobs]) if len(jobs) > 1 else jobs[0].pixels
        rows = _rows(jobs)
        passes = functools.reduce(operator.or_, (job.method.passes for job in jobs))
        outputs: list[list[MethodOutput]] = [[] for _ in jobs]
        failures: list[Exception | None] = [None] * len(jobs)
        with self.hooks.record(lrp=Pass.LRP in passes) as rec:
            rec.pixels = pixels.to(self.model.device)
            if Pass.EXTRA in passes:
                rec.passes = ExtraPasses(self, rec.pixels.to(self._dtype))
            x = self._normalize(pixels)
            grad_jobs = [i for i, job in enumerate(jobs) if Pass.BACKWARD in job.method.passes]
            with torch.set_grad_enabled(bool(grad_jobs)):
                x.requires_grad_(bool(grad_jobs))  # the graph starts at the input, never weights
                with self.autocast():
                    logits = self.model.module(x)
            scores = logits.detach().float()
            targets = [
                self._targets(scores[r], job.target) for r, job in zip(rows, jobs, strict=True)
            ]
            if grad_jobs:
                self._backward_ranks(rec, logits, jobs, rows, targets, grad_jobs, outputs, failures)
            del logits, x
            with torch.no_grad():
                for i, job in enumerate(jobs):
                    if i not in grad_jobs:
                        self._forward_method(rec, job, rows[i], targets[i], outputs[i], failures, i)
        compute_s = time.perf_counter() - start
        results: list[ExplainResult | Exception] = []
        for i, job in enumerate(jobs):
            if failures[i] is not None:
                results.append(failures[i])
                continue
            try:
                finished = self._finish(job, scores[rows[i]], targets[i], outputs[i])
                results.append(ExplainResult(**finished, compute_seconds=compute_s))
            except Exception as err:  # isolated to this job, reported to it
                results.append(err)
        return results

    def _backward_ranks(self, rec, logits, jobs, rows, targets, grad_jobs, outputs, failures):
        """One backward per target rank for the gradient jobs, each then running its method."""
        ranks = max(targets[i].shape[1] for i in grad_jobs)
        for rank in range(ranks):
            index = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
            weight = torch.zeros(logits.shape[0], dtype=logits.dtype, device=logits.device)
            for i in grad_jobs:
                if rank < targets[i].shape[1]:
                    index[rows[i]] = targets[i][:, rank]
                    weight[rows[i]] = 1
            chosen = (logits.gather(1, index[:, None])[:, 0] * weight).sum()
            grads = torch.autograd.grad(
                chosen, rec.attention_outputs(), retain_graph=rank < ranks - 1
            )
            for layer, grad in zip(rec.layers, grads, strict=True):
                layer.out_grad = grad
            with torch.no_grad():
                for i in grad_jobs:
                    if rank < targets[i].shape[1] and failures[i] is None:
                        try:
                            sub = rec.narrow(rows[i])
                            sub.targets = targets[i][:, rank]
                            outputs[i].append(jobs[i].method.fn(sub, jobs[i].params))
                        except Exception as err:  # this job only
                            failures[i] = err

    @staticmethod
    def _forward_method(rec, job, rows, targets, outputs, failures, i) -> None:
        """Methods without gradients: one call per explained class (one if class-agnostic)."""
        try:
            sub = rec.narrow(rows)
            for rank in range(targets.shape[1] if job.method.class_specific else 1):
                sub.targets = targets[:, rank]
                outputs.append(job.method.fn(sub, job.params))
            if not job.method.class_specific:  # one map serves every explained class
                outputs[:] = outputs * targets.shape[1]
        except Exception as err:  # this job only
            failures[i] = err

    def autocast(self):
        """bfloat16 autocast around model passes when the model's precision is ``bf16``."""
        enabled = self.model.spec.precision == "bf16"
        return torch.autocast(self.model.device.type, torch.bfloat16, enabled=enabled)

    def _normalize(self, pixels: Tensor) -> Tensor:
        x = pixels.to(self.model.device, self._dtype, non_blocking=True)
        return (x - self._mean) / self._std

    def _targets(self, logits: Tensor, target: TargetSpec) -> Tensor:
        """(B, K) class indices to explain."""
        batch = logits.shape[0]
        if target.kind == "top_k":
            return logits.topk(target.k, dim=1).indices
        if target.kind == "index":
            return torch.full((batch, 1), target.indices[0], device=logits.device)
        if target.kind == "per_image":
            return torch.tensor(target.indices, device=logits.device).view(batch, 1)
        return logits.argmax(dim=1, keepdim=True)

    def _finish(
        self, job: ExplainJob, logits: Tensor, targets: Tensor, outputs: list[MethodOutput]
    ) -> dict:
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
            return {
                "predictions": top_k_predictions(logits, job.top_k_predictions),
                "targets": targets.cpu().numpy(),
                "target_probabilities": probs.gather(1, targets).cpu().numpy(),
                "target_logits": logits.gather(1, targets).float().cpu().numpy(),
                "heatmaps": heatmaps.float().cpu().numpy().astype(host, copy=False),
                "relevance": None
                if relevance is None
                else relevance.float().cpu().numpy().astype(host, copy=False),
            }


def _rows(jobs: Sequence[ExplainJob]) -> list[slice]:
    """Each job's rows in the concatenated batch."""
    rows, first = [], 0
    for job in jobs:
        rows.append(slice(first, first + job.pixels.shape[0]))
        first += job.pixels.shape[0]
    return rows


class ExtraPasses:
    """Model passes a method runs itself (`Pass.EXTRA`), with the recording hooks paused.

    ``pixels`` is the batch being explained, (B, C, H, W) in [0, 1] on the model's device.
    """

    def __init__(self, explainer: Explainer, pixels: Tensor) -> None:
        self._explainer = explainer
        self.pixels = pixels

    def narrow(self, rows: slice) -> ExtraPasses:
        """The same passes for the images ``rows`` of the batch."""
        return ExtraPasses(self._explainer, self.pixels[rows])

    def logits(self, pixels: Tensor) -> Tensor:
        """(B', C, H, W) pixels → (B', classes) float32 logits, computed in float32 even under
        bf16 autocast: token reflection reads logit differences between masked images that
        bfloat16 rounding erases (benchmarks/precision.md measured ρ 0.18 against fp32 maps)."""
        explainer = self._explainer
        with explainer.hooks.paused(), torch.no_grad():
            return explainer.model.module(explainer._normalize(pixels)).float()

    def input_gradients(self, pixels: Tensor, targets: Tensor) -> Tensor:
        """∂y_t/∂pixels, (B', C, H, W), for targets (B',): one backward for the whole batch."""
        explainer = self._explainer
        with explainer.hooks.paused(), torch.enable_grad():
            pixels = pixels.detach().requires_grad_(True)
            with explainer.autocast():
                logits = explainer.model.module(explainer._normalize(pixels))
            (grad,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), pixels)
        return grad


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

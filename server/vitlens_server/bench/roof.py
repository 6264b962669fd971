"""The in-process roof a server is measured against, for the same model on the same device.

* forward+backward: ``logits = f(x)`` with timm's fused attention
  (``F.scaled_dot_product_attention``) and no hooks, then ``∂(Σ_b logits[b, t_b]) / ∂x`` with
  t_b = argmax — the work of one batched gradient explanation (the graph starts at the input;
  the weights are frozen). This is the roof of gradient methods such as ``generic``.
* forward: ``f(x)`` under ``torch.inference_mode`` — the roof of forward-only methods such as
  ``rollout``.
* explanation latency: one image through `vitlens_server.explain.Explainer.explain` with the
  method (hooks, passes, method, host copy), the batch-1 floor of a request's latency.

Each figure is the median over ``repeats`` timed runs after ``warmup`` untimed ones, with the
device synchronised around each run. Images/s = B / median seconds per pass, for B = 1, 2, 4, …
up to ``max_batch_size``; the best B is reported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from vitlens_server.explain import Explainer, ExplainJob, TargetSpec, get_method
from vitlens_server.explain.params import parse_params
from vitlens_server.models import LoadedModel

__all__ = ["PRECISIONS", "RoofPoint", "RoofReport", "batch_ladder", "measure_roof", "precision"]

Precision = Literal["fp32", "tf32", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16")


@dataclass(frozen=True)
class RoofPoint:
    """One batch size: median seconds per pass and the images/s it gives."""

    batch_size: int
    seconds: float
    images_per_s: float


@dataclass(frozen=True)
class RoofReport:
    """Roof figures of one model on one device at one precision."""

    model: str
    architecture: str
    device: str
    precision: str
    fused_attention: bool  # every block ran timm's fused attention path
    forward_backward: tuple[RoofPoint, ...]
    forward: tuple[RoofPoint, ...]
    explain_latency_s: dict[str, float]  # method → median seconds for one image
    repeats: int
    warmup: int
    note: str = ""  # e.g. the batch size that ran out of memory

    @property
    def best_forward_backward(self) -> RoofPoint:
        return max(self.forward_backward, key=lambda p: p.images_per_s)

    @property
    def best_forward(self) -> RoofPoint:
        return max(self.forward, key=lambda p: p.images_per_s)

    def to_dict(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["best_forward_backward"] = dataclasses.asdict(self.best_forward_backward)
        doc["best_forward"] = dataclasses.asdict(self.best_forward)
        return doc


def batch_ladder(max_batch_size: int) -> list[int]:
    """1, 2, 4, … below ``max_batch_size``, then ``max_batch_size`` itself."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    sizes = [1]
    while sizes[-1] * 2 < max_batch_size:
        sizes.append(sizes[-1] * 2)
    return sizes if sizes[-1] == max_batch_size else [*sizes, max_batch_size]


@contextlib.contextmanager
def precision(mode: str, device: torch.device) -> Iterator[None]:
    """fp32 (no TF32), tf32 (TF32 matmuls and convolutions on CUDA) or bf16 autocast.

    Process-wide matmul settings are restored on exit.
    """
    if mode not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {mode!r}")
    matmul = torch.get_float32_matmul_precision()
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("high" if mode == "tf32" else "highest")
        torch.backends.cudnn.allow_tf32 = mode == "tf32"
        if mode == "bf16":
            with torch.autocast(device.type, dtype=torch.bfloat16):
                yield
        else:
            yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = cudnn_tf32


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(
    run: Callable[[], object], device: torch.device, repeats: int, warmup: int
) -> float:
    """Median wall time of ``run()`` over ``repeats`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        run()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _ladder(
    step: Callable[[torch.Tensor], object],
    model: LoadedModel,
    sizes: Sequence[int],
    repeats: int,
    warmup: int,
) -> tuple[list[RoofPoint], str]:
    """Time ``step`` on random (B, C, H, W) inputs for each B; stops at the first OOM."""
    device = model.device
    dtype = next(model.module.parameters()).dtype
    points = []
    for batch in sizes:
        x = torch.randn((batch, *model.geometry.input_size), device=device, dtype=dtype)
        try:
            seconds = _median_seconds(lambda x=x: step(x), device, repeats, warmup)
        except (RuntimeError, torch.OutOfMemoryError) as err:
            if not _is_oom(err):
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return points, f"batch {batch} ran out of memory"
        points.append(RoofPoint(batch, seconds, batch / seconds))
    return points, ""


def measure_roof(
    model: LoadedModel,
    *,
    max_batch_size: int = 64,
    precision_mode: Precision = "fp32",
    methods: Sequence[str] = ("generic",),
    repeats: int = 10,
    warmup: int = 3,
) -> RoofReport:
    """Time the fused forward+backward and forward roofs and one-image explanations.

    The model is used as it is: no hooks are added for the roofs (the `Explainer` for the
    latencies adds its own and removes them when closed), nothing is mutated.
    """
    module = model.module
    blocks = [m for m in module.modules() if hasattr(m, "fused_attn")]
    fused = bool(blocks) and all(m.fused_attn for m in blocks)

    def forward_backward(x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x.requires_grad_(True)
            logits = module(x)  # (B, classes)
            chosen = logits.gather(1, logits.detach().argmax(1, keepdim=True)).sum()
            (grad,) = torch.autograd.grad(chosen, x)  # (B, C, H, W)
        return grad

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(x)

    sizes = batch_ladder(max_batch_size)
    with precision(precision_mode, model.device):
        fb, fb_note = _ladder(forward_backward, model, sizes, repeats, warmup)
        fwd, fwd_note = _ladder(forward, model, sizes, repeats, warmup)
        latency = explain_latency(model, methods, repeats=repeats, warmup=warmup)
    if not fb or not fwd:
        raise RuntimeError(f"no roof measured for {model.name!r}: {fb_note or fwd_note}")
    return RoofReport(
        model=model.name,
        architecture=model.spec.architecture,
        device=str(model.device),
        precision=precision_mode,
        fused_attention=fused,
        forward_backward=tuple(fb),
        forward=tuple(fwd),
        explain_latency_s=latency,
        repeats=repeats,
        warmup=warmup,
        note="; ".join(n for n in (fb_note, fwd_note) if n),
    )


def explain_latency(
    model: LoadedModel, methods: Sequence[str], *, repeats: int = 10, warmup: int = 3
) -> dict[str, float]:
    """Median seconds of `Explainer.explain` on one (1, C, H, W) image, per method."""
    explainer = Explainer(model)
    try:
        pixels = torch.rand((1, *model.geometry.input_size), device=model.device)
        latency = {}
        for name in methods:
            method = get_method(name)
            job = ExplainJob(
                pixels=pixels,
                method=method,
                params=parse_params(method.params, {}, method=name),
                target=TargetSpec(),
            )
            latency[name] = _median_seconds(
                lambda job=job: explainer.explain(job), model.device, repeats, warmup
            )
        return latency
    finally:
        explainer.close()

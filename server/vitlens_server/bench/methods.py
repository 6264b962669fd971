"""Every method against the roof of the passes it declares, on one model in one process.

The primitives, timed in the same run on the same model (no hooks, timm's fused attention):

    t_f   fused forward under ``torch.inference_mode``, seconds per image
    t_fb  forward with the graph from the input + backward to the input, seconds per image

each at its best batch size of the ladder. A method's roof, seconds per explanation of one image
and class, is the sum of the passes its `MethodSpec` declares:

    recording forward   t_f, or t_fb with `Pass.BACKWARD` (the backward to the attention
                        outputs costs what one to the input costs)
    Pass.LRP            + (t_fb − t_f): one backward-shaped sweep, what LRP costs when it is
                        a gradient (lxt's AttnLRP); the α1β0 rule of Chefer et al. needs four
                        matrix products a Linear where a backward needs one, so methods using
                        it stay under this roof (BENCHMARKS.md profiles them)
    Pass.EXTRA          + forwards · t_f + gradients · t_fb (`MethodSpec.extra_count`)

timm's unfused forward (the path that forms each A_l, as code without vitlens' recording must
run to read attention maps) is timed too, for reference: forward-only methods that read every
layer's map (rollout) rebuild A_l = softmax(q kᵀ) after the fused pass, and the unfused forward
is the other way to get them.

A method's rate is explanations/s of `Explainer.explain_batch` on B images (tokens grid, the
default options, the predicted class) at its best B; ratio = rate ÷ (1 / roof). Predict is
`Explainer.predict` (normalisation, forward, top-k, host copy) against t_f at each B.

Rounds interleave everything (every primitive, Predict and method at every batch size, then the
next round), so a slow spell of the machine touches all of them; each figure is the median of
all its timed calls. A method runs only the batch sizes whose estimated call fits ``max_call_s``.
"""

from __future__ import annotations

import copy
import cProfile
import io
import pstats
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from vitlens_server.bench.roof import _sync
from vitlens_server.explain import Explainer, ExplainJob, TargetSpec, get_method
from vitlens_server.explain.params import parse_params
from vitlens_server.explain.registry import MethodSpec, Pass
from vitlens_server.models import LoadedModel

__all__ = [
    "MethodsReport",
    "Primitives",
    "measure_methods",
    "method_job",
    "profile_method",
    "roof_seconds",
]


@dataclass(frozen=True)
class Primitives:
    """Best seconds per image of the fused forward (``forward``) and forward+backward."""

    forward: float
    forward_backward: float


def roof_seconds(spec: MethodSpec, params: object, tokens: int, prims: Primitives) -> float:
    """Seconds per explanation that the passes ``spec`` declares cost at best (module doc)."""
    t_f, t_fb = prims.forward, prims.forward_backward
    seconds = t_fb if Pass.BACKWARD in spec.passes else t_f
    if Pass.LRP in spec.passes:
        seconds += t_fb - t_f
    extra = spec.extra_count(params, tokens)
    return seconds + extra.forwards * t_f + extra.gradients * t_fb


@dataclass
class MethodsReport:
    """Rates per batch size (images/s or explanations/s) and the roofs they are divided by."""

    model: str
    device: str
    batch_sizes: tuple[int, ...]
    rounds: int
    forward: dict[int, float] = field(default_factory=dict)
    forward_backward: dict[int, float] = field(default_factory=dict)
    predict: dict[int, float] = field(default_factory=dict)
    unfused_forward: dict[int, float] = field(default_factory=dict)  # for reference only
    methods: dict[str, dict[int, float]] = field(default_factory=dict)
    roofs: dict[str, float] = field(default_factory=dict)  # method → roof explanations/s
    passes: dict[str, str] = field(default_factory=dict)  # method → its declared passes

    @property
    def primitives(self) -> Primitives:
        return Primitives(1 / max(self.forward.values()), 1 / max(self.forward_backward.values()))

    def ratio(self, method: str) -> float:
        return max(self.methods[method].values()) / self.roofs[method]

    def best_batch(self, method: str) -> int:
        rates = self.methods[method]
        return max(rates, key=rates.__getitem__)

    def predict_ratio(self, batch: int) -> float:
        return self.predict[batch] / self.forward[batch]


def _timed(run: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    run()
    _sync(device)
    return time.perf_counter() - start


def method_job(model: LoadedModel, name: str, batch: int) -> ExplainJob:
    """A job of ``batch`` images for ``name``: a method, or ``method:mode`` for one of its
    modes (``saliency:integrated_gradients``), with the defaults of its other options."""
    key, _, mode = name.partition(":")
    method = get_method(key)
    pixels = torch.rand(
        (batch, *model.geometry.input_size), generator=torch.Generator().manual_seed(batch)
    )
    params = parse_params(method.params, {"mode": mode} if mode else {}, method=key)
    return ExplainJob(
        pixels=pixels.to(model.device), method=method, params=params, target=TargetSpec()
    )


def _passes(spec: MethodSpec, params: object, tokens: int) -> str:
    """The declared passes in words, e.g. ``forward + extra (32 gradients)``."""
    words = " + ".join(spec.pass_names)
    extra = spec.extra_count(params, tokens)
    counts = [
        f"{n} {kind if n > 1 else kind[:-1]}"
        for n, kind in ((extra.forwards, "forwards"), (extra.gradients, "gradients"))
        if n
    ]
    return f"{words} ({', '.join(counts)})" if counts else words


def measure_methods(
    model: LoadedModel,
    methods: Sequence[str],
    *,
    batch_sizes: Sequence[int] = (1, 4, 16),
    rounds: int = 3,
    repeats: int = 2,
    max_call_s: float = 4.0,
    log: Callable[[str], None] = lambda _line: None,
) -> MethodsReport:
    """Time the primitives, Predict and each method (module doc); ``repeats`` calls per figure a
    round, after one untimed warm-up call of each."""
    module, device = model.module, model.device
    dtype = next(module.parameters()).dtype
    explainer = Explainer(model, max_pass_rows=max(batch_sizes))
    inputs = {
        b: torch.randn((b, *model.geometry.input_size), device=device, dtype=dtype)
        for b in batch_sizes
    }
    pixels = {b: torch.rand((b, *model.geometry.input_size), device=device) for b in batch_sizes}

    unfused = copy.deepcopy(module)  # timm's unfused attention: the forward that forms A_l
    for block in unfused.modules():
        if hasattr(block, "fused_attn"):
            block.fused_attn = False

    def forward(b: int, net: torch.nn.Module = module) -> object:
        with torch.inference_mode():
            return net(inputs[b])

    def forward_backward(b: int) -> object:
        with torch.enable_grad():
            x = inputs[b].detach().requires_grad_(True)
            logits = module(x)
            chosen = logits.gather(1, logits.detach().argmax(1, keepdim=True)).sum()
            return torch.autograd.grad(chosen, x)

    calls: dict[tuple[str, int], Callable[[], object]] = {}
    for b in batch_sizes:
        calls["forward", b] = lambda b=b: forward(b)
        calls["forward_backward", b] = lambda b=b: forward_backward(b)
        calls["predict", b] = lambda b=b: explainer.predict(pixels[b], top_k=5)
        calls["unfused_forward", b] = lambda b=b: forward(b, unfused)
    times: dict[tuple[str, int], list[float]] = {key: [] for key in calls}
    for key, run in calls.items():  # warm-up, and the primitives' first estimate
        run()
        times[key].append(_timed(run, device))
    first = Primitives(
        min(times["forward", b][0] / b for b in batch_sizes),
        min(times["forward_backward", b][0] / b for b in batch_sizes),
    )
    tokens = model.geometry.grid[0] * model.geometry.grid[1]
    report = MethodsReport(model.name, str(device), tuple(batch_sizes), rounds)
    for name in methods:
        job = method_job(model, name, 1)
        report.passes[name] = _passes(job.method, job.params, tokens)
        estimate = roof_seconds(job.method, job.params, tokens, first)
        fitting = [b for b in batch_sizes if b * estimate * 1.5 <= max_call_s] or [batch_sizes[0]]
        for b in fitting:
            batch_job = method_job(model, name, b)
            calls[name, b] = lambda job=batch_job: explainer.explain_batch([job])
            calls[name, b]()  # warm-up
            times[name, b] = []
        log(f"{name}: batch sizes {fitting} (estimated {estimate * 1e3:.1f} ms per image)")
    try:
        for round_ in range(rounds):
            for key, run in calls.items():
                times[key] += [_timed(run, device) for _ in range(repeats)]
            log(f"round {round_ + 1}/{rounds} done")
    finally:
        explainer.close()
    primitives = {
        "forward": report.forward,
        "forward_backward": report.forward_backward,
        "predict": report.predict,
        "unfused_forward": report.unfused_forward,
    }
    for (name, b), seconds in times.items():
        rates = primitives[name] if name in primitives else report.methods.setdefault(name, {})
        rates[b] = b / statistics.median(seconds)
    prims = report.primitives
    for name in methods:
        job = method_job(model, name, 1)
        report.roofs[name] = 1 / roof_seconds(job.method, job.params, tokens, prims)
    return report


def profile_method(model: LoadedModel, name: str, batch: int, *, top: int = 8) -> str:
    """cProfile of one `explain_batch` call (after a warm-up): the ``top`` functions by own
    time, as pstats prints them."""
    explainer = Explainer(model, max_pass_rows=batch)
    job = method_job(model, name, batch)
    try:
        explainer.explain_batch([job])
        profiler = cProfile.Profile()
        profiler.enable()
        explainer.explain_batch([job])
        _sync(model.device)
        profiler.disable()
    finally:
        explainer.close()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).strip_dirs().sort_stats("tottime")
    stats.print_stats(top)
    lines = out.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if "ncalls" in line)
    total = next(line for line in lines if "function calls" in line).strip()
    return "\n".join([total, *lines[start : start + top + 1]])

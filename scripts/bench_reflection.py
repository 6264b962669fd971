"""token_reflection throughput end to end through `Explainer.explain`: explanations per second.

    PYTHONPATH=client:server:. python scripts/bench_reflection.py --model demo --device cpu \\
        --batch 1
    PYTHONPATH=client:server:. python scripts/bench_reflection.py \\
        --model vit_base_patch16_224 --device cuda --batch 8

One explanation = forward + backward + LRP (Transformer Attribution) + gh·gw forwards of masked
images. Transformer Attribution alone is timed the same way, and so are the gh·gw plain forwards
per image alone (`Explainer.predict` on batch·gh·gw images in the same chunks), the floor the
masked forwards cannot beat. A chunk is min(--reflection-batch, --max-pass-rows) images: the
method's batch_size, bounded by the explainer's rows a pass (a server's --max-batch-size).
Warm-up calls are excluded. Models without local weights run with seeded random weights (the
output says so): throughput does not depend on the weights.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vitlens_server.bench.malloc import add_malloc_flag, apply_malloc_flag
from vitlens_server.explain import Explainer, ExplainJob, TargetSpec, get_method
from vitlens_server.explain.methods.reflection import ReflectionParams
from vitlens_server.explain.params import NoParams
from vitlens_server.models import LoadedModel, ModelSpec, load_model
from vitlens_server.models.default import demo_spec
from vitlens_server.models.loading import ModelLoadError


def build(model: str, device: str) -> LoadedModel:
    """The demo model, or a timm architecture with cached pretrained weights, else random."""
    if model == "demo":
        return load_model(demo_spec(device))
    try:
        return load_model(ModelSpec(name=model, architecture=model, pretrained=True, device=device))
    except ModelLoadError:
        return load_model(ModelSpec(name=model, architecture=model, device=device))


Timing = tuple[list[float], float]  # explanations/s of each timed call; process CPU s per image


def rate(explainer: Explainer, job: ExplainJob, *, warmup: int, repeats: int) -> Timing:
    """Explanations per second of each timed call (one call explains the whole batch)."""
    for _ in range(warmup):
        explainer.explain(job)
    rates = []
    cpu = time.process_time()
    for _ in range(repeats):
        start = time.perf_counter()
        explainer.explain(job)  # ends with host copies, so the device work is complete
        rates.append(job.pixels.shape[0] / (time.perf_counter() - start))
    return rates, (time.process_time() - cpu) / (repeats * job.pixels.shape[0])


def forward_rate(
    explainer: Explainer, pixels: torch.Tensor, tokens: int, chunk: int, *, repeats: int
) -> Timing:
    """Explanations per second of the masked-forward part alone: ``tokens`` plain forwards per
    image, of the same images repeated, in chunks of ``chunk``."""
    images = pixels.repeat_interleave(tokens, dim=0)  # (B·T, C, H, W)

    def classify() -> None:
        for first in range(0, images.shape[0], chunk):
            explainer.predict(images[first : first + chunk], top_k=1)  # host copy: synchronised

    classify()  # warm-up
    rates = []
    cpu = time.process_time()
    for _ in range(repeats):
        start = time.perf_counter()
        classify()
        rates.append(pixels.shape[0] / (time.perf_counter() - start))
    return rates, (time.process_time() - cpu) / (repeats * pixels.shape[0])


def report(name: str, timing: Timing) -> None:
    rates, cpu_s = timing
    median = statistics.median(rates)
    print(
        f"{name:>28}: {median:8.3f} explanations/s (median; min {min(rates):.3f}, "
        f"max {max(rates):.3f}), {1e3 / median:9.1f} ms/explanation, "
        f"{cpu_s:7.2f} CPU s/explanation"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="'demo' or a timm ViT architecture")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch", type=int, default=1, help="images explained per call")
    parser.add_argument(
        "--reflection-batch", type=int, default=256, help="masked images per forward (batch_size)"
    )
    parser.add_argument(
        "--max-pass-rows", type=int, default=64, help="the explainer's images a further pass"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls (at least 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_malloc_flag(parser)
    args = parser.parse_args()
    malloc = apply_malloc_flag(args)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = build(args.model, args.device)
    geometry = loaded.geometry
    weights = "RANDOM weights" if loaded.weights.random else f"weights {loaded.weights.source}"
    where = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    gh, gw = geometry.grid
    print(
        f"{args.model} ({loaded.spec.architecture}, {geometry.num_layers} blocks, "
        f"{geometry.input_size[1]} px, {gh}x{gw} grid, {geometry.num_classes} classes), "
        f"{weights}; {where}; torch {torch.__version__}; host malloc {malloc}"
    )
    chunk = min(args.reflection_batch, args.max_pass_rows)
    print(
        f"batch {args.batch} images, {args.batch * gh * gw} masked images per call in chunks of "
        f"{chunk}; warm-up {args.warmup}, {args.repeats} timed calls"
    )
    explainer = Explainer(loaded, max_pass_rows=args.max_pass_rows)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(args.batch, *geometry.input_size, generator=generator).to(loaded.device)
    target = TargetSpec()
    jobs = {
        "token_reflection": ExplainJob(
            pixels,
            get_method("token_reflection"),
            ReflectionParams(batch_size=args.reflection_batch),
            target,
        ),
        "transformer_attribution": ExplainJob(
            pixels, get_method("transformer_attribution"), NoParams(), target
        ),
    }
    try:
        for name, job in jobs.items():
            report(name, rate(explainer, job, warmup=args.warmup, repeats=args.repeats))
        timing = forward_rate(explainer, pixels, gh * gw, chunk, repeats=args.repeats)
        report(f"{gh * gw} plain forwards only", timing)
    finally:
        explainer.close()


if __name__ == "__main__":
    main()

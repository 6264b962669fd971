"""Explaining K detections per image: one vectorised backward pass, K passes, or K calls.

    PYTHONPATH=client:server:. python scripts/bench_detr.py --device cpu --batch 4 \\
        --detections 1 4 8

Three ways to give every detection of B images its `generic` map, timed on the same model and
images (the shipped ``vitlens-detr`` exemplar when its files are there, else the exemplar's
config with seeded random weights — the time does not depend on the weights):

- ``batched``: `explain_detections` as the server runs it: one forward pass keeping the maps, one
  ``torch.autograd.grad(..., is_grads_batched=True)`` for all K ranks, the rules per rank;
- ``per rank``: the same call with ``batched=False``: one ordinary backward pass per rank (each
  serving all B images), the rules per rank;
- ``per detection``: what a client without batching gets: one forward and one backward pass per
  detection, B·K calls of one image and one query.

K queries are explained per image (queries 0..K-1: the cost does not depend on which). Each line
gives the median detections explained per second over the timed calls, with min and max, and
the process CPU seconds per detection; warm-up calls are excluded.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from vitlens_server.explain.detection import DETECTION_METHODS, explain_detections
from vitlens_server.models.default import ASSETS, DETR_MODEL_NAME
from vitlens_server.models.detection import DetrDetector, load_detr


def build(device: str) -> tuple[DetrDetector, str]:
    directory = ASSETS / DETR_MODEL_NAME
    if (directory / "model.safetensors").is_file():
        return load_detr(directory, device=device), f"{DETR_MODEL_NAME} (trained)"
    from vitlens_server.training.detr_model import build_detr

    module = build_detr(init_trunk=False).to(device)
    return DetrDetector(module), "the exemplar config, seeded random weights"


def timed(call: Callable[[], None], count: int, *, warmup: int, repeats: int):
    for _ in range(warmup):
        call()
    rates, cpu = [], time.process_time()
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        rates.append(count / (time.perf_counter() - start))
    return rates, (time.process_time() - cpu) / (repeats * count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4, help="images per call")
    parser.add_argument("--detections", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    detector, what = build(args.device)
    side = 224
    pixels = torch.randn(args.batch, 3, side, side, generator=torch.Generator().manual_seed(0))
    pixels = pixels.to(args.device)
    method = DETECTION_METHODS["generic"]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(f"model: {what}; device {args.device}; torch {torch.__version__}; "
          f"{torch.get_num_threads()} threads; B = {args.batch}")  # fmt: skip
    for k in args.detections:
        queries = torch.arange(k)
        select = [queries] * args.batch

        def batched(flag: bool, select: list = select) -> None:
            explain_detections(detector, pixels, method, select=select, batched=flag)
            sync()

        def one_by_one(k: int = k) -> None:
            for b in range(args.batch):
                for q in range(k):
                    explain_detections(
                        detector, pixels[b : b + 1], method, select=[torch.tensor([q])]
                    )
            sync()

        count = args.batch * k
        for name, call in (
            ("batched", lambda: batched(True)),
            ("per rank", lambda: batched(False)),
            ("per detection", one_by_one),
        ):
            rates, cpu = timed(call, count, warmup=args.warmup, repeats=args.repeats)
            print(
                f"K = {k}  {name:<14} {statistics.median(rates):8.1f} detections/s "
                f"(min {min(rates):.1f}, max {max(rates):.1f})  {cpu * 1000:.1f} ms CPU each"
            )


if __name__ == "__main__":
    main()

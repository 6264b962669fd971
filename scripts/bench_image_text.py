"""Image-text `generic`: B images x M texts in one batched call vs. a loop over the pairs.

Builds a random ViT-Tiny/16 CLIP (the demo ViT's image tower shape on 224 px, 197 tokens;
a 6-layer text tower, context 77; larger than the shipped 160 px exemplar) — timing only, the
weights do not matter — and times `explain_pairs` on the full grid against B x M single-pair
calls, checking they agree.

    .venv/bin/python scripts/bench_image_text.py --images 8 --texts 4 --repeat 3
    python scripts/bench_image_text.py --images 32 --texts 8 --device cuda   # scripts/gpu_checks.sh
"""

from __future__ import annotations

import argparse
import time

import torch

from vitlens_server.explain.image_text import explain_pairs
from vitlens_server.models.image_text.base import Preprocess
from vitlens_server.models.image_text.open_clip_model import OpenClipModel, build_open_clip

MODEL_CFG = {
    "embed_dim": 256,
    "vision_cfg": {
        "image_size": 224,
        "patch_size": 16,
        "width": 192,
        "layers": 6,
        "head_width": 64,
    },
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 6},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--texts", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    module = build_open_clip(MODEL_CFG).to(device).eval().requires_grad_(False)
    preprocess = Preprocess((3, 224, 224), (0.5,) * 3, (0.5,) * 3)
    model = OpenClipModel(module, source="bench", preprocess=preprocess, model_cfg=MODEL_CFG)
    pixels = preprocess.normalise(torch.rand(args.images, 3, 224, 224, device=device))
    texts = model.tokenize([f"a photo of shape number {i}" for i in range(args.texts)])
    grid = [(b, m) for b in range(args.images) for m in range(args.texts)]

    def batched():
        return explain_pairs(model, pixels, texts, lambda _: grid, method="generic")[1]

    def looped():
        return [
            explain_pairs(
                model,
                pixels[b : b + 1],
                texts.narrow(slice(m, m + 1)),
                lambda _: [(0, 0)],
                method="generic",
            )[1][0]
            for b, m in grid
        ]

    for name, run in (("batched", batched), ("per-pair loop", looped)):
        run()  # warm-up
        _sync(device)
        started = time.perf_counter()
        for _ in range(args.repeat):
            found = run()
        _sync(device)
        seconds = (time.perf_counter() - started) / args.repeat
        rate = len(grid) / seconds
        print(f"{name:>14}: {seconds:.3f} s for {len(grid)} pairs ({rate:.1f} pairs/s)")
        if name == "batched":
            reference = found
    error = max(
        float((a.heatmap - b.heatmap).abs().max()) for a, b in zip(reference, found, strict=True)
    )
    print(f"max |batched - loop| heatmap difference: {error:.2e}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()

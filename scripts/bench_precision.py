"""How far bf16-autocast maps are from fp32 maps, per method, and what bf16 buys in time.

    python scripts/bench_precision.py --scenes 32 --out benchmarks/precision.md
    python scripts/bench_precision.py --model vit_base_patch16_224:random --device cuda:0

For each method, the same held-out scenes are explained by the model in fp32 and under bf16
autocast (weights and method math stay float32); reported: Spearman correlation of the two maps
per image (mean and minimum), relative L2 error ‖bf16 − fp32‖ / ‖fp32‖, and explanations/s of
each (warm-up excluded).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from vitlens_server.cli import parse_model_spec
from vitlens_server.domain import Summary
from vitlens_server.evaluate import (
    LocalCalls,
    PlannedMethod,
    SyntheticDataset,
    batch_samples,
    method_maps,
    plan_method,
    resized,
    spearman,
)
from vitlens_server.explain import METHODS, Explainer
from vitlens_server.models import load_model
from vitlens_server.models.default import DEMO_MODEL_NAME

SKIP = {"oracle", "random"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEMO_MODEL_NAME, help="vitlens serve model spec")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scenes", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--methods", nargs="*", help="default: every method but oracle/random")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/precision.md"))
    args = parser.parse_args(argv)

    fp32 = load_model(parse_model_spec(args.model, args.device, "fp32"))
    bf16 = dataclasses.replace(fp32, spec=dataclasses.replace(fp32.spec, precision="bf16"))
    size, grid = fp32.geometry.input_size[1:], fp32.geometry.grid
    scenes = SyntheticDataset(args.scenes)
    pixels, labels, _ = batch_samples([scenes[i] for i in range(len(scenes))], size)
    methods = args.methods or [s.name for s in METHODS.specs() if s.name not in SKIP]
    calls = {"fp32": LocalCalls(Explainer(fp32)), "bf16": LocalCalls(Explainer(bf16))}
    rows = []
    for name in methods:
        method = plan_method(name)
        maps, rates = {}, {}
        for precision, model_calls in calls.items():
            _token_maps(method, model_calls, pixels[:2], labels[:2], grid, 2)  # warm-up
            _sync(args.device)
            started = time.perf_counter()
            maps[precision] = _token_maps(
                method, model_calls, pixels, labels, grid, args.batch_size
            ).double()
            _sync(args.device)
            rates[precision] = len(pixels) / (time.perf_counter() - started)
        rho = spearman(maps["bf16"], maps["fp32"]).numpy()
        error = (maps["bf16"] - maps["fp32"]).flatten(1).norm(dim=1) / maps["fp32"].flatten(1).norm(
            dim=1
        ).clamp(min=1e-30)
        rows.append((name, Summary.of(rho), float(rho.min()), float(error.mean()), rates))
        print(f"{name:24s} rho {rows[-1][1].mean:.4f} (min {rows[-1][2]:.4f})  rel L2 "
              f"{rows[-1][3]:.2e}  fp32 {rates['fp32']:.1f}/s  bf16 {rates['bf16']:.1f}/s",
              flush=True)  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(_report(fp32, args, rows))
    print(f"wrote {args.out}")
    return 0


def _token_maps(
    method: PlannedMethod,
    calls: LocalCalls,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    grid: tuple[int, int],
    batch_size: int,
) -> torch.Tensor:
    """Token-grid maps (B, gh, gw) explaining each image's prediction, made as Evaluate makes
    them (`method_maps`), ``batch_size`` images per call; pixels (B, 3, H, W), labels (B, K)."""
    parts = []
    for start in range(0, len(pixels), batch_size):
        rows = slice(start, start + batch_size)
        native, _ = method_maps(method, pixels[rows], calls, labels[rows, 0], None, label=False)
        parts.append(resized(native, grid))
    return torch.cat(parts)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _report(model, args, rows) -> str:
    weights = model.weights
    lines = [
        "# bf16 autocast versus fp32: map agreement and speed",
        "",
        f"Command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`  ",
        f"Model: {model.spec.architecture} ({model.name}), weights {weights.source}"
        f"{' (RANDOM)' if weights.random else ''}; {args.scenes} held-out scenes; device "
        f"{args.device} ({platform.machine()}, {torch.get_num_threads()} threads); "
        f"torch {torch.__version__}",
        "",
        "| method | Spearman ρ (mean ± 95 % CI) | min ρ | relative L2 | fp32 expl/s "
        "| bf16 expl/s |",
        "|---|---|---|---|---|---|",
    ]
    for name, rho, rho_min, error, rates in rows:
        lines.append(
            f"| `{name}` | {rho.mean:.4f} ± {rho.ci95:.4f} | {rho_min:.4f} | {error:.2e} | "
            f"{rates['fp32']:.1f} | {rates['bf16']:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())

"""Class specificity and sanity (parameter randomisation) of every method on the demo model.

    python scripts/method_report.py --scenes 50 --out benchmarks/methods.md

Class specificity (METHODS.md `class_sensitivity`): on held-out two-object scenes, each of the two
classes is explained; the map is upsampled, min-max scaled and Otsu-thresholded, and the IoU of
the mask with the explained object's mask minus the IoU with the other object's mask is averaged
over both objects of every scene. Sanity (Adebayo et al. 2018): Spearman correlation between the
maps of the trained model and of a copy with re-initialised weights on single-object scenes.
Both are Evaluate's registered metrics, run in process (`run_evaluation` over `LocalCalls`).
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from vitlens_server.evaluate import (
    LocalCalls,
    SyntheticDataset,
    plan_evaluation,
    randomised_copy,
    run_evaluation,
)
from vitlens_server.explain import METHODS, Explainer
from vitlens_server.models import load_model
from vitlens_server.models.default import demo_spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=50, help="scenes per table")
    parser.add_argument("--methods", nargs="*", help="default: every method except oracle")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/methods.md"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_model(demo_spec())
    if model.weights.random:
        print("warning: the demo weights are missing; the figures describe a random model")
    methods = args.methods or [s.name for s in METHODS.specs() if not s.needs_mask]
    pairs = SyntheticDataset(args.scenes, two_object=True)
    singles = SyntheticDataset(args.scenes)
    calls = LocalCalls(Explainer(model), randomised=Explainer(randomised_copy(model)))
    geometry = {
        "input_size": model.geometry.input_size[1:],
        "grid": model.geometry.grid,
        "num_classes": model.geometry.num_classes,
    }

    def evaluate(name: str, metric: str, dataset: SyntheticDataset) -> dict:
        """The service's metric in process: name → `Summary` of its values."""
        plan = plan_evaluation([name], [metric])
        (result,) = run_evaluation(plan, dataset, calls, **geometry)
        return result.values

    rows_specific, rows_sanity = [], []
    for name in methods:
        start = time.perf_counter()
        result = evaluate(name, "class_sensitivity", pairs)
        spec = METHODS.get(name)
        sanity = None
        if spec.class_specific:
            sanity = evaluate(name, "sanity", singles)["spearman"]
            rows_sanity.append((name, sanity))
        rows_specific.append(
            (
                name,
                spec.class_specific,
                *(result[k] for k in ("between_classes", "explained", "other", "difference")),
            )
        )
        print(
            f"{name:24s} specificity {rows_specific[-1][-1].mean:+.3f}"
            + (f"  sanity rho {sanity.mean:+.3f}" if sanity else "")
            + f"  ({time.perf_counter() - start:.1f} s)",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(_report(model, rows_specific, rows_sanity, args.scenes))
    print(f"wrote {args.out}")
    return 0


def _report(model, rows_specific, rows_sanity, count: int) -> str:
    weights = model.weights
    lines = [
        "# Method report: class specificity and sanity on the demo model",
        "",
        f"Command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`  ",
        f"Model: {model.spec.architecture} ({model.name}), weights {weights.source} "
        f"(sha256 {weights.sha256[:12] or '-'}{', RANDOM' if weights.random else ''})  ",
        f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads",
        "",
        f"## Class specificity ({count} held-out two-object scenes, both classes explained)",
        "",
        "IoU of the Otsu mask of the map with the explained object's mask and with the other "
        "object's mask; the difference is METHODS.md `class_sensitivity` (mean ± 95 % CI). "
        "ρ(A, B): Spearman correlation of a scene's two maps, one per class (1: the map does "
        "not depend on the class).",
        "",
        "| method | class-specific | ρ(A, B) | IoU explained | IoU other | difference |",
        "|---|---|---|---|---|---|",
    ]
    rows = sorted(rows_specific, key=lambda r: -r[-1].mean)
    for name, specific, between, explained, other, diff in rows:
        lines.append(
            f"| `{name}` | {'yes' if specific else 'no'} | {between.mean:.2f} | "
            f"{explained.mean:.3f} | {other.mean:.3f} | {diff.mean:+.3f} ± {diff.ci95:.3f} |"
        )
    lines += ["", _reading(model, {r[0]: r for r in rows_specific})]
    lines += [
        "",
        f"## Sanity: model-parameter randomisation ({count} held-out scenes)",
        "",
        "Spearman correlation between maps of the trained model and of a copy with "
        "re-initialised weights (both explaining the trained model's prediction). A faithful "
        "method decorrelates (ρ < 0.5 is the bar in tests/unit/test_sanity.py).",
        "",
        "| method | Spearman ρ | std |",
        "|---|---|---|",
    ]
    for name, summary in sorted(rows_sanity, key=lambda r: r[1].mean):
        lines.append(f"| `{name}` | {summary.mean:+.3f} ± {summary.ci95:.3f} | {summary.std:.3f} |")
    return "\n".join(lines) + "\n"


def _reading(model, rows: dict) -> str:
    """Why the last-block methods show little class, with this run's figures."""
    if not {"gradcam", "partial_lrp", "cam"} <= rows.keys():
        return ""
    heads = model.module.blocks[-1].attn.num_heads
    _, _, g_rho, g_in, g_out, _ = rows["gradcam"]
    p_rho = rows["partial_lrp"][2]
    return (
        "Reading the table. `gradcam` (METHODS.md: last block only) weights each of the last "
        f"block's {heads} heads by one scalar, the mean gradient of its CLS attention row. The "
        f"class does change its map (ρ(A, B) = {g_rho.mean:.2f}), but all it can do is re-weight "
        f"{heads} fixed attention rows, and in this {heads}-head model no row singles out one "
        f"object: the maps land on either object alike (IoU {g_in.mean:.3f} with the explained "
        f"one, {g_out.mean:.3f} with the other). `partial_lrp` (head mean of the last block's "
        f"attention relevance) hardly depends on the class (ρ(A, B) = {p_rho.mean:.2f}). `cam` "
        "applies the class weights to the last block's patch tokens, which the class token "
        "never reads in a class-token ViT; it is the literature's baseline. Methods that "
        "propagate through every block (`generic`, `transformer_attribution`) and `agcam` "
        "separate the two objects; the class-agnostic rows score exactly 0 by construction."
    )


if __name__ == "__main__":
    raise SystemExit(main())

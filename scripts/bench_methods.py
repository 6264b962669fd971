"""Every method ÷ the roof of the passes it declares, and Predict ÷ the fused forward.

    PYTHONPATH=client:server:. python scripts/bench_methods.py --device cpu --threads 2
    PYTHONPATH=client:server:. python scripts/bench_methods.py --device cuda \\
        --model vit_base_patch16_224 --batch-sizes 1 8 32 64

The arithmetic and the interleaved rounds are `vitlens_server.bench.methods`. Writes
benchmarks/methods_roof/<device>-<model>.json and .md (with a cProfile of each method under
--target of its roof) and replaces this run's section of BENCHMARKS.md. Models without local
weights run with seeded random weights: speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from vitlens_server.bench.malloc import add_malloc_flag, apply_malloc_flag
from vitlens_server.bench.methods import MethodsReport, measure_methods, profile_method
from vitlens_server.bench.report import replace_section
from vitlens_server.explain import Explainer
from vitlens_server.models import LoadedModel, ModelSpec, load_model
from vitlens_server.models.default import DEMO_MODEL_NAME, demo_spec

ROOT = Path(__file__).resolve().parents[1]


def build(model: str, device: str) -> LoadedModel:
    """The demo model, else a timm architecture with seeded random weights."""
    if model in ("demo", DEMO_MODEL_NAME):
        return load_model(demo_spec(device))
    return load_model(ModelSpec(name=model, architecture=model, device=device))


def explainable(model: LoadedModel) -> list[str]:
    """The methods Explain accepts for ``model``, but the reference rows (random), and
    saliency's SmoothGrad and Integrated Gradients modes as rows of their own."""
    explainer = Explainer(model)
    try:
        names = [s.name for s in explainer.supported_methods() if s.name != "random"]
    finally:
        explainer.close()
    if "saliency" in names:
        names += ["saliency:smoothgrad", "saliency:integrated_gradients"]
    return names


def markdown(report: MethodsReport, target: float, profiles: dict[str, str], env: str) -> str:
    prims = report.primitives
    lines = [
        f"Model {report.model} on {report.device}; {env}. Batch sizes "
        f"{', '.join(map(str, report.batch_sizes))}; {report.rounds} interleaved rounds.",
        "",
        f"Roof primitives at their best batch size: fused forward {1 / prims.forward:.1f} "
        f"images/s, fused forward+backward {1 / prims.forward_backward:.1f} images/s; for "
        f"reference, timm's unfused forward (the one that forms the attention maps) "
        f"{max(report.unfused_forward.values()):.1f} images/s.",
        "",
        "| Predict | " + " | ".join(f"B = {b}" for b in report.batch_sizes) + " |",
        "|---|" + "---|" * len(report.batch_sizes),
        "| fused forward, images/s | "
        + " | ".join(f"{report.forward[b]:.1f}" for b in report.batch_sizes)
        + " |",
        "| Predict, images/s | "
        + " | ".join(f"{report.predict[b]:.1f}" for b in report.batch_sizes)
        + " |",
        "| Predict ÷ fused forward | "
        + " | ".join(f"**{report.predict_ratio(b):.3f}**" for b in report.batch_sizes)
        + " |",
        "",
        "| method | declared passes | best B | explanations/s | roof/s | ÷ roof |",
        "|---|---|---|---|---|---|",
    ]
    for name in sorted(report.methods, key=report.ratio, reverse=True):
        best = report.best_batch(name)
        ratio = report.ratio(name)
        mark = "" if ratio >= target else " (under)"
        lines.append(
            f"| `{name}` | {report.passes[name]} | {best} | {report.methods[name][best]:.2f} "
            f"| {report.roofs[name]:.2f} | **{ratio:.3f}**{mark} |"
        )
    for name, text in profiles.items():
        lines += ["", f"Profile of `{name}` (one call, own time):", "", "```", text, "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="demo, or a timm architecture name")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--methods",
        nargs="*",
        help="methods, or method:mode (saliency:integrated_gradients); default: every method "
        "Explain accepts and saliency's two other modes",
    )
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls a round")
    parser.add_argument("--max-call-s", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--target", type=float, default=0.9, help="profile methods under it")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "methods_roof")
    parser.add_argument("--no-benchmarks-md", action="store_true")
    add_malloc_flag(parser)
    args = parser.parse_args()
    malloc = apply_malloc_flag(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args.model, args.device)
    methods = args.methods or explainable(model)
    report = measure_methods(
        model,
        methods,
        batch_sizes=args.batch_sizes,
        rounds=args.rounds,
        repeats=args.repeats,
        max_call_s=args.max_call_s,
        log=print,
    )
    under = [m for m in report.methods if report.ratio(m) < args.target]
    profiles = {m: profile_method(model, m, report.best_batch(m)) for m in under}
    env = f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads" + (
        f", {torch.cuda.get_device_name()}" if model.device.type == "cuda" else ""
    )
    env += f", host malloc {malloc}"
    body = markdown(report, args.target, profiles, env)
    print(body)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{model.device.type}-{model.name}"
    (args.out / f"{stem}.md").write_text(f"# Methods ÷ roof: {stem}\n\n{body}")
    doc = {
        "model": report.model,
        "device": report.device,
        "env": env,
        "batch_sizes": report.batch_sizes,
        "rounds": report.rounds,
        "forward": report.forward,
        "forward_backward": report.forward_backward,
        "predict": report.predict,
        "unfused_forward": report.unfused_forward,
        "methods": report.methods,
        "roofs": report.roofs,
        "ratios": {m: report.ratio(m) for m in report.methods},
        "passes": report.passes,
    }
    (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    if not args.no_benchmarks_md:
        path = ROOT / "BENCHMARKS.md"
        key = f"methods-roof {stem}"
        title = f"## Methods ÷ roof · {report.model} · {report.device}\n\n"
        command = (
            "Command: `PYTHONPATH=client:server:. python scripts/bench_methods.py "
            f"--model {args.model} --device {args.device}"
            f" --batch-sizes {' '.join(map(str, args.batch_sizes))}"
            + (f" --threads {args.threads}" if args.threads else "")
            + "`\n\n"
        )
        path.write_text(replace_section(path.read_text(), key, title + command + body))


if __name__ == "__main__":
    main()

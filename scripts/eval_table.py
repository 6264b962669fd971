"""A model's evaluation table: every method x every metric on held-out generated scenes.

    python scripts/eval_table.py                      # 500 scenes, all methods, resumable
    python scripts/eval_table.py --model vitlens-clip --methods oracle,random,rollout,generic \
        --metrics segmentation,deletion,insertion,average_drop,class_sensitivity \
        --out benchmarks/evaluation-clip              # an image-text model, zero-shot
    python scripts/eval_table.py --scenes 40 --block 20 --methods oracle,random,generic
    python scripts/eval_table.py --parts single --metrics perturbation,deletion \
        --metric-option perturbation.baseline=inpaint --out benchmarks/evaluation-inpaint

Starts `vitlens serve` (the embedded demo model, or the ``--model`` spec; result cache off) on
loopback and calls `Evaluate` through the SDK, block by block: ``synthetic:BLOCK:START``
single-object scenes with every single-object metric, and ``synthetic:BLOCK:START:two_object``
scenes with `class_sensitivity`. An image-text model is scored zero-shot over its label prompts
(seed 004 Table 2's protocol; it has no ``sanity``). Blocks are the same scenes as one
``synthetic:SCENES`` run (a scene is a function of its seed), so their results merge exactly
(deploy/eval/merge_results.py, the pooled statistics of the sharded Kubernetes Job). Each
finished block is written to ``OUT/shards/`` with its wall time and plan (methods, metrics,
metric options), and blocks already there are skipped: an interrupted run continues where it
stopped; a block made with another plan, or with other weights (each block records the served
weights' SHA-256), stops the run (use another ``--out``). At the end the
merged results become ``OUT/<part>/report.md`` (tables and curve plots, `vitlens.report`) and
``OUT/README.md`` (time, machine, options, orderings).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "client"), str(ROOT / "server"), str(ROOT / "deploy" / "eval")]

from merge_results import merge_results  # noqa: E402

import vitlens  # noqa: E402
from vitlens.cli import metric_option_arg  # noqa: E402
from vitlens.evaluation import EvaluationResult  # noqa: E402
from vitlens.report import write_report  # noqa: E402
from vitlens_server.bench.process import ServeProcess  # noqa: E402

SINGLE_METRICS = ("segmentation", "perturbation", "deletion", "insertion", "average_drop", "sanity")
PARTS = {"single": ("", SINGLE_METRICS), "two_object": (":two_object", ("class_sensitivity",))}
ALL_METHODS = (
    "oracle", "random", "raw_attention", "rollout", "attention_flow", "saliency", "cam",
    "gradcam", "agcam", "isaw", "partial_lrp", "transformer_attribution", "generic",
    "token_reflection",
)  # fmt: skip
CLASS_SPECIFIC = ("generic", "transformer_attribution", "gradcam", "agcam")
_CAM_READING = (
    " CAM scores the final-norm patch tokens with the class's classifier row, but a class-token "
    "ViT's head reads only the class token: nothing trains the patch tokens to carry the class "
    "where the object is (METHODS.md keeps CAM as the literature's baseline)."
)
_GRADCAM_READING = (
    "- `gradcam` (METHODS.md: the last block only) can only re-weight that block's class-token "
    "attention rows, one scalar per head; in the demo model's 3 heads no row singles out one "
    "object, so its map lands on either object alike (benchmarks/methods.md measures the "
    "between-class correlation of its maps and the IoU with each object)."
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenes", type=int, default=500, help="held-out scenes per part")
    p.add_argument("--block", type=int, default=50, help="scenes per Evaluate call")
    p.add_argument("--methods", default=",".join(ALL_METHODS), help="comma-separated")
    p.add_argument("--parts", default="single,two_object", help="single, two_object or both")
    p.add_argument("--metrics", default="", help="only these metrics (comma-separated)")
    p.add_argument(
        "--metric-option", action="append", default=[], type=metric_option_arg,
        metavar="METRIC.KEY=VALUE", help="e.g. perturbation.baseline=inpaint; repeatable",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "evaluation")
    p.add_argument("--model", default="", help="serve this `vitlens serve --model` spec instead")
    p.add_argument("--threads", type=int, default=0, help="server torch threads (0: default)")
    p.add_argument("--note", default="", help="a sentence about the machine, e.g. its load")
    args = p.parse_args(argv)
    plans = _plans(args)
    shards = args.out / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    for part, plan in plans.items():
        for done in shards.glob(f"{part}-*.json"):
            if json.loads(done.read_text()).get("plan") != plan:
                p.error(f"{done} was made with another plan; pass another --out")
    todo = [
        (part, start)
        for part in plans
        for start in range(0, args.scenes, args.block)
        if not (shards / f"{part}-{start:04d}.json").exists()
    ]
    if todo:
        flags = ["--cache-mb", "0", "--log-level", "warning"]
        flags += ["--threads", str(args.threads)] if args.threads else []
        flags += ["--model", args.model] if args.model else []
        with (
            ServeProcess.start(flags, log=args.out / "serve.log") as server,
            vitlens.Client(server.address, timeout_s=30) as client,
        ):
            server.wait_serving(timeout_s=600)
            weights = _weights_sha256(client, _name(args.model))
            for done in shards.glob("*.json"):
                if json.loads(done.read_text()).get("weights_sha256") != weights:
                    p.error(f"{done} was made with other weights than {weights}; use another --out")
            for number, (part, start) in enumerate(todo, 1):
                size = min(args.block, args.scenes - start)
                print(f"[{number}/{len(todo)}] {part} scenes {start}..{start + size - 1}")
                _block(client, part, start, size, plans[part], shards, _name(args.model), weights)
    _finish(args, plans, shards, argv)
    return 0


def _plans(args) -> dict[str, dict]:
    """part → what its Evaluate calls ask for (kept in each block's record)."""
    chosen = set(args.metrics.split(",")) if args.metrics else None
    options: dict[str, dict] = {}
    for metric, values in args.metric_option:
        options.setdefault(metric, {}).update(values)
    plans = {}
    for part in args.parts.split(","):
        metrics = [m for m in PARTS[part][1] if chosen is None or m in chosen]
        if metrics:
            used = {m: o for m, o in sorted(options.items()) if m in metrics}
            plans[part] = {"methods": args.methods.split(","), "metrics": metrics, "options": used}
    return plans


def _name(spec: str) -> str:
    """The served name of a ``--model`` spec ("" for the default model)."""
    return spec.partition("=")[0]


def _weights_sha256(client, model: str) -> str:
    """The SHA-256 of the served weights of ``model`` ("" for the server's default)."""
    models = client.models()
    info = next((m for m in models if m.name == model), models[0] if not model else None)
    if info is None:
        raise SystemExit(f"the server does not serve {model!r}")
    return info.weights.sha256


def _block(
    client, part: str, start: int, size: int, plan: dict, shards: Path, model: str, weights: str
) -> None:
    dataset = f"synthetic:{size}:{start}{PARTS[part][0]}"
    began = time.monotonic()

    def show(progress) -> None:
        elapsed = time.monotonic() - began
        print(
            f"\r  {progress.done}/{progress.total} image-methods  {progress.stage:<24} "
            f"{elapsed:6.0f} s  eta {progress.eta_seconds:6.0f} s",
            end="",
            flush=True,
        )

    result = client.evaluate(
        plan["methods"], plan["metrics"], dataset=dataset, model=model,
        metric_options=plan["options"], on_progress=show, timeout_s=24 * 3600,
    )  # fmt: skip
    seconds = time.monotonic() - began
    print(f"\r  done in {seconds:.0f} s{' ' * 60}")
    record = json.loads(result.to_json())
    record["plan"] = plan
    record["weights_sha256"] = weights  # a resumed run refuses blocks of other weights
    record["seconds"] = round(seconds, 1)
    record["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    path = shards / f"{part}-{start:04d}.json"
    path.with_suffix(".tmp").write_text(json.dumps(record, indent=1))
    path.with_suffix(".tmp").rename(path)  # a half-written block is never merged


def _finish(args, plans: dict[str, dict], shards: Path, argv) -> None:
    """Merge every part whose blocks are all there; write its report and the summary."""
    lines = [
        f"# Evaluation of every method on {_name(args.model) or 'the demo model'}",
        "",
        "Produced by",
        "",
        "```",
        "python scripts/eval_table.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "```",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}; "
        + (args.note or "no note given."),
        "",
    ]
    merged: dict[str, EvaluationResult] = {}
    for part, plan in plans.items():
        files = sorted(shards.glob(f"{part}-*.json"))
        blocks = [json.loads(f.read_text()) for f in files]
        if sum(_size(b["dataset"]) for b in blocks) < args.scenes:
            lines += [f"## {part}: incomplete ({len(blocks)} blocks so far)", ""]
            continue
        result = EvaluationResult.from_dict(merge_results(blocks))
        merged[part] = result
        write_report(result, args.out / part)
        seconds = sum(b["seconds"] for b in blocks)
        images = _size(result.dataset)
        settings = ", ".join(
            f"`{m}.{k}={v}`" for m, o in plan["options"].items() for k, v in o.items()
        )
        lines += [
            f"## {part}: `{result.dataset}`, {len(plan['methods'])} methods",
            "",
            f"Metrics {', '.join(plan['metrics'])}; options: {settings or 'the defaults'}. "
            f"Wall time {seconds / 60:.1f} min in {len(blocks)} Evaluate calls "
            f"({images * len(plan['methods']) / seconds:.2f} image-methods/s); tables and curves "
            f"in [{part}/report.md]({part}/report.md).",
            "",
        ]
    lines += _orderings(merged)
    (args.out / "README.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'README.md'}")


def _size(dataset: str) -> int:
    return int(dataset.split(":")[1])


def _orderings(merged: dict[str, EvaluationResult]) -> list[str]:
    """The orderings issue #6 expects, each with its numbers and whether it holds."""
    lines = ["## Expected orderings", ""]

    def stat(result, method, metric, name):
        """The merged statistic (mean, 95 % interval, n), or None where it was not run."""
        try:
            return result.get(method, metric).value(name)
        except KeyError:
            return None

    def mean(result, method, metric, name) -> float | None:
        value = stat(result, method, metric, name)
        return None if value is None else value.mean

    def check(text: str, holds: bool) -> None:
        lines.append(f"- {'holds' if holds else '**does not hold**'}: {text}")

    single = merged.get("single")
    if single is not None:
        ious = {r.method: r.value("iou").mean for r in single.results if r.metric == "segmentation"}
        if ious:
            best, worst = max(ious, key=ious.get), min(ious, key=ious.get)
            check(f"oracle best on IoU (best: {best}, {ious[best]:.3f})", best == "oracle")
            if "random" in ious:
                check(f"random worst on IoU (worst: {worst}, {ious[worst]:.3f})", worst == "random")
            below = mean(single, worst, "segmentation", "ap_foreground")
            chance_ap = mean(single, "random", "segmentation", "ap_foreground")
            if worst != "random" and None not in (below, chance_ap) and below < chance_ap:
                lines.append(
                    f"- {worst}'s average precision for the object's pixels, {below:.3f}, is "
                    f"below that of random maps ({chance_ap:.3f}, about the object's share of "
                    f"the image): its map ranks the object *below* the background, so Otsu's "
                    "foreground misses it more often than a random map's does."
                    + (_CAM_READING if worst == "cam" else "")
                )
        chance = mean(single, "random", "perturbation", "positive_auc")
        oracle = mean(single, "oracle", "perturbation", "positive_auc")
        for method in ("generic", "transformer_attribution"):
            auc = mean(single, method, "perturbation", "positive_auc")
            if auc is not None and chance is not None:
                check(
                    f"positive perturbation AUC of {method} {auc:.1f} < random {chance:.1f}",
                    auc < chance,
                )
        if None not in (oracle, chance) and oracle > chance:
            lines.append(
                f"- the oracle, whose map removes exactly the object first, scores {oracle:.1f} "
                f"on positive perturbation, worse than random maps ({chance:.1f}): the removed "
                "pixels leave the object's silhouette, which the model still recognises. "
                "`--metric-option perturbation.baseline=inpaint` removes without a silhouette "
                '(README, "Evaluating methods").'
            )
    pairs = merged.get("two_object")
    if pairs is not None:
        baseline = stat(pairs, "rollout", "class_sensitivity", "difference")
        for method in CLASS_SPECIFIC:
            value = stat(pairs, method, "class_sensitivity", "difference")
            if value is None or baseline is None:
                continue
            clearly = value.ci95_low > baseline.ci95_high  # the 95 % intervals do not overlap
            check(
                f"class sensitivity of {method} {value.mean:.3f} "
                f"[{value.ci95_low:.3f}, {value.ci95_high:.3f}] clearly above rollout "
                f"{baseline.mean:.3f} [{baseline.ci95_low:.3f}, {baseline.ci95_high:.3f}]",
                clearly,
            )
            if not clearly and method == "gradcam":
                lines.append(_GRADCAM_READING)
    return [*lines, ""]


if __name__ == "__main__":
    sys.exit(main())

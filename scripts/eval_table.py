"""A model's evaluation table: every method x every metric on held-out generated scenes.

    python scripts/eval_table.py                      # 500 scenes, all methods, resumable
    python scripts/eval_table.py --model vitlens-clip --methods oracle,random,rollout,generic \
        --metrics segmentation,deletion,insertion,average_drop,class_sensitivity \
        --out benchmarks/evaluation-clip              # an image-text model, zero-shot
    python scripts/eval_table.py --scenes 40 --block 20 --methods oracle,random,generic
    python scripts/eval_table.py --parts single --metrics perturbation,deletion \
        --metric-option perturbation.baseline=inpaint --out benchmarks/evaluation-inpaint
    python scripts/eval_table.py --model vitlens-visualbert --block 100 \
        --out benchmarks/evaluation-visualbert

Starts `vitlens serve` (the embedded demo model, or the ``--model`` spec; result cache off) on
loopback and calls `Evaluate` through the SDK, block by block: ``synthetic:BLOCK:START``
single-object scenes with every single-object metric, and ``synthetic:BLOCK:START:two_object``
scenes with `class_sensitivity`. A visual question answering model (GetModel's task) has one
part, ``vqa``: ``synthetic_vqa:BLOCK:START`` scenes with a question each, seed 003's token
perturbation per modality and the question's segmentation, rows ``generic+lrp`` and the like
for a method with fixed options, and seed 003's orderings (scripts/eval_table_vqa.py). An
image-text model is scored zero-shot over its label prompts (seed 004 Table 2's protocol; it
has no ``sanity``). Blocks are the same scenes as one
``synthetic:SCENES`` run (a scene is a function of its seed), so their results merge exactly
(deploy/eval/merge_results.py, the pooled statistics of the sharded Kubernetes Job). Each
finished block is written to ``OUT/shards/`` with its wall time and plan (methods, metrics,
metric options), and blocks already there are skipped: an interrupted run continues where it
stopped; a block made with another plan, or with other weights (each block records the served
weights' SHA-256), stops the run (use another ``--out``). At the end the
merged results become ``OUT/<part>/report.md`` (tables and curve plots, `vitlens.report`) and
``OUT/README.md`` (time, machine, options, orderings). ``--address`` evaluates a server that is
already running (its ``--model`` is a served name) instead of starting one.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / p) for p in ("client", "server", "deploy/eval", "scripts")]

from eval_table_vqa import (  # noqa: E402
    VQA_METHODS,
    VQA_PARTS,
    evaluate_calls,
    served_method,
    summary_table,
    vqa_orderings,
)
from merge_results import merge_results  # noqa: E402

import vitlens  # noqa: E402
from vitlens.cli import metric_option_arg  # noqa: E402
from vitlens.evaluation import EvaluationResult  # noqa: E402
from vitlens.report import write_report  # noqa: E402
from vitlens_server.bench.process import ServeProcess  # noqa: E402

SINGLE_METRICS = ("segmentation", "perturbation", "deletion", "insertion", "average_drop", "sanity")
PARTS = {
    "single": ("synthetic:{size}:{start}", SINGLE_METRICS),
    "two_object": ("synthetic:{size}:{start}:two_object", ("class_sensitivity",)),
}
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
    p.add_argument("--methods", default="", help="comma-separated (default: all of the task's)")
    p.add_argument("--parts", default="", help="single, two_object or both (VQA: vqa)")
    p.add_argument("--metrics", default="", help="only these metrics (comma-separated)")
    p.add_argument(
        "--metric-option", action="append", default=[], type=metric_option_arg,
        metavar="METRIC.KEY=VALUE", help="e.g. perturbation.baseline=inpaint; repeatable",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "evaluation")
    p.add_argument("--model", default="", help="serve this `vitlens serve --model` spec instead")
    p.add_argument("--threads", type=int, default=0, help="server torch threads (0: default)")
    p.add_argument("--address", default="", help="HOST:PORT of a running server to evaluate")
    p.add_argument("--note", default="", help="a sentence about the machine, e.g. its load")
    args = p.parse_args(argv)
    if args.address and (args.threads or "=" in args.model):
        p.error("--address evaluates a running server: --model names a served model, no --threads")
    shards = args.out / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    vqa = _recorded_vqa(shards)  # None: no blocks yet, the served model's task decides
    plans = None if vqa is None else _plans(args, vqa, p)
    if plans is not None:
        _check_plans(plans, shards, p)
    if plans is None or _todo(args, plans, shards):
        with (
            _served(args) as address,
            vitlens.Client(address, timeout_s=30) as client,
        ):
            info = _model_info(client, _name(args.model))
            if vqa is not None and vqa != info.vqa:
                p.error(
                    f"{shards} holds blocks of another task than {info.task}; use another --out"
                )
            plans = _plans(args, info.vqa, p)
            _check_plans(plans, shards, p)
            weights = info.weights.sha256
            for done in shards.glob("*.json"):
                if json.loads(done.read_text()).get("weights_sha256") != weights:
                    p.error(f"{done} was made with other weights than {weights}; use another --out")
            extra = {"stream_architecture": info.stream_architecture} if info.vqa else {}
            todo = _todo(args, plans, shards)
            for number, (part, start) in enumerate(todo, 1):
                size = min(args.block, args.scenes - start)
                print(f"[{number}/{len(todo)}] {part} scenes {start}..{start + size - 1}")
                run = (part, start, size, plans[part])
                _block(client, run, shards, _name(args.model), weights, extra)
    _finish(args, plans, shards, argv)
    return 0


def _recorded_vqa(shards: Path) -> bool | None:
    """Whether the blocks in ``shards`` are of a VQA model; None when there are none."""
    names = {f.name.rpartition("-")[0] for f in shards.glob("*-*.json")}
    if not names & {*PARTS, *VQA_PARTS}:
        return None
    return bool(names & set(VQA_PARTS))


def _check_plans(plans: dict[str, dict], shards: Path, p: argparse.ArgumentParser) -> None:
    """A block made with another plan stops the run."""
    for part, plan in plans.items():
        for done in shards.glob(f"{part}-*.json"):
            if json.loads(done.read_text()).get("plan") != plan:
                p.error(f"{done} was made with another plan; pass another --out")


def _todo(args, plans: dict[str, dict], shards: Path) -> list[tuple[str, int]]:
    """(part, first scene) of every block not yet in ``shards``."""
    return [
        (part, start)
        for part in plans
        for start in range(0, args.scenes, args.block)
        if not (shards / f"{part}-{start:04d}.json").exists()
    ]


@contextlib.contextmanager
def _served(args) -> Iterator[str]:
    """The address of ``--address``, or of a `vitlens serve` started for the run."""
    if args.address:
        yield args.address
        return
    flags = ["--cache-mb", "0", "--log-level", "warning"]
    flags += ["--threads", str(args.threads)] if args.threads else []
    flags += ["--model", args.model] if args.model else []
    with ServeProcess.start(flags, log=args.out / "serve.log") as server:
        server.wait_serving(timeout_s=600)
        yield server.address


def _plans(args, vqa: bool, p: argparse.ArgumentParser) -> dict[str, dict]:
    """part → what its Evaluate calls ask for (kept in each block's record)."""
    parts = VQA_PARTS if vqa else PARTS
    chosen = set(args.metrics.split(",")) if args.metrics else None
    options: dict[str, dict] = {}
    for metric, values in args.metric_option:
        options.setdefault(metric, {}).update(values)
    methods = args.methods.split(",") if args.methods else list(VQA_METHODS if vqa else ALL_METHODS)
    calls = evaluate_calls(methods)
    plans = {}
    for part in args.parts.split(",") if args.parts else parts:
        if part not in parts:
            p.error(f"--parts {part!r}: this model's parts are {', '.join(parts)}")
        metrics = [m for m in parts[part][1] if chosen is None or m in chosen]
        if metrics:
            used = {m: o for m, o in sorted(options.items()) if m in metrics}
            plans[part] = {"methods": methods, "metrics": metrics, "options": used}
            if len(calls) > 1 or calls[0][1]:
                plans[part]["calls"] = [{"methods": m, "method_options": o} for m, o in calls]
    return plans


def _name(spec: str) -> str:
    """The served name of a ``--model`` spec ("" for the default model)."""
    return spec.partition("=")[0]


def _model_info(client, model: str) -> vitlens.ModelInfo:
    """GetModel of ``model`` ("" for the server's default)."""
    try:
        return client.model(model)
    except vitlens.NotFoundError:
        raise SystemExit(f"the server does not serve {model!r}") from None


def _block(
    client, run: tuple[str, int, int, dict], shards: Path, model: str, weights: str, extra: dict
) -> None:
    """Evaluate one block (``run``: part, first scene, scenes, plan) and write its record."""
    part, start, size, plan = run
    dataset = {**PARTS, **VQA_PARTS}[part][0].format(size=size, start=start)
    calls = plan.get("calls") or [{"methods": plan["methods"], "method_options": {}}]
    began = time.monotonic()

    def show(progress) -> None:
        elapsed = time.monotonic() - began
        print(
            f"\r  {progress.done}/{progress.total} item-methods  {progress.stage:<24} "
            f"{elapsed:6.0f} s  eta {progress.eta_seconds:6.0f} s",
            end="",
            flush=True,
        )

    record: dict = {}
    for call in calls:
        sent = [served_method(row) for row in call["methods"]]
        result = client.evaluate(
            sent, plan["metrics"], dataset=dataset, model=model,
            method_options=call["method_options"] or None, metric_options=plan["options"],
            on_progress=show, timeout_s=24 * 3600,
        )  # fmt: skip
        got = json.loads(result.to_json())
        for item in got["results"]:  # reported under the row's name (generic+lrp)
            item["method"] = call["methods"][sent.index(item["method"])]
        if record:
            record["results"] += got["results"]
        else:
            record = got
    if len(calls) > 1:  # the plan's row order
        record["results"].sort(key=lambda r: plan["methods"].index(r["method"]))
    seconds = time.monotonic() - began
    print(f"\r  done in {seconds:.0f} s{' ' * 60}")
    record["plan"] = plan
    record["weights_sha256"] = weights  # a resumed run refuses blocks of other weights
    record["seconds"] = round(seconds, 1)
    record["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    record |= extra  # a VQA model's stream architecture, for the orderings
    if len(calls) > 1:
        record["calls"] = len(calls)
    path = shards / f"{part}-{start:04d}.json"
    path.with_suffix(".tmp").write_text(json.dumps(record, indent=1))
    path.with_suffix(".tmp").rename(path)  # a half-written block is never merged


def _finish(args, plans: dict[str, dict], shards: Path, argv) -> None:
    """Merge every part whose blocks are all there; write its report and the summary."""
    default = "the server's default model" if args.address else "the demo model"
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}"
    if args.address:
        machine = f"the server at {args.address}, already running; client {machine}"
    lines = [
        f"# Evaluation of every method on {_name(args.model) or default}",
        "",
        "Produced by",
        "",
        "```",
        "python scripts/eval_table.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "```",
        "",
        f"Machine: {machine}; " + (args.note or "no note given."),
        "",
    ]
    merged: dict[str, EvaluationResult] = {}
    streams = ""  # a VQA model's stream architecture, as its blocks recorded it
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
        calls = sum(b.get("calls", 1) for b in blocks)
        images = _size(result.dataset)
        unit = "question" if part in VQA_PARTS else "image"
        settings = ", ".join(
            f"`{m}.{k}={v}`" for m, o in plan["options"].items() for k, v in o.items()
        )
        lines += [
            f"## {part}: `{result.dataset}`, {len(plan['methods'])} methods",
            "",
            f"Metrics {', '.join(plan['metrics'])}; options: {settings or 'the defaults'}. "
            f"Wall time {seconds / 60:.1f} min in {calls} Evaluate calls "
            f"({images * len(plan['methods']) / seconds:.2f} {unit}-methods/s); tables and curves "
            f"in [{part}/report.md]({part}/report.md).",
            "",
        ]
        if part in VQA_PARTS:
            streams = blocks[0].get("stream_architecture", "")
            lines += summary_table(result, plan["methods"])
    lines += _orderings(merged, streams)
    (args.out / "README.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'README.md'}")


def _size(dataset: str) -> int:
    return int(dataset.split(":")[1])


def _orderings(merged: dict[str, EvaluationResult], streams: str = "") -> list[str]:
    """The orderings issue #6 expects (a VQA model: seed 003's, `vqa_orderings` of its
    ``streams`` architecture), each with its numbers and whether it holds."""
    lines = ["## Expected orderings", ""]
    for part in VQA_PARTS:
        if part in merged:
            rows = list(dict.fromkeys(r.method for r in merged[part].results))
            lines += vqa_orderings(merged[part], rows, streams)

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

"""A detector's evaluation table: seed 003 Table 1's weakly supervised segmentation, every method.

    python scripts/eval_table_detr.py                       # vitlens-detr, 500 held-out scenes
    python scripts/eval_table_detr.py --scenes 40 --resamples 5 --out /tmp/detr-table

Starts `vitlens serve --model MODEL` (result cache off) on loopback and calls `Evaluate` once
through the SDK on ``synthetic_detection:SCENES``: metric ``detection_segmentation`` (every
detection with class probability > 0.5, its map → Otsu mask, COCO mask AP/AR with IoU
thresholds from 0.2) for every method, and ``detection`` (the detector's own box AP, COCO's
thresholds) once. AP is a statistic of the whole set, not a mean of per-scene values, so the
run is one call, not blocks; its spread is a bootstrap over scenes (``--resamples``).

Rows ``generic+lrp`` (``generic`` with ``averaging=lrp``, Eq. 13) are a second Evaluate call.
``OUT/README.md`` gets the table (AP, AP20, AP50, AP_medium, AP_large, AR, AR_medium,
AR_large, as Table 1), the wall time, the command, the machine, and seed 003's ordering checked:
``generic`` (the encoder-decoder rules) above every baseline of Table 1 (raw attention,
rollout, Grad-CAM, partial LRP, Transformer Attribution) on AP and AR, and every method above
``random``.
``OUT/results.json`` holds every statistic.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / p) for p in ("client", "server")]

import vitlens  # noqa: E402
from vitlens_server.bench.process import ServeProcess  # noqa: E402

METHODS = (
    "random",
    "raw_attention",
    "rollout",
    "gradcam",
    "partial_lrp",
    "transformer_attribution",
    "generic",
    "generic+lrp",
)
ALIASES = {"generic+lrp": ("generic", {"generic": {"averaging": "lrp"}})}  # row: (method, options)
COLUMNS = ("ap", "ap20", "ap50", "ap_medium", "ap_large", "ar", "ar_medium", "ar_large")
BASELINES = ("raw_attention", "rollout", "gradcam", "partial_lrp", "transformer_attribution")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vitlens-detr")
    parser.add_argument("--scenes", type=int, default=500)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--resamples", type=int, default=20, help="bootstrap draws")
    parser.add_argument("--threads", type=int, help="the server's torch threads")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "evaluation-detr")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    flags = ["--cache-mb", "0", "--log-level", "warning", "--model", args.model]
    flags += ["--threads", str(args.threads)] if args.threads else []
    methods = args.methods.split(",")
    with ServeProcess.start(flags, log=args.out / "serve.log") as server:
        server.wait_serving(timeout_s=600)
        with vitlens.Client(server.address, timeout_s=None) as client:
            info = client.model(args.model)
            started = time.perf_counter()
            options = {"detection_segmentation": {"resamples": args.resamples}}
            dataset = f"synthetic_detection:{args.scenes}"
            plain = [m for m in methods if m not in ALIASES]
            result = client.evaluate(
                plain, ["detection_segmentation", "detection"], dataset=dataset,
                model=args.model, metric_options=options, on_progress=_show,
            )  # fmt: skip
            rows = {(r.method, r.metric): r for r in result.results}
            for row in (m for m in methods if m in ALIASES):
                method, method_options = ALIASES[row]
                extra = client.evaluate(
                    [method], ["detection_segmentation"], dataset=dataset, model=args.model,
                    metric_options=options, method_options=method_options, on_progress=_show,
                )  # fmt: skip
                rows[row, "detection_segmentation"] = dataclasses.replace(
                    extra.results[0], method=row
                )
            seconds = time.perf_counter() - started
    print(file=sys.stderr)
    (args.out / "results.json").write_text(json.dumps(_as_json(rows.values()), indent=1) + "\n")
    command = shlex.join(["python", "scripts/eval_table_detr.py", *(argv or sys.argv[1:])])
    text = _report(args, info, methods, rows, seconds, command)
    (args.out / "README.md").write_text(text)
    print(text)
    return 0


def _show(progress) -> None:
    print(
        f"\r{progress.stage:<24} {progress.done}/{progress.total}  "
        f"{progress.images_per_second:.1f} img/s  eta {progress.eta_seconds / 60:.1f} min",
        end="",
        file=sys.stderr,
        flush=True,
    )


def _as_json(results) -> list[dict]:
    return [
        {
            "method": r.method,
            "metric": r.metric,
            "values": {v.name: [v.mean, v.std, v.n] for v in r.values},
        }
        for r in results
    ]


def _cell(row, name: str) -> str:
    value = row.value(name)
    if value.mean != value.mean:
        return "n/a"
    return f"{100 * value.mean:.1f} ± {100 * value.std:.1f}"


def _report(args, info, methods, rows, seconds: float, command: str) -> str:
    segmentation = {m: rows[m, "detection_segmentation"] for m in methods}
    box = rows["detector", "detection"]
    lines = [
        f"# Weakly supervised segmentation from detections: {args.model}",
        "",
        f"Seed 003 Table 1's protocol on {args.scenes} held-out detection scenes "
        "(`synthetic_detection`, 1 to 4 objects each): every detection with class probability "
        "> 0.5 explained, its map upsampled, min-max scaled and thresholded by Otsu, the masks "
        "scored as COCO instance segmentations (pycocotools, IoU thresholds 0.20 to 0.95 in "
        "steps of 0.05; areas as fractions of the image, `evaluate/detection_segmentation.py`). "
        f"Values x 100, ± the bootstrap std over scenes ({args.resamples} draws).",
        "",
        f"Detector: box AP {100 * box.value('map').mean:.1f}, AP50 "
        f"{100 * box.value('map50').mean:.1f}, AR {100 * box.value('mar100').mean:.1f} (COCO "
        "box metrics, every query).",
        "",
        "| method | " + " | ".join(c.upper().replace("_", " ") for c in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for method in methods:
        cells = " | ".join(_cell(segmentation[method], c) for c in COLUMNS)
        lines.append(f"| {method} | {cells} |")
    lines += ["", "## Seed 003's ordering", "", *_orderings(segmentation)]
    lines += [
        "",
        "## Run",
        "",
        f"- command: `{command}`",
        f"- wall time: {seconds / 60:.1f} min ({datetime.date.today().isoformat()}), "
        f"{platform.machine()} {os.cpu_count()} cores, model weights sha256 "
        f"{info.weights.sha256[:12]}",
        "",
    ]
    return "\n".join(lines)


def _orderings(segmentation: dict) -> list[str]:
    out = []

    def mean(method: str, name: str) -> float:
        return segmentation[method].value(name).mean

    if "generic" in segmentation:
        for name in ("ap", "ar"):
            for other in (m for m in BASELINES if m in segmentation):
                holds = mean("generic", name) > mean(other, name)
                out.append(
                    f"- {'holds' if holds else 'DOES NOT HOLD'}: generic {name.upper()} "
                    f"{100 * mean('generic', name):.1f} > {other} {100 * mean(other, name):.1f}"
                )
    if "random" in segmentation:
        for method in (m for m in segmentation if m != "random"):
            holds = mean(method, "ap") > mean("random", "ap")
            out.append(
                f"- {'holds' if holds else 'DOES NOT HOLD'}: {method} AP above random's "
                f"({100 * mean(method, 'ap'):.1f} vs {100 * mean('random', 'ap'):.1f})"
            )
    return out


if __name__ == "__main__":
    sys.exit(main())

"""``vitlens explain`` on object detection models: the detections, their boxes and heatmaps.

When the model (``--model``, or the server's default) is a detector (ModelInfo task
"object_detection"), ``vitlens explain IMAGE`` explains its detections: ``--threshold`` (the
least class probability, default the server's 0.5; 0 keeps every query), ``--max-detections``
(most probable first) or ``--queries`` (these object queries, whatever their probability). Per
image it prints each detection (label, probability, box) and writes ``STEM_detections.png``
(every box over the detections' heatmaps, `vitlens.detection_overlay.draw_detections`),
``STEM_sheet.png`` (one panel per detection with its heatmap, `detection_sheet`) and
``STEM.json`` (the detections, their boxes and heatmap ranges).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from vitlens.cli_files import batches, image_paths, unique_stems
from vitlens.client import Client
from vitlens.detection import Detection
from vitlens.results import ExplainResult, ImageExplanation

__all__ = [
    "add_explain_arguments",
    "cmd_explain",
    "describe",
    "is_detection",
    "queries_arg",
    "write_detections",
]

_OPTIONS = "--threshold, --max-detections and --queries"


def queries_arg(text: str) -> list[int]:
    """``3,7,12``: object query indices, each at least 0."""
    try:
        queries = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected query indices like 3,7, got {text!r}") from None
    if not queries or min(queries) < 0:
        raise argparse.ArgumentTypeError(f"expected query indices of at least 0, got {text!r}")
    return queries


def add_explain_arguments(parser: argparse.ArgumentParser) -> None:
    """``--threshold``, ``--max-detections`` and ``--queries`` on ``vitlens explain``."""
    parser.add_argument(
        "--threshold",
        type=float,
        metavar="P",
        help="object detection models: explain the detections whose class probability "
        "exceeds P, in [0, 1) (default: the server's 0.5; 0: every query)",
    )
    parser.add_argument(
        "--max-detections",
        type=int,
        default=0,
        metavar="N",
        help="object detection models: at most N detections per image, most probable first "
        "(default: all)",
    )
    parser.add_argument(
        "--queries",
        action="extend",
        type=queries_arg,
        metavar="Q[,Q...]",
        help="object detection models: explain these object queries instead, whatever their "
        "probability (repeatable)",
    )


def _asked(args: argparse.Namespace) -> bool:
    return args.threshold is not None or bool(args.max_detections) or bool(args.queries)


def is_detection(args: argparse.Namespace) -> bool:
    """Whether ``vitlens explain`` should explain detections: asks the server for the model's
    task (one GetModel call), unless ``--text`` names an image-text explanation.

    Raises:
        ValueError: detection options given with ``--text`` or for a model that is not a
            detector.
    """
    if args.text:
        if _asked(args):
            raise ValueError(f"--text is for image-text models and {_OPTIONS} for detectors")
        return False
    with Client(args.server, timeout_s=args.timeout_s) as client:
        info = client.model(args.model)
    if info.object_detection:
        return True
    if _asked(args):
        raise ValueError(
            f"{_OPTIONS} are for object detection models; {info.name!r} is a "
            f"{info.task.replace('_', ' ')} model"
        )
    return False


def describe(detection: Detection, rank: int) -> str:
    """One printed line, e.g. ``#1  93.1%  star  box (0.100, 0.200, 0.500, 0.600)  query 7``."""
    return (
        f"#{rank:<2} {detection.probability:7.1%}  {detection.label}  box {detection.box}  "
        f"query {detection.query}"
    )


def cmd_explain(args: argparse.Namespace) -> int:
    """``vitlens explain`` on a detector: write the figures and records, print the
    detections."""
    from vitlens.overlay import require_pillow

    if args.target is not None or args.top_k is not None:
        raise ValueError(
            f"--target and --top-k choose classes; detectors explain detections ({_OPTIONS})"
        )
    require_pillow()
    paths = image_paths(args.images)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    items = list(zip(paths, unique_stems(paths), strict=True))
    with Client(args.server, timeout_s=args.timeout_s) as client:
        for chunk in batches(items, args.batch_size):
            result = client.explain(
                [str(p) for p, _ in chunk],
                method=args.method,
                model=args.model,
                grid=args.grid,
                method_options=dict(args.option or []),
                detection_threshold=args.threshold,
                max_detections=args.max_detections,
                queries=args.queries or None,
            )
            for (path, stem), item in zip(chunk, result, strict=True):
                files = write_detections(path, stem, item, result, Path(args.out))
                count = len(item.detections)
                written = ", ".join(str(f) for f in files)
                print(f"{path}: {count} detection{'s' * (count != 1)} -> {written}")
                for rank, d in enumerate(item.detections, 1):
                    print(f"  {describe(d, rank)}")
    return 0


def write_detections(
    path: Path, stem: str, item: ImageExplanation, result: ExplainResult, out: Path
) -> list[Path]:
    """``STEM_detections.png`` and ``STEM_sheet.png`` (returned) and ``STEM.json`` in ``out``.

    Raises:
        ValueError: a figure would overwrite the input image.
    """
    from vitlens.detection_overlay import detection_sheet, draw_detections

    boxes, sheet = out / f"{stem}_detections.png", out / f"{stem}_sheet.png"
    if path.resolve() in (boxes.resolve(), sheet.resolve()):
        raise ValueError(f"refusing to overwrite the input image {path}; choose another --out")
    data = path.read_bytes()
    draw_detections(data, item.detections).save(boxes)
    detection_sheet(data, item.detections).save(sheet)
    record = {
        "image": str(path),
        "id": item.id,
        "model": result.model,
        "method": result.method,
        "files": [boxes.name, sheet.name],
        "detections": [_entry(d) for d in item.detections],
        "timing": dataclasses.asdict(result.timing),
    }
    (out / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    return [boxes, sheet]


def _entry(d: Detection) -> dict[str, Any]:
    """A detection as JSON values."""
    heat = d.heatmap
    return {
        "query": d.query,
        "prediction": dataclasses.asdict(d.prediction),
        "box": dataclasses.asdict(d.box),
        "heatmap_shape": None if heat is None else list(heat.shape),
        "heatmap_min": float(heat.min()) if heat is not None and heat.size else None,
        "heatmap_max": float(heat.max()) if heat is not None and heat.size else None,
        "query_relevance": None
        if d.query_relevance is None
        else [float(r) for r in d.query_relevance],
    }

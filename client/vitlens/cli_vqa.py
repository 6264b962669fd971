"""``vitlens explain --question`` and ``vitlens answer``: visual question answering models.

``--question`` is asked of every image, or, repeated, one per image in order. Models reading
detector regions (ModelInfo.visual_input "regions") also take ``--regions``: one ``.npz`` per
image with arrays ``features`` (R, F) and ``boxes`` (R, 4), fractions of the image in [0, 1].

``explain`` writes, per explained answer, one PNG with the image's relevance (the heatmap, or
the regions' boxes shaded by relevance) beside the question's tokens shaded by relevance
(`vitlens.vqa_overlay`), and per image a JSON record; it prints each image's answer.
``answer`` prints the most probable answers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vitlens.cli_files import batches, image_paths, safe_name, unique_stems
from vitlens.client import Client
from vitlens.results import ExplainResult, Explanation, ImageExplanation
from vitlens.vqa import Regions

__all__ = [
    "add_answer_command",
    "add_explain_arguments",
    "cmd_answer",
    "cmd_explain",
    "read_regions",
]

_QUESTION_HELP = (
    "VQA models: the question, asked of every image, or repeated: one per image in order"
)
_REGIONS_HELP = (
    "VQA models reading detector regions: one .npz per image in order (repeatable), with "
    "arrays features (R, F) and boxes (R, 4) as fractions of the image"
)


def add_explain_arguments(parser: argparse.ArgumentParser) -> None:
    """``--question`` and ``--regions`` on ``vitlens explain``."""
    parser.add_argument(
        "--question",
        action="append",
        metavar="TEXT",
        help=f"{_QUESTION_HELP}; explains the answer and writes one PNG per answer: the "
        "image's relevance beside the question's tokens shaded by relevance",
    )
    parser.add_argument("--regions", action="append", metavar="NPZ", help=_REGIONS_HELP)


def add_answer_command(sub: Any, parents: Sequence[argparse.ArgumentParser]) -> None:
    """The ``vitlens answer`` command."""
    an = sub.add_parser("answer", parents=list(parents), help="answer questions (VQA models)")
    an.add_argument(
        "--question", action="append", required=True, metavar="TEXT", help=_QUESTION_HELP
    )
    an.add_argument("--regions", action="append", metavar="NPZ", help=_REGIONS_HELP)
    an.add_argument("--top-k", type=int, default=5, help="answers per image")
    an.set_defaults(func=cmd_answer)


def read_regions(path: str | Path) -> Regions:
    """One image's regions from an ``.npz`` with arrays ``features`` and ``boxes``."""
    with np.load(path, allow_pickle=False) as data:
        missing = {"features", "boxes"} - set(data.files)
        if missing:
            raise ValueError(f"{path} has no {' or '.join(sorted(missing))} array")
        return Regions(features=data["features"], boxes=data["boxes"])


def _per_image(args: argparse.Namespace, count: int) -> tuple[list[str], list[Regions | None]]:
    """One question and one region set (None: the model reads pixels) per image."""
    questions = list(args.question)
    if len(questions) not in (1, count):
        raise ValueError(
            f"got {len(questions)} --question for {count} images: give one for all images, or "
            "one per image"
        )
    if len(questions) == 1:
        questions *= count
    if not args.regions:
        return questions, [None] * count
    if len(args.regions) != count:
        raise ValueError(f"got {len(args.regions)} --regions for {count} images: one per image")
    return questions, [read_regions(p) for p in args.regions]


def cmd_explain(args: argparse.Namespace) -> int:
    """``vitlens explain --question``: write the figures and records, print the answers."""
    from vitlens.overlay import require_pillow

    if args.text:
        raise ValueError("--text is for image-text models and --question for VQA models")
    if not args.question:
        raise ValueError("--regions needs --question (VQA models)")
    require_pillow()
    paths = image_paths(args.images)
    questions, regions = _per_image(args, len(paths))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    items = list(zip(paths, unique_stems(paths), questions, regions, strict=True))
    with Client(args.server, timeout_s=args.timeout_s) as client:
        for chunk in batches(items, args.batch_size):
            result = client.explain(
                [str(p) for p, *_ in chunk],
                method=args.method,
                model=args.model,
                target=args.target,
                top_k=args.top_k,
                grid=args.grid,
                method_options=dict(args.option or []),
                questions=[q for _, _, q, _ in chunk],
                regions=None if regions[0] is None else [r for *_, r in chunk],
            )
            for (path, stem, question, region), item in zip(chunk, result, strict=True):
                files = write_explanation(path, stem, item, result, args, region)
                top = item.top
                written = ", ".join(str(f) for f in files)
                print(f'{path}: "{question}" -> {top.label} {top.probability:.1%} -> {written}')
    return 0


def write_explanation(
    path: Path,
    stem: str,
    item: ImageExplanation,
    result: ExplainResult,
    args: argparse.Namespace,
    regions: Regions | None = None,
) -> list[Path]:
    """One figure per explained answer and the image's JSON record; returns the figures."""
    from vitlens.vqa_overlay import answer_caption, render_vqa_explanation

    out = Path(args.out)
    data = path.read_bytes()
    boxes = None if regions is None else np.asarray(regions.boxes, np.float32)
    files, entries = [], []
    for e in item.explanations:
        label = e.target.label or str(e.target.index)
        name = f"{stem}_{safe_name(label)}" if args.top_k else stem
        target = out / f"{name}.png"
        if target.resolve() == path.resolve():
            raise ValueError(f"refusing to overwrite the input image {path}; choose another --out")
        caption = answer_caption(e, result.method)
        render_vqa_explanation(data, e, caption, boxes=boxes).save(target)
        files.append(target)
        entries.append({"file": target.name, "caption": caption, **_entry(e)})
    record = {
        "image": str(path),
        "id": item.id,
        "model": result.model,
        "method": result.method,
        "question": entries[0]["question"]["text"] if entries else "",
        "answers": [dataclasses.asdict(p) for p in item.predictions],
        "explanations": entries,
        "timing": dataclasses.asdict(result.timing),
    }
    (out / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    return files


def _entry(e: Explanation) -> dict[str, Any]:
    """An explanation's answer and relevance as JSON values."""
    question = e.question
    entry: dict[str, Any] = {
        "target": dataclasses.asdict(e.target),
        "question": None
        if question is None
        else {
            "text": question.text,
            "tokens": list(question.tokens),
            "relevance": [float(r) for r in question.relevance],
        },
    }
    if e.region_relevance is not None:
        entry["region_relevance"] = [float(r) for r in e.region_relevance]
    else:
        heat = e.heatmap
        entry["heatmap_shape"] = list(heat.shape)
        entry["heatmap_min"] = float(heat.min()) if heat.size else None
        entry["heatmap_max"] = float(heat.max()) if heat.size else None
    return entry


def cmd_answer(args: argparse.Namespace) -> int:
    """``vitlens answer``: print each image's most probable answers."""
    paths = image_paths(args.images)
    questions, regions = _per_image(args, len(paths))
    items = list(zip(paths, questions, regions, strict=True))
    with Client(args.server, timeout_s=args.timeout_s) as client:
        for chunk in batches(items, args.batch_size):
            answers = client.answer(
                [str(p) for p, _, _ in chunk],
                [q for _, q, _ in chunk],
                model=args.model,
                top_k=args.top_k,
                regions=None if regions[0] is None else [r for *_, r in chunk],
            )
            for (path, _, _), answer in zip(chunk, answers, strict=True):
                print(f'{path}: "{answer.question}"')
                for rank, p in enumerate(answer.predictions, 1):
                    print(f"  {rank:>2}. {p.probability:7.2%}  {p.label}  (answer {p.index})")
    return 0

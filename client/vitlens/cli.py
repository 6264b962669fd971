"""The ``vitlens`` command: explain, predict, models, evaluate, and the server commands.

``vitlens serve`` hands its arguments to the server, a distribution of its own
(``pip install vitlens-server``); the other commands only need the SDK, plus Pillow for
``explain``'s PNG figures. On image-text (CLIP) models ``explain --text`` explains each image
against each text and ``predict --prompt`` ranks prompts; their explanations also get a PNG of
the text's tokens shaded by relevance (`vitlens.text_overlay`). On visual question answering
models ``explain --question`` explains the answer (one PNG: the image's relevance beside the
question's tokens) and ``answer --question`` answers (`vitlens.cli_vqa`). On object detection
models ``explain`` explains the detections (``--threshold``, ``--max-detections``,
``--queries``): a PNG of the boxes, a sheet of each detection's heatmap
(`vitlens.cli_detection`); ``predict`` lists the detections.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vitlens import cli_detection, cli_vqa
from vitlens.cli_files import batches, image_paths, safe_name, unique_stems
from vitlens.client import DEFAULT_TARGET, Client
from vitlens.errors import UnavailableError, VitlensError
from vitlens.evaluation import Progress
from vitlens.results import ExplainResult, Explanation, ImageExplanation, ModelInfo

__all__ = ["main"]


def _default_server() -> str:
    return os.environ.get("VITLENS_SERVER") or DEFAULT_TARGET


def _option(text: str) -> tuple[str, Any]:
    """``key=value``; the value is parsed as JSON when it is valid JSON, else kept as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def _name(stem: str, e: Explanation, args: argparse.Namespace) -> str:
    """The file stem of one explanation: the image's, plus the text (its index first, as two
    texts may read the same once made safe) or the class when several are explained."""
    if args.text:
        return f"{stem}_{e.target.index}_{safe_name(e.target.label)[:40].strip('._-') or 'text'}"
    return f"{stem}_{safe_name(e.target.label or str(e.target.index))}" if args.top_k else stem


def _write_explanation(
    path: Path, stem: str, item: ImageExplanation, result: ExplainResult, args: argparse.Namespace
) -> list[Path]:
    from vitlens.overlay import default_caption, render_explanation
    from vitlens.text_overlay import save_text_relevance, text_caption

    out = Path(args.out)
    data = path.read_bytes()
    files, entries = [], []
    for e in item.explanations:
        name = _name(stem, e, args)
        target = out / f"{name}.png"
        tokens = out / f"{name}_tokens.png"
        if path.resolve() in (target.resolve(), tokens.resolve()):
            raise ValueError(f"refusing to overwrite the input image {path}; choose another --out")
        caption = (default_caption if e.text is None else text_caption)(e, result.method)
        render_explanation(data, e, caption).save(target)
        files.append(target)
        heat = e.heatmap
        entry = {
            "target": dataclasses.asdict(e.target),
            "file": target.name,
            "heatmap_shape": list(heat.shape),
            "heatmap_min": float(heat.min()) if heat.size else None,
            "heatmap_max": float(heat.max()) if heat.size else None,
        }
        if e.text is not None:  # image-text models: the text's tokens and their relevance
            entry["text"] = save_text_relevance(e, tokens, result.method)
            files.append(tokens)
        entries.append(entry)
    report = {
        "image": str(path),
        "id": item.id,
        "model": result.model,
        "method": result.method,
        "predictions": [dataclasses.asdict(p) for p in item.predictions],
        "explanations": entries,
        "timing": dataclasses.asdict(result.timing),
    }
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    return files


def _cmd_explain(args: argparse.Namespace) -> int:
    from vitlens.overlay import require_pillow

    if args.question or args.regions:
        return cli_vqa.cmd_explain(args)
    if args.text and (args.target is not None or args.top_k is not None):
        raise ValueError(
            "--text explains every text; --target and --top-k choose among an image-text "
            "model's labels (zero-shot, without --text)"
        )
    if cli_detection.is_detection(args):
        return cli_detection.cmd_explain(args)
    require_pillow()
    paths = image_paths(args.images)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    stems = unique_stems(paths)
    with Client(args.server, timeout_s=args.timeout_s) as client:
        for chunk in batches(list(zip(paths, stems, strict=True)), args.batch_size):
            result = client.explain(
                [str(p) for p, _ in chunk],
                method=args.method,
                model=args.model,
                target=args.target,
                top_k=args.top_k,
                grid=args.grid,
                method_options=dict(args.option or []),
                texts=args.text or (),
            )
            for (path, stem), item in zip(chunk, result, strict=True):
                files = _write_explanation(path, stem, item, result, args)
                written = ", ".join(str(f) for f in files)
                if args.text:  # each text's logit against this image
                    print(f"{path}: -> {written}")
                    for e in item.explanations:
                        t = e.target
                        print(f"  logit {t.logit:8.3f}  p {t.probability:6.1%}  {t.label!r}")
                else:
                    top = item.top
                    print(f"{path}: {top.label} {top.probability:.1%} -> {written}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    paths = list(args.images)
    with Client(args.server, timeout_s=args.timeout_s) as client:
        for chunk in batches(paths, args.batch_size):
            results = client.predict(
                chunk, model=args.model, top_k=args.top_k, prompts=args.prompt or ()
            )
            for path, c in zip(chunk, results, strict=True):
                print(path)
                for rank, p in enumerate(c.predictions, 1):
                    what = f"prompt {p.index}" if args.prompt else f"class {p.index}"
                    print(f"  {rank:>2}. {p.probability:7.2%}  {p.label}  ({what})")
                for rank, d in enumerate(c.detections, 1):  # object detection models
                    print(f"  {cli_detection.describe(d, rank)}")
    return 0


_TASK_COLUMN = {
    "image_text_similarity": "image-text",
    "visual_question_answering": "vqa",
    "object_detection": "detector",
}


def _model_row(m: ModelInfo, default: str) -> list[str]:
    return [
        m.name + (" *" if m.name == default else ""),
        _TASK_COLUMN.get(m.task, "classifier"),
        m.architecture,
        "x".join(str(d) for d in m.input_size),
        "x".join(str(d) for d in m.patch_grid),
        str(m.num_classes),
        m.weights.source,
        "yes" if m.random_weights else "no",
    ]


def _cmd_models(args: argparse.Namespace) -> int:
    with Client(args.server, timeout_s=args.timeout_s) as client:
        models = client.models()
        default = client.default_model
    if args.json:
        doc = {"default_model": default, "models": [dataclasses.asdict(m) for m in models]}
        print(json.dumps(doc, indent=2))
        return 0
    header = ["NAME", "TASK", "ARCHITECTURE", "INPUT", "GRID", "CLASSES", "WEIGHTS", "RANDOM"]
    rows = [header] + [_model_row(m, default) for m in models]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    if default:
        print(f"(* default model: {default})")
    return 0


# Commands run by the server distribution `vitlens-server` (package vitlens_server), imported
# only when used: the SDK never imports torch, and installs without the server.
_SERVER_COMMANDS = {
    "serve": ("vitlens_server.cli", "run the server"),
    "train-demo": ("vitlens_server.training.train", "train the embedded demo model"),
    "scenes": ("vitlens_server.data.__main__", "generate scenes: VOC export, previews"),
    "bench": ("vitlens_server.bench.cli", "load-test a server beside the in-process roof"),
}


def _cmd_evaluate(args: argparse.Namespace) -> int:
    def show(progress: Progress) -> None:
        width = 30
        filled = int(width * progress.done / max(progress.total, 1))
        print(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {progress.done}/{progress.total} "
            f"{progress.images_per_second:.1f} img/s, ETA {progress.eta_seconds:.0f} s  "
            f"({progress.stage})   ",
            end="",
            file=sys.stderr,
            flush=True,
        )

    with Client(args.server, timeout_s=args.timeout_s) as client:
        result = client.evaluate(
            _split(args.methods),
            _split(args.metrics),
            dataset=args.dataset,
            model=args.model,
            explain_label=args.explain_label,
            metric_options=_merged(args.metric_option or []),
            on_progress=None if args.quiet else show,
        )
    if not args.quiet:
        print(file=sys.stderr)
    print(result.table())
    if args.json:
        Path(args.json).write_text(result.to_json())
        print(f"wrote {args.json}")
    if args.report:
        from vitlens.report import write_report

        print(f"wrote {write_report(result, args.report)}")
    return 0


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _merged(options: Sequence[tuple[str, dict]]) -> dict[str, dict]:
    """Repeated ``--metric-option`` values, one dict per metric: ``[("deletion", {"steps": 8}),
    ("deletion", {"baseline": "blur"})]`` → ``{"deletion": {"steps": 8, "baseline": "blur"}}``."""
    merged: dict[str, dict] = {}
    for metric, values in options:
        merged.setdefault(metric, {}).update(values)
    return merged


def metric_option_arg(text: str) -> tuple[str, dict]:
    """``metric.key=value``, e.g. ``deletion.steps=32``."""
    key, value = _option(text)
    metric, dot, name = key.partition(".")
    if not dot or not name:
        raise argparse.ArgumentTypeError(f"expected METRIC.KEY=VALUE, got {text!r}")
    return metric, {name: value}


def _server_command(name: str, argv: list[str]) -> int:
    module_name, _ = _SERVER_COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        if (e.name or "").partition(".")[0] == "vitlens_server":
            problem = "needs the vitlens server, which is not installed"
        else:  # the server is there, one of its own dependencies is not
            problem = f"cannot start the vitlens server ({e})"
        print(
            f"error: `vitlens {name}` {problem}: pip install vitlens-server",
            file=sys.stderr,
        )
        return 2
    return int(module.main(argv) or 0)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitlens", description="Explain Vision Transformer predictions with a vitlens server."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--server",
        default=_default_server(),
        metavar="HOST:PORT",
        help="server address (default: $VITLENS_SERVER or %(default)s)",
    )
    common.add_argument("--timeout-s", type=float, default=300.0, help="deadline per call")

    batch = argparse.ArgumentParser(add_help=False)
    batch.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    batch.add_argument("--model", default="", help="model name (default: the server's)")
    batch.add_argument("--batch-size", type=int, default=8, help="images per request")

    ex = sub.add_parser("explain", parents=[common, batch], help="write heatmap overlays")
    ex.add_argument("--method", default="generic", help="explanation method")
    which = ex.add_mutually_exclusive_group()
    which.add_argument("--target", type=int, metavar="N", help="explain class N")
    which.add_argument("--top-k", type=int, metavar="K", help="explain the K top classes")
    ex.add_argument("--grid", choices=["tokens", "input"], default="tokens")
    ex.add_argument("--out", default="vitlens_out", metavar="DIR", help="output directory")
    ex.add_argument(
        "--text",
        action="append",
        metavar="TEXT",
        help="image-text models: explain each image against TEXT (repeatable); also writes "
        "a PNG of its tokens shaded by relevance. Without it an image-text model explains "
        "its predicted label's prompt (zero-shot)",
    )
    cli_vqa.add_explain_arguments(ex)
    cli_detection.add_explain_arguments(ex)
    ex.add_argument(
        "--option",
        action="append",
        type=_option,
        metavar="KEY=VALUE",
        help="method option (repeatable); VALUE is parsed as JSON when possible",
    )
    ex.set_defaults(func=_cmd_explain)

    pr = sub.add_parser("predict", parents=[common, batch], help="print top classes")
    pr.add_argument("--top-k", type=int, default=5, help="predictions per image")
    pr.add_argument(
        "--prompt",
        action="append",
        metavar="TEXT",
        help="image-text models: rank these prompts zero-shot (repeatable; default: the "
        "model's labels)",
    )
    pr.set_defaults(func=_cmd_predict)
    cli_vqa.add_answer_command(sub, [common, batch])

    mo = sub.add_parser("models", parents=[common], help="list the server's models")
    mo.add_argument("--json", action="store_true", help="print JSON")
    mo.set_defaults(func=_cmd_models)

    ev = sub.add_parser("evaluate", parents=[common], help="score methods with quality metrics")
    ev.add_argument("--model", default="", help="model name (default: the server's)")
    ev.add_argument("--methods", required=True, help="comma-separated, e.g. generic,rollout,random")
    ev.add_argument(
        "--metrics", required=True, help="comma-separated, e.g. segmentation,perturbation"
    )
    ev.add_argument(
        "--dataset",
        default="synthetic:100",
        help="synthetic:N[:seed][:two_object] or an absolute folder on the server",
    )
    ev.add_argument(
        "--explain-label", action="store_true", help="explain the label, not the prediction"
    )
    ev.add_argument(
        "--metric-option", action="append", type=metric_option_arg, metavar="METRIC.KEY=VALUE"
    )
    ev.add_argument("--json", metavar="FILE", help="write the results as JSON")
    ev.add_argument(
        "--report", metavar="DIR", help="write results.json, curve PNGs and report.md there"
    )
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=_cmd_evaluate)

    for name, (_, summary) in _SERVER_COMMANDS.items():
        sub.add_parser(name, help=f"{summary} (see `vitlens {name} --help`)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``vitlens`` command; returns the exit status."""
    arglist = list(sys.argv[1:] if argv is None else argv)
    if arglist and arglist[0] in _SERVER_COMMANDS:
        return _server_command(arglist[0], arglist[1:])
    args = _build_parser().parse_args(arglist)
    try:
        return args.func(args)
    except UnavailableError as e:
        print(
            f"error: UNAVAILABLE: server unreachable at {args.server} ({e.details})",
            file=sys.stderr,
        )
    except VitlensError as e:
        print(f"error: {e.code.name}: {e.details}", file=sys.stderr)
    except (OSError, ValueError, TypeError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())

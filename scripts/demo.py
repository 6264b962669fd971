"""The README's demo: start `vitlens serve`, explain a few images through the SDK, write figures.

    python scripts/demo.py --out demo_out

Serves the demo classifier `vitlens-demo` and the exemplar CLIP `vitlens-clip`. Explains
generated test scenes (never seen in training) and writes `summary.png`: per row the image, its
ground-truth mask and each method's heatmap. The last two rows are one two-object scene
explained once for each of its classes: class-specific methods should move to that object. Also
writes per image and method an overlay PNG, and the CLI's PNG + JSON output. Then explains one
scene with the CLIP against its object's prompt, a wrong object's prompt and its caption: per
text a heatmap overlay and a PNG of the text's tokens shaded by relevance (`clip/`, and the CLI's
`cli_clip/`), with the image-text similarity logits printed. Last, the exemplar detector
`vitlens-detr` finds the objects of three scenes of several objects: per scene a sheet with
every box, then each detection's own heatmap (`detr/`, and the CLI's `cli_detr/`).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import vitlens
from vitlens import cli
from vitlens.detection_overlay import detection_sheet
from vitlens.overlay import render_explanation
from vitlens.text_overlay import render_text_relevance, text_caption
from vitlens_server.bench.process import ServeProcess
from vitlens_server.data import CLASSES, Scene, render_scene, split_seeds
from vitlens_server.data.captions import canonical_caption
from vitlens_server.data.detection import detection_count, detection_scene

METHODS = ("raw_attention", "rollout", "generic")
MODELS = ("vitlens-demo", "vitlens-clip", "vitlens-detr")  # the first is the default model


def scene_png(scene: Scene) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(scene.image).save(buffer, "PNG")
    return buffer.getvalue()


def mask_tile(scene: Scene, highlight: int | None = None) -> Image.Image:
    """Ground-truth masks in white (the highlighted object) and grey (any other object)."""
    tile = np.zeros(scene.image.shape[:2], np.uint8)
    for label, mask in zip(scene.labels, scene.masks, strict=True):
        tile[mask] = 255 if highlight in (None, label) else 90
    return Image.fromarray(tile).convert("RGB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    args = parser.parse_args()
    out: Path = args.out
    (out / "inputs").mkdir(parents=True, exist_ok=True)

    log = out / "server.log"
    log.unlink(missing_ok=True)
    flags = [arg for name in MODELS for arg in ("--model", name)]
    with ServeProcess.start(flags, log=log) as server, vitlens.Client(server.address) as client:
        server.wait_serving(timeout_s=120)
        run(client, out, server.address)
        run_clip(client, out, server.address)
        run_detr(client, out, server.address)
    print(f"\nwrote {out}/summary.png, per-method overlays, {out}/clip/ (overlay + token PNG "
          f"per text) and {out}/detr/ (boxes, per-detection heatmaps); server log: "
          f"{out}/server.log")  # fmt: skip
    return 0


def run(client: vitlens.Client, out: Path, address: str) -> None:
    info = client.model()
    accuracy = info.weights.metadata.get("top1")
    print(
        f"model {info.name}: {info.architecture}, input {info.input_size}, grid {info.patch_grid}"
    )
    if info.random_weights:
        print("  note: this model has RANDOM weights, so its heatmaps only show the pipeline works")
    elif accuracy:
        print(f"  trained weights {info.weights.source}, held-out top-1 {float(accuracy):.1%}")

    # Four single-object test scenes, then one two-object scene explained for each class.
    scenes = [render_scene(seed) for seed in split_seeds("test", 4)]
    pair = render_scene(split_seeds("test", 5)[4], two_object=True)
    rows_spec = [(scene, None) for scene in scenes] + [(pair, label) for label in pair.labels]
    images = [scene_png(scene) for scene, _ in rows_spec]
    ids = [f"scene{i}" for i in range(len(scenes))] + [f"pair_{CLASSES[c]}" for c in pair.labels]
    targets = [int(scene.label) if label is None else label for scene, label in rows_spec]
    paths = []
    for name, data in zip(ids[: len(scenes)], images, strict=False):
        path = out / "inputs" / f"{name}.png"
        path.write_bytes(data)
        paths.append(path)

    size = 224
    rows = [
        [Image.open(io.BytesIO(data)).convert("RGB"), mask_tile(scene, label)]
        for data, (scene, label) in zip(images, rows_spec, strict=True)
    ]
    for method in METHODS:
        started = time.perf_counter()
        result = client.explain(images, method=method, grid="input", target=targets, ids=ids)
        elapsed = time.perf_counter() - started
        print(f"{method:>14}: {len(images)} images in {elapsed * 1000:.0f} ms "
              f"(server compute {result.timing.compute_seconds * 1000:.0f} ms)")  # fmt: skip
        for row, data, explained in zip(rows, images, result, strict=True):
            explanation = explained.explanations[0]
            caption = f"{method}: {explanation.target.label}"
            figure = render_explanation(data, explanation, caption, min_width=size)
            figure.save(out / f"{explained.id}_{method}.png")
            row.append(figure)
    header = ["image", "ground truth", *METHODS]
    _sheet(rows, header).save(out / "summary.png")
    for (scene, label), explained in zip(rows_spec, result, strict=True):
        want = CLASSES[scene.label if label is None else label]
        print(f"  {explained.id:>14}: truth {want:<9} predicted {explained.top.label} "
              f"({explained.top.probability:.1%})")  # fmt: skip

    print("\nthe CLI on the same images:")
    cli.main(["explain", *map(str, paths), "--server", address, "--out", str(out / "cli")])


def run_clip(client: vitlens.Client, out: Path, address: str) -> None:
    """The exemplar CLIP on one test scene: its prompt, a wrong one and its caption."""
    info = client.model(MODELS[1])
    print(f"\nimage-text model {info.name}: {info.architecture}, labels {', '.join(info.labels)}")
    scene = render_scene(split_seeds("test", 1)[0])
    truth = CLASSES[scene.label]
    wrong = CLASSES[(scene.label + len(CLASSES) // 2) % len(CLASSES)]
    template = info.prompt_template
    texts = [template.format(truth), template.format(wrong), canonical_caption(scene).text]
    path = out / "inputs" / "clip_scene.png"
    path.write_bytes(scene_png(scene))
    started = time.perf_counter()
    result = client.explain(path, model=info.name, texts=texts)
    elapsed = time.perf_counter() - started
    print(f"  scene of a {truth}: {len(texts)} texts in {elapsed * 1000:.0f} ms "
          f"(server compute {result.timing.compute_seconds * 1000:.0f} ms)")  # fmt: skip
    (out / "clip").mkdir(exist_ok=True)
    for i, e in enumerate(result[0].explanations):
        print(f"    logit {e.target.logit:7.2f}  p {e.target.probability:6.1%}  {e.target.label!r}")
        caption = text_caption(e, result.method)
        render_explanation(path.read_bytes(), e, caption).save(out / "clip" / f"text{i}.png")
        render_text_relevance(e.text, caption).save(out / "clip" / f"text{i}_tokens.png")
    (ranked,) = client.predict(path, model=info.name, top_k=3)
    top = ", ".join(f"{p.label} {p.probability:.0%}" for p in ranked.predictions)
    print(f"  zero-shot over the labels' prompts: {top}")

    print("\nthe CLI on the same scene and texts:")
    argv = ["explain", str(path), "--server", address, "--model", info.name]
    cli.main([*argv, "--out", str(out / "cli_clip"), *(a for t in texts for a in ("--text", t))])


def run_detr(client: vitlens.Client, out: Path, address: str) -> None:
    """The exemplar detector on three held-out scenes of several objects: every detection's
    box and heatmap (`generic`: seed 003's encoder-decoder rules)."""
    info = client.model(MODELS[2])
    print(f"\ndetector {info.name}: {info.architecture}, token grid {info.patch_grid}, "
          f"{info.weights.metadata.get('metrics', '')}")  # fmt: skip
    seeds = [s for s in split_seeds("test", 40) if detection_count(s) >= 3][:3]
    scenes = [detection_scene(seed) for seed in seeds]
    paths = []
    for i, scene in enumerate(scenes):
        paths.append(out / "inputs" / f"detr_scene{i}.png")
        paths[-1].write_bytes(scene_png(scene))
    started = time.perf_counter()
    result = client.explain(paths, model=info.name)
    elapsed = time.perf_counter() - started
    print(f"  {sum(len(r.detections) for r in result)} detections of {len(paths)} scenes explained "
          f"in one call, {elapsed * 1000:.0f} ms")  # fmt: skip
    (out / "detr").mkdir(exist_ok=True)
    for path, scene, explained in zip(paths, scenes, result, strict=True):
        truth = ", ".join(CLASSES[label] for label in scene.labels)
        found = ", ".join(f"{d.label} {d.probability:.0%}" for d in explained.detections)
        print(f"    {path.name}: truth {truth}; found {found}")
        detection_sheet(path, explained.detections).save(out / "detr" / f"{path.stem}.png")
    print("\nthe CLI on the first scene:")
    argv = ["explain", str(paths[0]), "--server", address, "--model", info.name]
    cli.main([*argv, "--out", str(out / "cli_detr")])


def _sheet(rows: list[list[Image.Image]], header: list[str]) -> Image.Image:
    """Tiles in a grid under a header line; every tile is scaled to 224 px wide."""
    tile = 224
    rows = [[im.resize((tile, round(tile * im.height / im.width))) for im in row] for row in rows]
    heights = [max(im.height for im in row) for row in rows]
    band = 24
    sheet = Image.new("RGB", (tile * len(header), band + sum(heights)), "white")
    draw = ImageDraw.Draw(sheet)
    for column, text in enumerate(header):
        draw.text((column * tile + 6, 6), text, fill="black", font=ImageFont.load_default(14))
    y = band
    for row, height in zip(rows, heights, strict=True):
        for column, im in enumerate(row):
            sheet.paste(im, (column * tile, y + height - im.height))
        y += height
    return sheet


if __name__ == "__main__":
    sys.exit(main())

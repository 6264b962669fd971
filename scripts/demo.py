"""The README's demo: start `vitlens serve`, explain a few images through the SDK, write figures.

    python scripts/demo.py --out demo_out

Explains generated test scenes (never seen in training) and writes `summary.png`: per row the
image, its ground-truth mask and each method's heatmap. The last two rows are one two-object scene
explained once for each of its classes: class-specific methods should move to that object. Also
writes per image and method an overlay PNG, and the CLI's PNG + JSON output.
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
from vitlens.overlay import render_explanation
from vitlens_server.bench.process import ServeProcess
from vitlens_server.data import CLASSES, Scene, render_scene, split_seeds

METHODS = ("raw_attention", "rollout", "generic")


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
    with ServeProcess.start([], log=log) as server, vitlens.Client(server.address) as client:
        server.wait_serving(timeout_s=120)
        run(client, out, server.address)
    print(f"\nwrote {out}/summary.png and per-method overlays; server log: {out}/server.log")
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

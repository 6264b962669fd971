"""The README's demo: start `vitlens serve`, explain a few images through the SDK, write figures.

    python scripts/demo.py --out demo_out

Writes per image and method an overlay PNG, one `summary.png` sheet (rows: images; columns: the
input and each method), and the CLI's PNG + JSON output for the same images.
"""

from __future__ import annotations

import argparse
import io
import math
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import vitlens
from vitlens import cli
from vitlens.overlay import default_caption, render_explanation

METHODS = ("raw_attention", "rollout", "generic")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shape_image(kind: str, seed: int) -> bytes:
    """A 224 x 224 PNG with one shape on a noisy background."""
    rng = np.random.default_rng(seed)
    background = rng.integers(60, 140, (224, 224, 3), dtype=np.uint8)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    cx, cy, r = rng.integers(70, 154), rng.integers(70, 154), rng.integers(35, 55)
    colour = tuple(int(c) for c in rng.integers(150, 256, 3))
    if kind == "disc":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif kind == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        corners = 3 if kind == "triangle" else 10
        points = [
            (
                cx + (r if kind == "triangle" or i % 2 == 0 else r / 2.2) * math.cos(angle),
                cy + (r if kind == "triangle" or i % 2 == 0 else r / 2.2) * math.sin(angle),
            )
            for i, angle in enumerate(np.linspace(-math.pi / 2, 1.5 * math.pi, corners, False))
        ]
        draw.polygon(points, fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    args = parser.parse_args()
    out: Path = args.out
    (out / "inputs").mkdir(parents=True, exist_ok=True)

    port = free_port()
    log = (out / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "vitlens_server", "--port", str(port)], stdout=log, stderr=log
    )
    try:
        with vitlens.Client(f"127.0.0.1:{port}") as client:
            client.wait_ready(timeout_s=120)
            run(client, out, port)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    print(f"\nwrote {out}/summary.png and per-method overlays; server log: {out}/server.log")
    return 0


def run(client: vitlens.Client, out: Path, port: int) -> None:
    info = client.model()
    print(
        f"model {info.name}: {info.architecture}, input {info.input_size}, grid {info.patch_grid}"
    )
    if info.random_weights:
        print("  note: this model has RANDOM weights, so its heatmaps only show the pipeline works")
    kinds = ("disc", "square", "triangle", "star")
    images = [shape_image(kind, seed) for seed, kind in enumerate(kinds)]
    paths = []
    for kind, data in zip(kinds, images, strict=True):
        path = out / "inputs" / f"{kind}.png"
        path.write_bytes(data)
        paths.append(path)

    rows = [[Image.open(io.BytesIO(data)).convert("RGB").resize((256, 256))] for data in images]
    for method in METHODS:
        started = time.perf_counter()
        result = client.explain(images, method=method, grid="input", ids=list(kinds))
        elapsed = time.perf_counter() - started
        print(f"{method:>14}: {len(images)} images in {elapsed * 1000:.0f} ms "
              f"(server compute {result.timing.compute_seconds * 1000:.0f} ms)")  # fmt: skip
        for row, data, explained in zip(rows, images, result, strict=True):
            explanation = explained.explanations[0]
            figure = render_explanation(data, explanation, default_caption(explanation, method))
            figure.save(out / f"{explained.id}_{method}.png")
            row.append(figure.resize((256, round(256 * figure.height / figure.width))))
    _sheet(rows).save(out / "summary.png")

    print("\nthe CLI on the same images:")
    cli.main(
        ["explain", *map(str, paths), "--server", f"127.0.0.1:{port}", "--out", str(out / "cli")]
    )


def _sheet(rows: list[list[Image.Image]]) -> Image.Image:
    width = sum(im.width for im in rows[0])
    height = sum(max(im.height for im in row) for row in rows)
    sheet = Image.new("RGB", (width, height), "white")
    y = 0
    for row in rows:
        x = 0
        for im in row:
            sheet.paste(im, (x, y + max(i.height for i in row) - im.height))
            x += im.width
        y += max(im.height for im in row)
    return sheet


if __name__ == "__main__":
    sys.exit(main())

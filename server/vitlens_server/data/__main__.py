"""Export or preview generated scenes.

    python -m vitlens_server.data voc OUT --count N [--seed S] [--split val] [--two-object]
    python -m vitlens_server.data preview OUT.png [--seed S] [--two-object]

``voc`` writes a Pascal VOC folder (see `vitlens_server.data.voc`); ``preview`` writes a contact
sheet of 16 scenes with their masks outlined and their classes written on them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vitlens_server.data.scenes import CLASSES, SPLIT_OFFSETS, Scene, render_scene
from vitlens_server.data.voc import export_voc

__all__ = ["build_parser", "contact_sheet", "main"]

_OUTLINES = ((255, 0, 255), (0, 255, 255))  # main object magenta, second cyan
_COLUMNS = 4
_GAP_PX = 4


def _outline(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: the mask's pixels with a 4-neighbour outside it (or on the image border)."""
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def contact_sheet(scenes: Sequence[Scene]) -> Image.Image:
    """The scenes in a grid, each object's mask outlined and its class named."""
    size = scenes[0].image.shape[0]
    rows = -(-len(scenes) // _COLUMNS)
    side = size + _GAP_PX
    sheet = Image.new("RGB", (_COLUMNS * side + _GAP_PX, rows * side + _GAP_PX), (255, 255, 255))
    for i, scene in enumerate(scenes):
        tile = scene.image.copy()
        for k, mask in enumerate(scene.masks):
            tile[_outline(mask)] = _OUTLINES[k % len(_OUTLINES)]
        image = Image.fromarray(tile)
        caption = f"{scene.seed}: " + " + ".join(CLASSES[label] for label in scene.labels)
        draw = ImageDraw.Draw(image)
        draw.rectangle([0, 0, 7 * len(caption) + 4, 12], fill=(0, 0, 0))
        draw.text((2, 0), caption, fill=(255, 255, 255))
        row, column = divmod(i, _COLUMNS)
        sheet.paste(image, (_GAP_PX + column * side, _GAP_PX + row * side))
    return sheet


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vitlens_server.data", description="Export or preview vitlens scenes."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    voc = commands.add_parser("voc", help="write a Pascal VOC folder of scenes")
    voc.add_argument("out", type=Path, help="VOC root folder (created or merged into)")
    voc.add_argument("--count", type=int, required=True, help="number of scenes")
    voc.add_argument("--seed", type=int, default=0, help="first seed within the split")
    voc.add_argument("--split", default="val", choices=sorted(SPLIT_OFFSETS))
    voc.add_argument("--two-object", action="store_true", help="two objects per scene")
    preview = commands.add_parser("preview", help="write a contact sheet of 16 scenes")
    preview.add_argument("out", type=Path, help="PNG file to write")
    preview.add_argument("--seed", type=int, default=0, help="first seed")
    preview.add_argument("--two-object", action="store_true", help="two objects per scene")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "voc":
        root = export_voc(
            args.out, args.count, seed=args.seed, split=args.split, two_object=args.two_object
        )
        print(f"wrote {args.count} scenes to {root} ({args.split})")
    else:
        scenes = [render_scene(args.seed + i, two_object=args.two_object) for i in range(16)]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        contact_sheet(scenes).save(args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

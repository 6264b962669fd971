"""Input files and output names shared by the ``vitlens`` commands (`vitlens.cli`,
`vitlens.cli_vqa`)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["batches", "image_paths", "safe_name", "unique_stems"]


def safe_name(text: str) -> str:
    """``text`` as a file-name part: runs of other characters become one underscore."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "class"


def unique_stems(paths: Sequence[Path]) -> list[str]:
    """The paths' stems, a count added to the second and later of the same stem."""
    seen: dict[str, int] = {}
    stems = []
    for p in paths:
        n = seen[p.stem] = seen.get(p.stem, 0) + 1
        stems.append(p.stem if n == 1 else f"{p.stem}_{n}")
    return stems


def batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """``items`` in consecutive runs of ``size`` (the last may be shorter)."""
    return [items[i : i + size] for i in range(0, len(items), max(size, 1))]


def image_paths(names: Sequence[str]) -> list[Path]:
    """The image files named; FileNotFoundError for one that is not a file."""
    paths = [Path(p) for p in names]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"image file not found: {p}")
    return paths

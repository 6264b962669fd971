"""Merge the per-shard JSON of a sharded Evaluate run into the result of the whole run.

Each shard file is the JSON of ``vitlens evaluate --json`` (``EvaluationResult.to_json``):
``{"model", "dataset", "results": [{"method", "metric", "values": [{"name", "mean", "std",
"ci95_low", "ci95_high", "n"}], "curves": [{"name", "x", "y"}]}]}``. The server computes every
statistic from per-image values as mean, sample standard deviation (ddof = 1) and the normal
95 % interval mean ± 1.96·std/√n. Shard ``i`` reports ``(n_i, m_i, s_i)``; pooled over shards:

    N   = Σ_i n_i
    m   = Σ_i n_i·m_i / N
    s²  = [ Σ_i (n_i − 1)·s_i²  +  Σ_i n_i·(m_i − m)² ] / (N − 1)        (s = 0 when N = 1)
    CI  = m ± 1.96·s/√N

— the within-shard sums of squares plus the between-shard ones, which is exactly the sample
variance of all N per-image values, so the merge equals one unsharded run up to rounding.
A curve is the mean over images of per-image curves, so the pooled curve is
``y = Σ_i w_i·y_i / Σ_i w_i`` with ``w_i`` the images of shard ``i`` behind it (the largest n of
that method and metric's statistics in the shard; per-image metrics report n = images).

When every shard ran a ``synthetic:n_i:S_i`` block (or ``synthetic_vqa:n_i:S_i``, a VQA
model's), the blocks must tile one seed range without gap or overlap (as deploy/eval/run_shard.py
makes them); the merged dataset is then named ``synthetic:N:S`` (``synthetic_vqa:N:S``). Usage:

    python merge_results.py --dir /results --expect 4 --out /results/merged.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["Z95", "merge_curves", "merge_datasets", "merge_results", "pool_statistics"]

Z95 = 1.96  # the server's normal-approximation 95 % interval (vitlens_server/domain.py Summary)


def pool_statistics(stats: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pool shard statistics ``{"name", "mean", "std", "n", ...}`` of one value (formula above)."""
    names = {s["name"] for s in stats}
    if len(names) != 1:
        raise ValueError(f"cannot pool statistics of different values {sorted(names)}")
    parts = [s for s in stats if int(s["n"]) > 0]
    total = sum(int(s["n"]) for s in parts)
    if total == 0:
        raise ValueError(f"no samples behind {names.pop()!r}")
    mean = sum(int(s["n"]) * float(s["mean"]) for s in parts) / total
    within = sum((int(s["n"]) - 1) * float(s["std"]) ** 2 for s in parts)
    between = sum(int(s["n"]) * (float(s["mean"]) - mean) ** 2 for s in parts)
    std = math.sqrt((within + between) / (total - 1)) if total > 1 else 0.0
    half = Z95 * std / math.sqrt(total)
    return {
        "name": parts[0]["name"],
        "mean": mean,
        "std": std,
        "ci95_low": mean - half,
        "ci95_high": mean + half,
        "n": total,
    }


def merge_curves(curves: Sequence[dict[str, Any]], weights: Sequence[float]) -> dict[str, Any]:
    """Weighted mean ``Σ w_i·y_i / Σ w_i`` of curves with one name and identical x."""
    first = curves[0]
    for curve in curves[1:]:
        if curve["name"] != first["name"] or list(curve["x"]) != list(first["x"]):
            raise ValueError(f"curve {first['name']!r}: shards disagree on its name or x")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"curve {first['name']!r}: no images behind it")
    y = [
        sum(w * float(c["y"][k]) for w, c in zip(weights, curves, strict=True)) / total
        for k in range(len(first["x"]))
    ]
    return {"name": first["name"], "x": list(first["x"]), "y": y}


def merge_datasets(names: Sequence[str]) -> str:
    """The dataset of the whole run: ``synthetic:N:S[:two_object]`` (or ``synthetic_vqa:N:S``)
    when the shards' synthetic blocks tile ``[S, S + N)``; otherwise the shard names joined
    with ``+``."""
    blocks = []
    for name in names:
        parts = name.split(":")
        if parts[0] not in ("synthetic", "synthetic_vqa") or len(parts) not in (3, 4):
            return "+".join(names)
        blocks.append((int(parts[2]), int(parts[1]), ":".join([parts[0], *parts[3:]])))
    blocks.sort()
    if len({kind for _, _, kind in blocks}) != 1:
        raise ValueError(f"shards mix kinds of scenes: {sorted(names)}")
    for (start, size, _), (following, _, _) in itertools.pairwise(blocks):
        if start + size != following:
            raise ValueError(
                f"shard datasets leave a gap or overlap at seed {start + size}: {sorted(names)}"
            )
    start, (prefix, *kind) = blocks[0][0], blocks[0][2].split(":")
    total = sum(size for _, size, _ in blocks)
    return ":".join([prefix, str(total), str(start), *kind])


def merge_results(shards: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result from shard results of the same model, methods and metrics."""
    if not shards:
        raise ValueError("no shard results to merge")
    models = {s["model"] for s in shards}
    if len(models) != 1:
        raise ValueError(f"shards were evaluated on different models: {sorted(models)}")
    keys = [(r["method"], r["metric"]) for r in shards[0]["results"]]
    for shard in shards[1:]:
        if sorted((r["method"], r["metric"]) for r in shard["results"]) != sorted(keys):
            raise ValueError("shards evaluated different methods or metrics")
    results = []
    for method, metric in keys:
        parts = [
            next(r for r in s["results"] if (r["method"], r["metric"]) == (method, metric))
            for s in shards
        ]
        names = list(dict.fromkeys(v["name"] for p in parts for v in p["values"]))
        values = [
            pool_statistics([v for p in parts for v in p["values"] if v["name"] == name])
            for name in names
        ]
        weights = [max((int(v["n"]) for v in p["values"]), default=0) for p in parts]
        curve_names = list(dict.fromkeys(c["name"] for p in parts for c in p["curves"]))
        curves = []
        for name in curve_names:
            have = [
                (w, c)
                for w, p in zip(weights, parts, strict=True)
                for c in p["curves"]
                if c["name"] == name
            ]
            curves.append(merge_curves([c for _, c in have], [w for w, _ in have]))
        results.append({"method": method, "metric": metric, "values": values, "curves": curves})
    return {
        "model": shards[0]["model"],
        "dataset": merge_datasets([s["dataset"] for s in shards]),
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="folder of shard-*.json files")
    parser.add_argument("--expect", type=int, help="fail unless exactly this many shards exist")
    parser.add_argument("--out", type=Path, required=True, help="merged JSON to write")
    args = parser.parse_args(argv)
    files = sorted(args.dir.glob("shard-*.json"))
    if args.expect is not None and len(files) != args.expect:
        print(
            f"merge: expected {args.expect} shard files in {args.dir}, found {len(files)}",
            file=sys.stderr,
        )
        return 1
    try:
        merged = merge_results([json.loads(f.read_text()) for f in files])
    except (ValueError, KeyError) as err:
        print(f"merge: {err}", file=sys.stderr)
        return 1
    args.out.write_text(json.dumps(merged, indent=2))
    n = max((v["n"] for r in merged["results"] for v in r["values"]), default=0)
    print(f"merged {len(files)} shards ({merged['dataset']}, up to n={n}) into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Scene-generator throughput on one core: scenes per second, single- and two-object.

    python scripts/bench_scenes.py [--count 2000] [--cpu 0]

Runs in one process with numpy's thread pools capped at one thread (the variables are set before
numpy is imported) and, where the OS allows it, pinned to one CPU.
"""

from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"

import argparse  # noqa: E402
import time  # noqa: E402

from vitlens_server.data import SceneConfig, render_scene  # noqa: E402


def scenes_per_second(count: int, *, two_object: bool, config: SceneConfig) -> float:
    """Render ``count`` scenes (after a short warm-up) and return their rate."""
    for seed in range(20):
        render_scene(seed, two_object=two_object, config=config)
    start = time.perf_counter()
    for seed in range(count):
        render_scene(seed, two_object=two_object, config=config)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="scenes per measurement")
    parser.add_argument("--cpu", type=int, default=None, help="CPU to pin to (default: first)")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        cpu = args.cpu if args.cpu is not None else min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        where = f"pinned to CPU {cpu}"
    else:
        where = "not pinned (no sched_setaffinity here)"
    config = SceneConfig()
    print(f"{args.count} scenes of {config.size}x{config.size}, one thread, {where}")
    for two_object in (False, True):
        rate = scenes_per_second(args.count, two_object=two_object, config=config)
        kind = "two-object" if two_object else "single-object"
        print(f"{kind:>14}: {rate:7.0f} scenes/s ({1e3 / rate:.2f} ms/scene)")


if __name__ == "__main__":
    main()

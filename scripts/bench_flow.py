"""attention_flow cost per image on a ViT-B/16 graph (12 blocks, 197 tokens), and networkx's.

    python scripts/bench_flow.py [--images 4] [--pause-training]

The model is timm's ``vit_base_patch16_224`` with random weights (no download): 12 layers,
N = 197 tokens, so each image is 196 maximum flows over 12·197² ≈ 466k edges. Random weights give
nearly uniform attention; ``--sharpen`` also times copies whose qkv weights are scaled up, which
gives peaked attention like a trained model's. Reported per image: the whole method (forward pass
excluded: head fusion, Ã on the model's device, one host copy, the flows) in wall-clock and process
CPU seconds, mean and max over the images, one image at a time and as one batch of all images.
numba's compile time is measured in a fresh process with an empty cache, its cache-load time in a
second one.

networkx (`maximum_flow_value`) is timed for ONE max-flow on the same model, checked against
vitlens' value: its default preflow-push at N = 50, 101 and 197 tokens (inputs of 112, 160 and
224 px), and Edmonds-Karp (the flow function of Abnar & Zuidema's code) at N = 50 and 101,
extrapolated to N = 197 by a power law fitted to those sizes.

``--pause-training`` stops the background training process (SIGSTOP, by process id) while timing,
in two pauses of under five minutes each, and always resumes it (SIGCONT).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import networkx as nx
import numba
import numpy as np
import timm
import torch

from vitlens_server.explain import get_method, maxflow
from vitlens_server.explain.methods.flow import FlowParams, flow_capacities
from vitlens_server.explain.recording import record

TRAINING = "vitlens_server.training.train"


@contextlib.contextmanager
def training_paused(enabled: bool) -> Iterator[list[int]]:
    """SIGSTOP the background training processes (by id) and SIGCONT them on exit."""
    pids: list[int] = []
    if enabled:
        found = subprocess.run(["pgrep", "-f", TRAINING], capture_output=True, text=True)
        pids = [int(p) for p in found.stdout.split() if int(p) != os.getpid()]
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        yield pids
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        signal.signal(signal.SIGTERM, previous)


def compile_seconds() -> tuple[float, float]:
    """(cold compile, cached load) of the kernels, each in a fresh process."""
    code = "from vitlens_server.explain import maxflow; print(maxflow.warm_up())"
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        runs = [
            subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            for _ in range(2)
        ]
    for run in runs:
        if run.returncode != 0:
            raise RuntimeError(run.stderr)
    cold, cached = (float(run.stdout.split()[-1]) for run in runs)
    return cold, cached


def vit_base(img_size: int = 224, sharpen: float = 1.0) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=img_size)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(sharpen)
    return model.eval()


def time_method(model: torch.nn.Module, images: int, params: FlowParams) -> dict[str, float]:
    """Wall and CPU seconds per image of attention_flow, one image at a time and as one batch."""
    fn = get_method("attention_flow").fn
    x = torch.randn(images, 3, 224, 224)
    targets = torch.zeros(images, dtype=torch.long)  # class-agnostic: not read
    wall, cpu, maps = [], [], []
    for b in range(images):
        rec = record(model, x[b : b + 1])
        start, start_cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            maps.append(fn(rec, targets[b : b + 1], params).heatmap)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    rec = record(model, x)
    start = time.perf_counter()
    with torch.no_grad():
        batched = fn(rec, targets, params).heatmap
    batch_seconds = time.perf_counter() - start
    assert torch.allclose(torch.cat(maps), batched, atol=1e-6)
    return {
        "wall": float(np.mean(wall)),
        "wall_max": float(np.max(wall)),
        "cpu": float(np.mean(cpu)),
        "batch": batch_seconds / images,
        "flow_mean": float(batched.mean()),
        "flow_min": float(batched.min()),
    }


def networkx_one_flow(
    img_size: int, flow_func: str, timeout_s: int, sharpen: float
) -> tuple[int, float | None, float, float]:
    """(N, networkx seconds or None on timeout, vitlens seconds, |difference|) for one source."""
    model = vit_base(img_size, sharpen)
    rec = record(model, torch.randn(1, 3, img_size, img_size))
    capacity = flow_capacities(rec, FlowParams()).numpy()[0]  # (L, N, N)
    layers, n, _ = capacity.shape
    source = rec.num_prefix_tokens + n // 2 - 1
    start = time.perf_counter()
    ours = maxflow.max_flow_values(capacity[None], np.array([source]), np.array([0]))[0, 0]
    ours_seconds = time.perf_counter() - start
    graph = nx.DiGraph()
    for layer in range(1, layers + 1):
        for i in range(n):
            for j in range(n):
                graph.add_edge((layer - 1, j), (layer, i), capacity=capacity[layer - 1, i, j])

    def give_up(*_):
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, give_up)
    signal.alarm(timeout_s)
    try:
        start = time.perf_counter()
        value = nx.maximum_flow_value(
            graph, (0, source), (layers, 0), flow_func=getattr(nx.algorithms.flow, flow_func)
        )
        seconds: float | None = time.perf_counter() - start
        difference = abs(value - ours)
    except TimeoutError:
        seconds, difference = None, math.nan
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return n, seconds, ours_seconds, difference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4, help="images per configuration")
    parser.add_argument("--sharpen", type=float, nargs="*", default=[1.0, 4.0])
    parser.add_argument("--nx-sharpen", type=float, default=4.0, help="qkv scale for networkx")
    parser.add_argument("--nx-timeout", type=int, default=120, help="seconds per networkx flow")
    parser.add_argument("--pause-training", action="store_true")
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0))
    torch.set_num_threads(cpus)
    print(
        f"{platform.machine()}, {cpus} CPUs; python {platform.python_version()}, "
        f"torch {torch.__version__}, numba {numba.__version__}, numpy {np.__version__}, "
        f"networkx {nx.__version__}; flows on {cpus} threads (nogil kernels, thread pool)"
    )
    with training_paused(args.pause_training) as paused:
        print(f"training processes paused: {paused or 'none'}")
        cold, cached = compile_seconds()
        print(f"numba compile, empty cache: {cold:.1f} s; load from cache: {cached:.2f} s")
        maxflow.warm_up()
        print("\nvit_base_patch16_224, random init, 12 layers, N = 197: 196 flows per image")
        print("| qkv scale | options | s/image (wall) | max | CPU s/image | batched s/image | flow")
        configs = [
            FlowParams(),
            FlowParams(head_fusion="max", discard_ratio=0.9),
            FlowParams(head_fusion="min"),
        ]
        for sharpen in args.sharpen:
            model = vit_base(sharpen=sharpen)
            for params in configs:
                t = time_method(model, args.images, params)
                print(
                    f"| {sharpen:g} | {params.head_fusion}, discard {params.discard_ratio:g} "
                    f"| {t['wall']:.2f} | {t['wall_max']:.2f} | {t['cpu']:.2f} | "
                    f"{t['batch']:.2f} | mean {t['flow_mean']:.3f}, min {t['flow_min']:.2g} |"
                )
    with training_paused(args.pause_training):
        print(f"\nONE max-flow (qkv scale {args.nx_sharpen:g}, mean fusion): networkx vs vitlens")
        for flow_func, img_sizes in (
            ("preflow_push", (112, 160, 224)),
            ("edmonds_karp", (112, 160)),
        ):
            sizes, seconds = [], []
            for img_size in img_sizes:
                n, nx_s, ours_s, diff = networkx_one_flow(
                    img_size, flow_func, args.nx_timeout, args.nx_sharpen
                )
                shown = f"{nx_s:.1f} s" if nx_s is not None else f"> {args.nx_timeout} s"
                print(
                    f"N = {n:3d}: networkx {flow_func} {shown}, vitlens {ours_s * 1e3:.1f} ms, "
                    f"|difference| {diff:.1e}"
                )
                if nx_s is not None:
                    sizes.append(n)
                    seconds.append(nx_s)
            if len(sizes) >= 2 and sizes[-1] < 197:
                slope, intercept = np.polyfit(np.log(sizes), np.log(seconds), 1)
                at_197 = math.exp(intercept) * 197**slope
                print(
                    f"{flow_func}: t ∝ N^{slope:.2f} extrapolates to ≈ {at_197:.0f} s per flow "
                    f"at N = 197, ≈ {at_197 * 196 / 3600:.1f} h per image"
                )


if __name__ == "__main__":
    main()

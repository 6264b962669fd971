"""What keeping freed host memory (`vitlens_server.host_memory`) buys: the same calls, two ways.

    PYTHONPATH=client:server:. python scripts/bench_host_memory.py --threads 2

mallopt settings last for a process's life, so each round runs two child processes of this
script, one with glibc's defaults and one with `keep_freed_memory` (which `vitlens serve` calls at
start), in alternating order. Each child times ``Explainer.explain_batch`` of every method (and
``Explainer.predict``) on the same images as a server's mixed traffic: --warmup rounds of every
call, then --repeats rounds of every call in turn, reporting each call's median ms and minor page
faults (``/proc/self/stat``). The report gives the median over rounds of each and the speed-up
glibc ms ÷ kept ms; it is printed and written to benchmarks/host_memory.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODES = ("glibc", "kept")
DEFAULT_METHODS = [
    "transformer_attribution",
    "partial_lrp",
    "generic",
    "gradcam",
    "agcam",
    "isaw",
    "rollout",
    "cam",
    "saliency",
]


def child(args: argparse.Namespace) -> None:
    """Time every method in this process, one JSON line {name: [ms, faults]} on stdout."""
    from vitlens_server.bench.methods import method_job
    from vitlens_server.explain import Explainer
    from vitlens_server.host_memory import keep_freed_memory, minor_page_faults
    from vitlens_server.models import load_model
    from vitlens_server.models.default import demo_spec

    if args.child == "kept" and not keep_freed_memory():
        raise SystemExit("no glibc mallopt here: nothing to compare")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(demo_spec(args.device))
    explainer = Explainer(model)
    pixels = torch.rand(args.batch, *model.geometry.input_size, device=model.device)
    calls = {"Predict": lambda: explainer.predict(pixels, top_k=5)}
    for name in args.methods:
        job = method_job(model, name, args.batch)
        calls[name] = lambda job=job: explainer.explain_batch([job])
    for _ in range(args.warmup):  # the steady state of a server that has served them all
        for run in calls.values():
            run()
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    faults: dict[str, list[int]] = {name: [] for name in calls}
    for _ in range(args.repeats):  # mixed traffic: each call after all the others
        for name, run in calls.items():
            before, start = minor_page_faults(), time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
            faults[name].append(minor_page_faults() - before)
    out = {
        name: [statistics.median(seconds[name]) * 1e3, statistics.median(faults[name])]
        for name in calls
    }
    explainer.close()
    print(json.dumps(out))


def run_child(mode: str, argv: list[str]) -> dict[str, list[float]]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", mode, *argv],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(results: dict[str, list[dict[str, list[float]]]], args: argparse.Namespace) -> str:
    names = list(results["kept"][0])
    lines = [
        "# Keeping freed host memory: the same calls with glibc's defaults and kept",
        "",
        f"Command: `PYTHONPATH=client:server:. python scripts/bench_host_memory.py --batch "
        f"{args.batch} --rounds {args.rounds} --repeats {args.repeats}"
        + (f" --threads {args.threads}" if args.threads else "")
        + "`",
        "",
        f"The demo model on {args.device}, B = {args.batch} (Predict too), fp32; torch "
        f"{torch.__version__}, {platform.machine()}, glibc {platform.libc_ver()[1]}; "
        f"{args.rounds} rounds of two child processes in alternating order, medians over rounds "
        f"of each child's median over {args.repeats} timed calls.",
        "",
        "| call | glibc defaults, ms | kept, ms | speed-up | minor faults a call, glibc | kept |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        ms = {m: statistics.median(r[name][0] for r in results[m]) for m in MODES}
        faults = {m: statistics.median(r[name][1] for r in results[m]) for m in MODES}
        lines.append(
            f"| `{name}` | {ms['glibc']:.1f} | {ms['kept']:.1f} | "
            f"**{ms['glibc'] / ms['kept']:.2f}x** | {faults['glibc']:.0f} | {faults['kept']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "host_memory.md")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    argv = ["--device", args.device, "--batch", str(args.batch), "--methods", *args.methods]
    argv += ["--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    argv += ["--threads", str(args.threads)]
    results: dict[str, list[dict[str, list[float]]]] = {m: [] for m in MODES}
    for round_ in range(args.rounds):
        for mode in MODES if round_ % 2 == 0 else MODES[::-1]:
            results[mode].append(run_child(mode, argv))
        print(f"round {round_ + 1}/{args.rounds} done", flush=True)
    body = markdown(results, args)
    print(body)
    args.out.write_text(body)


if __name__ == "__main__":
    main()

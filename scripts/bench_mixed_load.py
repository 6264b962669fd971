"""Cheap requests under slow ones: `generic` latency alone and beside `token_reflection` load.

    python scripts/bench_mixed_load.py --threads 1 --requests 40 --slow-clients 2

Starts `vitlens serve` (the demo model, result cache off) on loopback. First one client sends
``--requests`` one-image `generic` Explain calls back to back: the solo latencies. Then
``--slow-clients`` clients each send one-image `token_reflection` calls in a closed loop (every
call is gh·gw = 196 extra forwards), and once they have been answered once (steady state) the
same `generic` sequence is sent again: the mixed latencies. Latencies are client-side wall times of
`vitlens.Client.explain`; every image is distinct. The result (p50, p90, their ratio to solo, and
the token_reflection calls completed meanwhile) is printed and written to ``--out`` as a
Markdown section, replacing an earlier section of the same flags.

Issue #13's target: mixed `generic` p50 within 2x of its solo p50.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import numpy as np

import vitlens
from vitlens_server.bench.process import ServeProcess


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (224, 224, 3), dtype=np.uint8)


def _latencies(client: vitlens.Client, count: int, first_seed: int) -> list[float]:
    out = []
    for i in range(count):
        start = time.perf_counter()
        client.explain(_image(first_seed + i), method="generic")
        out.append(time.perf_counter() - start)
    return out


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def run(args: argparse.Namespace) -> dict:
    flags = ["--cache-mb", "0", "--devices", args.device]
    flags += ["--threads", str(args.threads)] if args.threads else []
    log = Path(args.log)
    with ServeProcess.start(flags, log=log) as server:
        server.wait_serving(timeout_s=600)
        with vitlens.Client(server.address, timeout_s=600) as client:
            _latencies(client, args.warmup, 10_000)
            client.explain(_image(1), method="token_reflection")  # warm the slow path too
            solo = _latencies(client, args.requests, 20_000)
            stop = threading.Event()
            done = [0] * args.slow_clients

            def slow(worker: int) -> None:
                seed = 30_000 + 1_000 * worker
                while not stop.is_set():
                    client.explain(_image(seed), method="token_reflection")
                    done[worker] += 1
                    seed += 1

            threads = [threading.Thread(target=slow, args=(w,)) for w in range(args.slow_clients)]
            for thread in threads:
                thread.start()
            while sum(done) == 0:  # steady state: the slow calls have been answered once
                time.sleep(0.05)
            before = sum(done)
            window = time.perf_counter()
            mixed = _latencies(client, args.requests, 40_000)
            window = time.perf_counter() - window
            slow_done = sum(done) - before
            stop.set()
            for thread in threads:
                thread.join()
    return {
        "solo": solo,
        "mixed": mixed,
        "slow_done": slow_done,
        "window_s": window,
    }


def report(args: argparse.Namespace, result: dict) -> str:
    solo, mixed = result["solo"], result["mixed"]
    p50s, p50m = statistics.median(solo), statistics.median(mixed)
    heading = (
        f"## generic beside token_reflection: {args.device}, threads {args.threads or 'default'}, "
        f"{args.slow_clients} slow clients"
    )
    lines = [
        heading,
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()} with {os.cpu_count()} "
        f"CPU cores, demo model, `python scripts/bench_mixed_load.py --device {args.device} "
        f"--threads {args.threads} --requests {args.requests} --slow-clients {args.slow_clients}`.",
        "",
        "| generic, one image | p50 ms | p90 ms | p50 ÷ solo |",
        "| --- | ---: | ---: | ---: |",
        f"| alone | {p50s * 1e3:.1f} | {_percentile(solo, 90) * 1e3:.1f} | 1.00 |",
        f"| beside token_reflection | {p50m * 1e3:.1f} | {_percentile(mixed, 90) * 1e3:.1f} | "
        f"{p50m / p50s:.2f} |",
        "",
        f"{result['slow_done']} token_reflection calls completed during the "
        f"{result['window_s']:.1f} s mixed window ({args.requests} generic calls each way).",
        "",
    ]
    return "\n".join(lines)


def write(path: Path, section: str) -> None:
    """Replace the section with the same heading, or append it."""
    heading = section.splitlines()[0]
    text = path.read_text() if path.exists() else "# Mixed load\n\n" + (__doc__ or "") + "\n"
    parts = text.split("\n## ")
    kept = [parts[0]] + [p for p in parts[1:] if "## " + p.splitlines()[0] != heading]
    path.write_text("\n## ".join(kept).rstrip() + "\n\n" + section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="the server's device (cpu, cuda:0...)")
    parser.add_argument("--threads", type=int, default=0, help="server torch threads (0: default)")
    parser.add_argument("--requests", type=int, default=40, help="generic calls each way")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--slow-clients", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/mixed_load.md")
    parser.add_argument("--log", default="/tmp/vitlens-mixed-load.log")
    args = parser.parse_args()
    result = run(args)
    section = report(args, result)
    print(section)
    write(Path(args.out), section)


if __name__ == "__main__":
    main()

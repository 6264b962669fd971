"""Serving benchmark in one command: batching on, batching off, and the in-process roof.

    PYTHONPATH=client:server:. python scripts/bench_serving.py            # CPU, demo model

    python scripts/bench_serving.py --model vit_base_patch16_224:random --device cuda:0 \\
        --precision bf16 --methods generic,rollout --concurrency 1,64,256 --requests 20000 \\
        --duration 30 --max-batch-size 128 --max-delay-ms 0 --roof-max-batch 256 --processes 4

Starts `vitlens serve` twice as subprocesses on loopback — with batching (``--max-batch-size B
--max-delay-ms D``) and without (``--max-batch-size 1``) — waits for grpc.health.v1 SERVING
(polled under a deadline), runs the closed-loop load (`vitlens_server.bench.load`) at each
concurrency for each method, stops the server, and finally measures the roof of the same model
in this process (`vitlens_server.bench.roof`). Writes one Markdown section per method to
BENCHMARKS.md, replacing the section of the same device, model, method and precision.

Server flags this build of `vitlens serve` does not have (``--max-delay-ms``, ``--metrics-port``,
``--precision``) are left out and the section says so; without a metrics port the batch-size
distribution is "unavailable".
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "client", ROOT / "server"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from vitlens.results import ModelInfo  # noqa: E402
from vitlens_server.bench.cli import measure_roof_for, parse_ints  # noqa: E402
from vitlens_server.bench.load import LoadConfig, LoadReport, resolve_model, sweep  # noqa: E402
from vitlens_server.bench.process import ServeProcess, free_port  # noqa: E402
from vitlens_server.bench.report import (  # noqa: E402
    device_label,
    environment,
    load_table,
    markdown_table,
    replace_section,
    roof_images_per_s,
    roof_kind,
    select_columns,
)
from vitlens_server.bench.roof import PRECISIONS, RoofReport  # noqa: E402
from vitlens_server.cli import build_parser as serve_parser  # noqa: E402

INTRO = """# Serving benchmarks

`scripts/bench_serving.py` starts `vitlens serve` twice on loopback, once with dynamic batching
and once with batching disabled (`--max-batch-size 1`). It drives each server with closed-loop
load from C concurrent clients through the SDK's `AsyncClient`: every client sends one Explain
request, waits for the answer, and sends the next, until N requests or T seconds. In the same run
and the same process it then measures the **roof** of the same model on the same device:

- fused forward+backward images/s at the best batch size (timm's fused attention, backward to
  the input, no hooks), which is the roof of gradient methods such as `generic`;
- fused forward images/s, which is the roof of forward-only methods such as `rollout`;
- the latency of one in-process explanation (`Explainer.explain`, batch 1).

Throughput is images of successful requests divided by the window from the first send to the last
answer. Latencies are client-side, per successful request; "queue ms" is the server's own mean
wait before the model pass (`Timing.queue_seconds` of the answers). "÷ roof" is the throughput
over the roof of the method's kind, and "÷ no batching" is the throughput over the
batching-off server's at the same C. The batch sizes come from the difference of the server's
`vitlens_batch_size` histogram before and after the window; they read "unavailable" when no
metrics endpoint answers. Every image sent is unique (a 16-byte tag in its first pixels) and the
servers run with the result cache off (`--cache-mb 0`), so every image is computed. Each section
below is one method of one run. It is replaced when the same device, model, method and precision
is run again.

Targets of issue #5, for an H100 with ViT-B/16 and random weights: end-to-end `generic` ≥ 60 % of
the fused forward+backward roof; ≥ 20x the batching-off server; p50 at C = 1 within 1.5x of one
in-process explanation; `rollout` ≥ 50 % of the fused forward roof.

## GPU command (pending: no GPU in this session)

```
python scripts/bench_serving.py --model vit_base_patch16_224:random --device cuda:0 \\
    --precision bf16 --methods generic,rollout --concurrency 1,64,256 --requests 20000 \\
    --duration 30 --max-batch-size 128 --max-delay-ms 0 --roof-max-batch 256 --processes 4
```

Each point stops after 20,000 requests or 30 s. Four client processes keep the Python client from
being the limit at C = 256. The batching server takes up to 128 images per pass, and the roof
tries batches up to 256. Expect about 6 to 8 minutes in all.
"""

TABLE_COLUMNS = (
    "server",
    "C",
    "img/s",
    "÷ roof",
    "÷ no batching",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "queue ms",
    "mean batch",
    "batch sizes",
    "errors",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vitlens-demo", help="`vitlens serve --model` spec")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--methods", default="generic", help="comma-separated")
    p.add_argument("--concurrency", type=parse_ints, default=[1, 8], metavar="C[,C2,...]")
    p.add_argument("--requests", type=int, default=200, help="requests per point (N)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds per point at most (T)")
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--images", choices=["scenes", "random"], default="scenes")
    p.add_argument("--warmup", type=int, help="untimed requests per point (default: C)")
    p.add_argument("--processes", type=int, default=1, help="client processes")
    p.add_argument("--max-batch-size", type=int, default=8, help="batching server's B")
    p.add_argument("--max-delay-ms", type=float, default=0.0, help="batching window")
    p.add_argument("--roof-max-batch", type=int, help="largest roof batch (default: B)")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per roof point")
    p.add_argument("--threads", type=int, help="torch threads of the servers and the roof")
    p.add_argument("--no-baseline", action="store_true", help="skip the batching-off server")
    p.add_argument("--startup-timeout-s", type=float, default=600.0)
    p.add_argument("--timeout-s", type=float, default=120.0, help="deadline per request")
    p.add_argument("--note", default="", help="a sentence about the machine, e.g. its load")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--json", type=Path, help="also write the raw results as JSON")
    return p


def serve_supports(flag: str, value: str) -> bool:
    """Whether this build's `vitlens serve` accepts ``flag value``."""
    try:
        _, unknown = serve_parser().parse_known_args([flag, value])
    except SystemExit:  # known flag, value refused (argparse printed why)
        return False
    return not unknown


@dataclass
class Server:
    label: str
    argv: list[str]  # the `vitlens serve` arguments that matter for the reader
    metrics_url: str | None
    child: ServeProcess

    @property
    def address(self) -> str:
        return self.child.address


def start_server(
    label: str, args: argparse.Namespace, batch: int, delay_ms: float | None, logs: Path
) -> tuple[Server, list[str]]:
    """Start `vitlens serve`; returns it and the flags left out because this build lacks them."""
    shown = ["--max-batch-size", str(batch)]
    display = list(shown)
    missing = []
    # No result cache: every request is computed, as in the roof (the images are unique anyway).
    optional = [("--precision", args.precision), ("--cache-mb", "0")]
    if delay_ms is not None:
        optional.insert(0, ("--max-delay-ms", f"{delay_ms:g}"))
    metrics_port = free_port()
    optional.append(("--metrics-port", str(metrics_port)))
    for flag, value in optional:
        if serve_supports(flag, value):
            shown += [flag, value]
            if flag == "--metrics-port":
                value = "<free port>"
            display += [flag, value]
        else:
            missing.append(flag)
    extra = ["--device", args.device, "--model", args.model, "--log-level", "warning"]
    if args.threads:
        extra += ["--threads", str(args.threads)]
    log = logs / f"serve-{label.replace(' ', '-')}.log"
    child = ServeProcess.start([*extra, *shown], log=log)
    metrics = f"http://127.0.0.1:{metrics_port}/metrics" if "--metrics-port" in shown else None
    return Server(label, display, metrics, child), missing


async def load_points(
    server: Server, args: argparse.Namespace, methods: list[str]
) -> tuple[ModelInfo, list[LoadReport]]:
    info = await resolve_model(server.address, "", args.timeout_s)
    base = LoadConfig(
        target=server.address,
        model=info.name,
        requests=args.requests,
        duration_s=args.duration,
        images_per_request=args.images_per_request,
        images=args.images,
        warmup_requests=args.warmup,
        timeout_s=args.timeout_s,
        processes=args.processes,
        metrics_url=server.metrics_url,
    )
    return info, await sweep(base, info, methods, args.concurrency, label=server.label)


def run_server(
    label: str, args: argparse.Namespace, methods: list[str], batch: int, delay: float | None
) -> tuple[Server, list[str], ModelInfo, list[LoadReport]]:
    with tempfile.TemporaryDirectory(prefix="vitlens-bench-") as logs:
        server, missing = start_server(label, args, batch, delay, Path(logs))
        with server.child:
            server.child.wait_serving(args.startup_timeout_s)
            info, reports = asyncio.run(load_points(server, args, methods))
    return server, missing, info, reports


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def targets(
    method: str, kind: str, rows: list[tuple[str, LoadReport]], roof: RoofReport
) -> list[str]:
    """The issue's target checks for one method, as measured in this run."""
    on = [r for label, r in rows if label == "batching"]
    off = {r.concurrency: r for label, r in rows if label == "no batching"}
    lines = []
    if not on:
        return lines
    best = max(on, key=lambda r: r.images_per_s)
    top = roof_images_per_s(roof, kind)
    goal = "≥ 50 %" if kind == "forward" else "≥ 60 %"
    lines.append(
        f"- throughput ÷ fused {kind.replace('_', '+')} roof: {_pct(best.images_per_s / top)} "
        f"at C = {best.concurrency} (target {goal})"
    )
    top_c = max(on, key=lambda r: r.concurrency)
    if top_c.concurrency in off and off[top_c.concurrency].images_per_s > 0:
        ratio = top_c.images_per_s / off[top_c.concurrency].images_per_s
        lines.append(
            f"- batching ÷ no batching at C = {top_c.concurrency}: {ratio:.1f}x (target ≥ 20x)"
        )
    single = next((r for r in on if r.concurrency == 1), None)
    one = roof.explain_latency_s.get(method)
    if single is not None and one:
        lines.append(
            f"- p50 at C = 1 ÷ one in-process explanation ({one * 1e3:.1f} ms): "
            f"{single.latency.p50_s / one:.2f}x (target ≤ 1.5x)"
        )
    return lines


def section_body(
    method: str,
    rows: list[tuple[str, LoadReport]],
    roof: RoofReport,
    kinds: dict[str, str],
    context: dict,
) -> str:
    env, args = context["env"], context["args"]
    kind = kinds.get(method, "forward_backward")
    table = select_columns(load_table(rows, roof=roof, roof_kinds=kinds), TABLE_COLUMNS)
    fb, fwd = roof.best_forward_backward, roof.best_forward
    ladder = ", ".join(
        f"{p.batch_size}: {p.images_per_s:.1f}/{q.images_per_s:.1f}"
        for p, q in zip(roof.forward_backward, roof.forward, strict=False)
    )
    lines = [
        f"## `{method}` · {roof.model} · {context['device']} · {roof.precision}",
        "",
        f"Recorded {context['when']} with",
        "",
        "```",
        context["command"],
        "```",
        "",
        f"- Machine: {env['cpu']}, {env['cpu_count']} cores"
        + (f", {env['gpu']} (CUDA {env.get('cuda')})" if env.get("gpu") else ", no GPU")
        + f"; load average {context['load_start']:.2f} at the start, "
        f"{context['load_end']:.2f} at the end. {args.note}".rstrip(),
        f"- Versions: Python {env['python']}, torch {env['torch']}, timm {env['timm']}, "
        f"grpcio {env['grpcio']}.",
        "- Servers (`vitlens serve`, loopback): "
        + "; ".join(f"{s.label} `{' '.join(s.argv)}`" for s in context["servers"])
        + (f"; torch threads {args.threads}" if args.threads else "")
        + ".",
    ]
    if context["missing"]:
        lines.append(
            "- Not in this build of `vitlens serve`, so left out: "
            + ", ".join(f"`{f}`" for f in context["missing"])
            + (
                f"; the servers ran fp32, so the roof did too (asked: {args.precision})"
                if roof.precision != args.precision
                else ""
            )
            + "."
        )
    lines += [
        f"- Load: closed loop, {args.images_per_request} image(s) per request "
        f"({args.images}, {'x'.join(map(str, context['input_size'][1:]))} px, raw uint8), "
        f"N = {args.requests} requests or T = {args.duration:g} s per point, "
        f"warm-up {'C' if args.warmup is None else args.warmup} requests, "
        f"{args.processes} client process(es).",
        f"- Roof ({roof.device}, {roof.precision}, fused attention "
        f"{'on' if roof.fused_attention else 'OFF'}, median of {roof.repeats}): "
        f"fused fwd+bwd **{fb.images_per_s:.1f} img/s** at B = {fb.batch_size}; fused fwd "
        f"**{fwd.images_per_s:.1f} img/s** at B = {fwd.batch_size}; one `{method}` "
        f"explanation in process {roof.explain_latency_s.get(method, float('nan')) * 1e3:.1f} ms."
        f" Img/s by B (fwd+bwd/fwd): {ladder}.",
        "",
        markdown_table(table),
        "",
        "Against the targets of issue #5"
        + (
            ":"
            if roof.device.startswith("cuda")
            else " (set for an H100 with ViT-B/16; on a CPU they only show the arithmetic):"
        ),
        "",
        *targets(method, kind, rows, roof),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    runs: list[tuple[str, LoadReport]] = []
    servers, missing = [], set()
    plan = [("batching", args.max_batch_size, args.max_delay_ms)]
    if not args.no_baseline:
        plan.append(("no batching", 1, None))
    info = None
    for label, batch, delay in plan:
        server, lacking, info, reports = run_server(label, args, methods, batch, delay)
        servers.append(server)
        missing.update(lacking)
        runs += [(label, r) for r in reports]
    kinds = {m.name: roof_kind(m.passes) for m in info.methods}
    env = environment(args.device)  # after the servers: CUDA starts here only now
    # The roof runs at the servers' precision: fp32 when `vitlens serve` has no --precision.
    precision = "fp32" if "--precision" in missing else args.precision
    if precision != args.precision:
        print("warning: the servers ran fp32, so the roof does too", file=sys.stderr)
    print("measuring the roof in this process", file=sys.stderr)
    roof, warning = measure_roof_for(
        args.model,
        args.device,
        served=info,
        max_batch_size=args.roof_max_batch or args.max_batch_size,
        precision=precision,
        methods=methods,
        repeats=args.repeats,
    )
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    context = {
        "env": env,
        "args": args,
        "device": device_label(args.device, env),
        "when": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python scripts/bench_serving.py "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "servers": servers,
        "missing": sorted(missing),
        "input_size": info.input_size,
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
    }
    document = args.out.read_text() if args.out.exists() else INTRO
    for method in methods:
        rows = [(label, r) for label, r in runs if r.method == method]
        body = section_body(method, rows, roof, kinds, context)
        key = f"{context['device']} | {roof.model} | {method} | {roof.precision}"
        document = replace_section(document, key, body)
        print(body + "\n")
    args.out.write_text(document)
    if args.json:
        doc = {
            "command": context["command"],
            "environment": env,
            "servers": [{"label": s.label, "argv": s.argv} for s in servers],
            "missing_server_flags": sorted(missing),
            "load": [{"server": label, **r.to_dict()} for label, r in runs],
            "roof": roof.to_dict(),
            "roof_kinds": kinds,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

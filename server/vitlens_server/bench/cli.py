"""`vitlens bench`: closed-loop load on a running server, and the in-process roof beside it.

    vitlens bench --server 127.0.0.1:50051 --method generic --concurrency 1,8 --requests 200 \\
        --metrics-url http://127.0.0.1:9090/metrics --roof --json bench.json

Prints one row per (method, concurrency) — throughput, latency percentiles, errors by status
code, the batch-size distribution from the server's metrics — and, with ``--roof``, the roof
of the same model measured in this process after the load, with each row's ratio to it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from vitlens.errors import VitlensError
from vitlens.results import ModelInfo
from vitlens_server.bench.load import LoadConfig, LoadReport, resolve_model, sweep
from vitlens_server.bench.report import (
    LOAD_HEADER,
    environment,
    load_table,
    roof_kind,
    roof_table,
    select_columns,
    text_table,
)
from vitlens_server.bench.roof import PRECISIONS, RoofReport

__all__ = ["build_parser", "default_roof_spec", "main", "measure_roof_for", "parse_ints"]


def parse_ints(text: str) -> list[int]:
    """``"1,8,64"`` → ``[1, 8, 64]``; every value ≥ 1."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _option(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vitlens bench",
        description="Closed-loop load on a vitlens server, and the in-process roof beside it.",
    )
    p.add_argument("--server", default="127.0.0.1:50051", metavar="HOST:PORT")
    p.add_argument("--model", default="", help="served model (default: the server's)")
    p.add_argument("--method", default="generic", help="method, or several: generic,rollout")
    p.add_argument("--concurrency", type=parse_ints, default=[1, 8], metavar="C[,C2,...]")
    p.add_argument("--requests", type=int, default=200, help="requests per point (N)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds per point at most (T)")
    p.add_argument("--images-per-request", type=int, default=1, metavar="K")
    p.add_argument("--images", choices=["scenes", "random"], default="scenes")
    p.add_argument("--wire", choices=["pixels", "png"], default="pixels")
    p.add_argument("--warmup", type=int, help="untimed requests per point (default: C)")
    p.add_argument("--processes", type=int, default=1, help="client processes")
    p.add_argument("--timeout-s", type=float, default=120.0, help="deadline per request")
    p.add_argument("--option", action="append", type=_option, metavar="KEY=VALUE")
    p.add_argument(
        "--metrics-url", help="the server's Prometheus endpoint, e.g. http://h:p/metrics"
    )
    roof = p.add_argument_group("roof (in this process, after the load)")
    roof.add_argument("--roof", action="store_true", help="measure the in-process roof")
    roof.add_argument("--roof-model", metavar="SPEC", help="model spec as `vitlens serve --model`")
    roof.add_argument("--roof-max-batch", type=int, default=64, help="largest roof batch")
    roof.add_argument("--device", help="roof device (default: the served model's)")
    roof.add_argument("--precision", choices=PRECISIONS, default="fp32")
    roof.add_argument("--repeats", type=int, default=10, help="timed runs per roof point")
    roof.add_argument("--threads", type=int, help="torch intra-op threads of the roof")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the results as JSON")
    return p


def default_roof_spec(info: ModelInfo) -> str:
    """The spec that rebuilds the served model for the roof (weights do not change its cost)."""
    from vitlens_server.models.default import DEMO_MODEL_NAME

    if info.name == DEMO_MODEL_NAME:
        return DEMO_MODEL_NAME
    suffix = ":random" if info.random_weights else ""
    return f"{info.name}={info.architecture}{suffix}"


def measure_roof_for(
    spec_text: str,
    device: str,
    *,
    served: ModelInfo | None,
    max_batch_size: int,
    precision: str,
    methods: list[str],
    repeats: int,
) -> tuple[RoofReport, str]:
    """Load ``spec_text`` on ``device`` and measure its roof; returns it and a warning (or "")."""
    from vitlens_server.bench.roof import measure_roof
    from vitlens_server.cli import parse_model_spec
    from vitlens_server.models import load_model

    model = load_model(parse_model_spec(spec_text, device))
    warning = ""
    g = model.geometry
    if served is not None and (
        tuple(served.input_size) != g.input_size
        or served.num_layers != g.num_layers
        or served.num_heads != g.num_heads
    ):
        warning = (
            f"roof model {spec_text!r} differs from the served {served.name!r} "
            f"(input {g.input_size}, {g.num_layers} layers, {g.num_heads} heads)"
        )
    applicable = [m for m in methods if served is None or m in served.method_names]
    roof = measure_roof(
        model,
        max_batch_size=max_batch_size,
        precision_mode=precision,
        methods=applicable,
        repeats=repeats,
        warmup=max(2, repeats // 5),
    )
    return roof, warning


async def _load(args: argparse.Namespace, methods: list[str]) -> tuple[ModelInfo, list[LoadReport]]:
    info = await resolve_model(args.server, args.model, args.timeout_s)
    base = LoadConfig(
        target=args.server,
        model=info.name,
        requests=args.requests,
        duration_s=args.duration,
        images_per_request=args.images_per_request,
        images=args.images,
        wire=args.wire,
        warmup_requests=args.warmup,
        timeout_s=args.timeout_s,
        processes=args.processes,
        method_options=dict(args.option or []),
        metrics_url=args.metrics_url,
    )
    return info, await sweep(base, info, methods, args.concurrency)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    methods = [m for m in args.method.split(",") if m]
    try:
        info, reports = asyncio.run(_load(args, methods))
    except VitlensError as err:
        print(f"vitlens bench: {err.code.name}: {err.details}", file=sys.stderr)
        return 1
    kinds = {m.name: roof_kind(m.passes) for m in info.methods}
    roof, warning = None, ""
    if args.roof:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        spec = args.roof_model or default_roof_spec(info)
        roof, warning = measure_roof_for(
            spec,
            args.device or info.device,
            served=info,
            max_batch_size=args.roof_max_batch,
            precision=args.precision,
            methods=methods,
            repeats=args.repeats,
        )
    table = load_table([("server", r) for r in reports], roof=roof, roof_kinds=kinds)
    columns = [c for c in LOAD_HEADER if c not in ("server", "÷ no batching")]
    print(text_table(select_columns(table, columns)))
    notes = {r.metrics_note for r in reports if r.metrics_note}
    for note in sorted(notes):
        print(f"batch sizes unavailable: {note}")
    if roof is not None:
        print(f"\nroof: {roof.model} on {roof.device}, {roof.precision}")
        print(text_table(roof_table(roof)))
        for method, seconds in roof.explain_latency_s.items():
            print(f"one {method} explanation in process: {seconds * 1e3:.1f} ms")
        if warning:
            print(f"warning: {warning}")
    if args.json:
        doc = {
            "argv": sys.argv if argv is None else ["vitlens", "bench", *argv],
            "server": args.server,
            "environment": environment(roof.device if roof else "cpu"),
            "load": [r.to_dict() for r in reports],
            "roof": roof.to_dict() if roof else None,
            "roof_kinds": kinds,
            "warning": warning,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0

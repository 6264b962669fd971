"""`vitlens serve`: load models and serve them over gRPC until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
from pathlib import Path

from vitlens_server.config import DEFAULT_MAX_PIXELS, ServerConfig
from vitlens_server.logs import configure_logging
from vitlens_server.models.default import CLIP_MODEL_NAME, DEMO_MODEL_NAME, builtin_spec
from vitlens_server.models.spec import ModelSpec
from vitlens_server.rpc.security import read_tokens
from vitlens_server.settings import SettingsError, parse_settings

__all__ = ["main", "parse_model_spec"]

log = logging.getLogger("vitlens.serve")


def parse_model_spec(text: str, device: str, precision: str = "fp32") -> ModelSpec:
    """``[NAME=]ARCH[:WEIGHTS|:random]``, ``[NAME=]SOURCE`` for an image-text (CLIP) or a VQA
    model, or the name of a model that ships with the server: ``vitlens-demo`` (the embedded
    classifier), ``vitlens-clip`` (the exemplar CLIP), ``vitlens-visualbert`` and
    ``vitlens-lxmert`` (the exemplar VQA models), or ``vitlens-vilt`` once one is trained and
    exported (`vitlens_server.models.default`).

    ``ARCH`` alone loads timm's pretrained weights from the local cache; ``:random`` builds a
    randomly initialised model (for testing); otherwise ``WEIGHTS`` is a local file. ``SOURCE``
    is ``open_clip:DIR``, ``open_clip:ARCH:FILE`` or ``hf-clip:DIR`` (docs/image_text_models.md),
    ``hf-vqa:DIR`` (docs/vqa_models.md) or ``hf-detr:DIR`` (docs/detection_models.md); without
    ``NAME=`` the model is named after the directory or file.
    """
    builtin = builtin_spec(text, device, precision)
    if builtin is not None:
        return builtin
    image_text = _image_text_spec(text, device, precision)
    if image_text is not None:
        return image_text
    vqa = _vqa_spec(text, device, precision)
    if vqa is not None:
        return vqa
    name, _, rest = text.rpartition("=")
    arch, _, weights = rest.partition(":")
    if not arch:
        raise ValueError(f"model spec {text!r} names no architecture")
    return ModelSpec(
        name=name or arch,
        architecture=arch,
        weights=Path(weights) if weights and weights != "random" else None,
        pretrained=not weights,
        device=device,
        precision=precision,
    )


def _image_text_spec(text: str, device: str, precision: str) -> ModelSpec | None:
    """The spec of ``[NAME=]open_clip:...`` or ``[NAME=]hf-clip:...``; None for other specs."""
    from vitlens_server.models.image_text.source import FORMATS, parse_image_text_source

    name, sep, rest = text.partition("=")
    if not sep:
        name, rest = "", text
    if rest.partition(":")[0] not in FORMATS:
        return None
    source = parse_image_text_source(rest)  # ValueError names the syntax
    return ModelSpec(
        name=name or source.path.stem,
        architecture=source.format,
        source=str(source),
        device=device,
        precision=precision,
    )


def _vqa_spec(text: str, device: str, precision: str) -> ModelSpec | None:
    """The spec of ``[NAME=]hf-vqa:DIR`` or ``[NAME=]hf-detr:DIR``; None for other specs."""
    name, sep, rest = text.partition("=")
    if not sep:
        name, rest = "", text
    fmt, _, path = rest.partition(":")
    if fmt not in ("hf-vqa", "hf-detr"):
        return None
    if not path:
        kind = "VQA model" if fmt == "hf-vqa" else "detector"
        raise ValueError(f"{kind} source {rest!r} names no directory ({fmt}:DIR)")
    return ModelSpec(
        name=name or Path(path).name,
        architecture=fmt,
        source=rest,
        device=device,
        precision=precision,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitlens serve", description="Serve Vision Transformers and their explanations."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=50051, help="gRPC port (0: pick a free one)")
    parser.add_argument(
        "--model",
        action="append",
        metavar="[NAME=]ARCH[:WEIGHTS|:random] | [NAME=]open_clip:DIR | ...",
        help="model to serve (repeatable): a timm ViT, an image-text (CLIP) model "
        "open_clip:DIR, open_clip:ARCH:FILE or hf-clip:DIR, or a shipped model by name: "
        f"{DEMO_MODEL_NAME!r} (the embedded classifier) or {CLIP_MODEL_NAME!r} (the exemplar "
        f"CLIP); default: {DEMO_MODEL_NAME!r} alone",
    )
    parser.add_argument("--default-model", help="model used when a request names none")
    parser.add_argument(
        "--devices",
        "--device",
        default="cpu",
        help="comma-separated torch devices, e.g. cpu, cuda:0 or cuda:0,cuda:1: every model "
        "gets a replica on each, fed by one batcher",
    )
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "tf32", "bf16"),
        help="fp32; tf32 (CUDA matmuls in TensorFloat-32); bf16 (autocast model passes)",
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=32,
        help="images per model pass: concurrent requests are batched up to it (1: no batching)",
    )
    parser.add_argument(
        "--max-delay-ms",
        type=float,
        default=0.0,
        help="longest a request waits for batch-mates before its pass starts (0: none; "
        "batches still form from requests arriving while the device is busy)",
    )
    parser.add_argument(
        "--max-queue-images",
        type=int,
        default=1024,
        help="images allowed to wait per model; beyond it requests get RESOURCE_EXHAUSTED",
    )
    parser.add_argument("--max-images", type=int, default=256, help="images per request")
    parser.add_argument(
        "--max-texts", type=int, default=64, help="image-text models: texts or prompts per request"
    )
    parser.add_argument(
        "--max-text-chars", type=int, default=300, help="image-text models: characters per text"
    )
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve TLS")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument(
        "--tls-client-ca", type=Path, help="PEM CA bundle: require client certificates (mTLS)"
    )
    parser.add_argument(
        "--auth-token-file",
        type=Path,
        help="require 'authorization: Bearer <token>' with one of the tokens in this file "
        "(one per line; health and reflection stay open)",
    )
    parser.add_argument(
        "--weights-root",
        action="append",
        type=Path,
        default=[],
        help="folder model weights must lie in (repeatable; symlinks resolved); unset: any path "
        "the operator names",
    )
    parser.add_argument(
        "--dataset-root",
        action="append",
        type=Path,
        default=[],
        help="folder Evaluate may read datasets from (repeatable; nothing else is readable)",
    )
    parser.add_argument(
        "--cache-mb",
        type=float,
        default=256,
        help="result cache size in MiB (identical requests are answered from it; 0: off)",
    )
    parser.add_argument(
        "--metrics-port", type=int, help="serve Prometheus metrics on this HTTP port (0: any)"
    )
    parser.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="pixel limit per image"
    )
    parser.add_argument(
        "--max-inline-samples",
        type=int,
        default=256,
        help="samples an Evaluate request may carry inline (larger sets: --dataset-root)",
    )
    parser.add_argument(
        "--max-inline-mb",
        type=float,
        default=64,
        help="MiB of image and mask data an Evaluate request may carry inline",
    )
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--return-freed-memory",
        action="store_true",
        help="leave glibc malloc's defaults: freed host memory goes back to the kernel, and every "
        "CPU pass faults its pages in again (default: kept in the process, see host_memory)",
    )
    parser.add_argument(
        "--default-deadline-s",
        type=float,
        help="deadline for Explain/Predict calls that set none (default: none)",
    )
    parser.add_argument(
        "--max-message-mb",
        type=float,
        default=256,
        help="largest gRPC message the server sends or receives, in MiB",
    )
    parser.add_argument(
        "--grace-s",
        type=float,
        default=10.0,
        help="on SIGTERM, seconds accepted calls get to finish before the server stops",
    )
    parser.add_argument(
        "--tracing",
        action="store_true",
        help="OpenTelemetry traces of every call, its queue waits and model passes (needs "
        "vitlens-server[tracing]; the collector: OTEL_EXPORTER_OTLP_ENDPOINT, default "
        "localhost:4317)",
    )
    parser.add_argument(
        "--tracing-exporter",
        default="otlp",
        choices=("otlp", "console"),
        help="otlp: OTLP/gRPC to the collector; console: print each span (debugging)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    parser.add_argument(
        "--log-format", default="text", choices=["text", "json"], help="json: one object per line"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_settings(build_parser(), argv)
    except SettingsError as err:
        print(f"vitlens serve: {err}", file=sys.stderr)
        return 2
    configure_logging(args.log_level, args.log_format)
    try:
        config = config_from_args(args)
    except (ValueError, OSError) as err:
        print(f"vitlens serve: {err}", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not args.return_freed_memory:
        from vitlens_server.host_memory import keep_freed_memory

        if not keep_freed_memory():
            log.info("host malloc left as it is: no glibc mallopt here")
    from vitlens_server.models.loading import ModelLoadError

    try:
        asyncio.run(serve(config))
    except (ModelLoadError, ValueError, OSError) as err:
        print(f"vitlens serve: {err}", file=sys.stderr)
        return 1
    return 0


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The flags as a `ServerConfig`; ValueError/OSError say what is wrong with them."""
    devices = tuple(d.strip() for d in args.devices.split(",") if d.strip())
    if not devices:
        raise ValueError("--devices names no device")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    if args.tracing:
        from vitlens_server.tracing import require

        require(args.tracing_exporter)  # before the models load: say what to install at once
    for flag, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key),
                       ("--tls-client-ca", args.tls_client_ca)):  # fmt: skip
        if path is not None and not path.is_file():
            raise ValueError(f"{flag} {path} is not a readable file")
    specs = tuple(
        parse_model_spec(m, devices[0], args.precision) for m in args.model or [DEMO_MODEL_NAME]
    )
    if args.weights_root:
        roots = [root.resolve() for root in args.weights_root]
        for spec in specs:
            if spec.weights is not None and spec.name != DEMO_MODEL_NAME:
                resolved = spec.weights.resolve()
                if not any(resolved.is_relative_to(root) for root in roots):
                    raise ValueError(
                        f"model {spec.name!r}: weights {spec.weights} are outside --weights-root "
                        f"({', '.join(map(str, args.weights_root))})"
                    )
    return ServerConfig(
        host=args.host,
        port=args.port,
        models=specs,
        devices=devices,
        default_model=args.default_model,
        max_batch_size=args.max_batch_size,
        max_delay_ms=args.max_delay_ms,
        max_queue_images=args.max_queue_images,
        metrics_port=args.metrics_port,
        cache_bytes=int(args.cache_mb * 1024 * 1024),
        dataset_roots=tuple(args.dataset_root),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        auth_tokens=read_tokens(args.auth_token_file) if args.auth_token_file else (),
        grace_s=args.grace_s,
        default_deadline_s=args.default_deadline_s,
        max_message_bytes=int(args.max_message_mb * 1024 * 1024),
        max_images_per_request=args.max_images,
        max_texts_per_request=args.max_texts,
        max_text_chars=args.max_text_chars,
        max_pixels=args.max_pixels,
        max_inline_samples=args.max_inline_samples,
        max_inline_bytes=int(args.max_inline_mb * 1024 * 1024),
        tracing=args.tracing,
        tracing_exporter=args.tracing_exporter,
    )


async def serve(config: ServerConfig) -> None:
    """Load the models, serve until SIGINT/SIGTERM, then drain and stop."""
    from vitlens_server.app import VitlensServer
    from vitlens_server.models import ModelRegistry, load_model

    loop = asyncio.get_running_loop()
    models, replicas = [], {}
    for spec in config.models:
        models.append(await loop.run_in_executor(None, load_model, spec))
        replicas[spec.name] = [
            await loop.run_in_executor(None, load_model, dataclasses.replace(spec, device=device))
            for device in config.devices[1:]
        ]
    server = VitlensServer(config, ModelRegistry(models, config.default_model), replicas)
    await server.start()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: finishing in-flight calls (grace %.0f s)", config.grace_s)
    await server.stop()

"""Server configuration."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vitlens_server.models.default import demo_spec
from vitlens_server.models.spec import ModelSpec

__all__ = ["DEFAULT_MAX_PIXELS", "ServerConfig"]

DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: above any camera, below decompression-bomb sizes


@dataclass(frozen=True)
class ServerConfig:
    """Everything `vitlens serve` can set.

    Attributes:
        host, port: where gRPC listens; port 0 picks a free port.
        models: models to load; the first is the default unless ``default_model`` is set.
        devices: devices each model gets a replica on (the first is the models' own device).
        max_batch_size: images per model pass; concurrent requests are batched up to it, and
            larger requests run in chunks (1 disables batching).
        max_delay_ms: longest a request waits for batch-mates before its pass starts. 0 (the
            default) starts a pass as soon as a replica is free: batches still form from the
            requests that arrive while the device is busy, and a lone request never waits.
        max_queue_images: images allowed to wait per model; beyond it requests get
            RESOURCE_EXHAUSTED with a retry hint.
        max_images_per_request: larger requests are rejected with INVALID_ARGUMENT.
        max_texts_per_request: image-text models: most ``texts`` of an Explain or ``prompts``
            of a Predict (more: INVALID_ARGUMENT).
        max_text_chars: image-text models: longest text or prompt in characters (longer:
            INVALID_ARGUMENT; a text the model's context cannot hold is refused as well, never
            truncated).
        max_pixels: per-image pixel limit against decompression bombs (uploads and the images
            of server-side datasets alike).
        max_inline_samples, max_inline_bytes: how many samples, and how many bytes of image
            and mask data, an Evaluate request may carry inline.
        max_message_bytes: gRPC send/receive message limit.
        decode_threads: threads decoding images off the event loop.
        cache_bytes: size of the per-image result cache (0 disables it).
        tls_cert, tls_key: PEM certificate chain and key: serve TLS instead of plaintext.
        tls_client_ca: PEM CA bundle: require client certificates it signed (mutual TLS).
        auth_tokens: accepted bearer tokens (none: no authentication); health and reflection
            stay open.
        dataset_roots: folders under which Evaluate may read server-side datasets (none: no
            server-side datasets; generated and inline data still work).
        metrics_port: HTTP port of the Prometheus ``/metrics`` endpoint (0: any free port,
            None: not served; the metrics are still kept).
        grace_s: seconds in-flight calls get to finish on shutdown.
        default_deadline_s: deadline of Explain and Predict calls whose caller set none (None:
            no deadline); a request still queued then is dropped with DEADLINE_EXCEEDED.
        tracing: OpenTelemetry traces of every call, its queue waits and model passes
            (`vitlens_server.tracing`; needs the ``tracing`` extra).
        tracing_exporter: where the spans go: ``otlp`` (OTLP/gRPC to the collector of the
            standard ``OTEL_EXPORTER_OTLP_ENDPOINT``) or ``console`` (stdout, for debugging).
    """

    host: str = "127.0.0.1"
    port: int = 50051
    models: tuple[ModelSpec, ...] = field(default_factory=lambda: (demo_spec(),))
    default_model: str | None = None
    devices: tuple[str, ...] = ("cpu",)
    max_batch_size: int = 32
    max_delay_ms: float = 0.0
    max_queue_images: int = 1024
    max_images_per_request: int = 256
    max_texts_per_request: int = 64
    max_text_chars: int = 300
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_inline_samples: int = 256
    max_inline_bytes: int = 64 * 1024 * 1024
    max_message_bytes: int = 256 * 1024 * 1024
    decode_threads: int = 2
    metrics_port: int | None = None
    cache_bytes: int = 256 * 1024 * 1024
    dataset_roots: tuple[Path, ...] = ()
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_tokens: tuple[bytes, ...] = field(default=(), repr=False)
    grace_s: float = 10.0
    default_deadline_s: float | None = None
    tracing: bool = False
    tracing_exporter: str = "otlp"

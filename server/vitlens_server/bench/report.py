"""Tables of benchmark results: plain text for the terminal, Markdown sections for BENCHMARKS.md."""

from __future__ import annotations

import math
import os
import platform
import re
from collections.abc import Mapping, Sequence
from typing import Any

from vitlens_server.bench.load import LoadReport
from vitlens_server.bench.roof import RoofReport

__all__ = [
    "LOAD_HEADER",
    "device_label",
    "environment",
    "load_table",
    "markdown_table",
    "replace_section",
    "roof_images_per_s",
    "roof_kind",
    "roof_table",
    "section",
    "select_columns",
    "text_table",
]


def environment(device: str) -> dict[str, Any]:
    """Machine and versions: what a reader needs to compare two runs."""
    import grpc
    import numpy
    import timm
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "grpcio": grpc.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        env["gpu"] = torch.cuda.get_device_name(index)
        env["cuda"] = torch.version.cuda
    return env


def device_label(device: str, env: Mapping[str, Any]) -> str:
    """``NVIDIA H100 80GB HBM3`` on CUDA, ``CPU (2 cores)`` otherwise."""
    if device.startswith("cuda") and env.get("gpu"):
        return str(env["gpu"])
    return f"CPU ({env.get('cpu_count')} cores)"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def roof_kind(passes: Sequence[str]) -> str:
    """``forward`` for methods that run only a forward pass, else ``forward_backward``."""
    return "forward" if set(passes) <= {"forward"} and passes else "forward_backward"


def roof_images_per_s(roof: RoofReport, kind: str) -> float:
    best = roof.best_forward if kind == "forward" else roof.best_forward_backward
    return best.images_per_s


def _ms(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "-"
    return f"{seconds * 1e3:.1f}"


def _num(x: float | None, digits: int = 1) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def _ratio(x: float, of: float | None) -> str:
    return "-" if not of or math.isnan(of) else f"{x / of:.2f}"


def _errors(errors: Mapping[str, int]) -> str:
    return " ".join(f"{code}:{n}" for code, n in errors.items()) or "0"


LOAD_HEADER = (
    "server",
    "method",
    "C",
    "k",
    "ok",
    "errors",
    "img/s",
    "req/s",
    "÷ roof",
    "÷ no batching",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "queue ms",
    "mean batch",
    "batch sizes",
)


def load_table(
    runs: Sequence[tuple[str, LoadReport]],
    *,
    roof: RoofReport | None = None,
    roof_kinds: Mapping[str, str] | None = None,
) -> list[tuple[str, ...]]:
    """One row per ``(server label, report)``; ratios to the roof of the method's kind, and to
    the run labelled ``no batching`` with the same method and concurrency when there is one."""
    baseline = {
        (r.method, r.concurrency, r.images_per_request): r.images_per_s
        for label, r in runs
        if label == "no batching"
    }
    rows = [LOAD_HEADER]
    for label, r in runs:
        kind = (roof_kinds or {}).get(r.method, "forward_backward")
        top = roof_images_per_s(roof, kind) if roof else None
        base = baseline.get((r.method, r.concurrency, r.images_per_request))
        sizes = r.batch_sizes
        rows.append(
            (
                label,
                r.method,
                str(r.concurrency),
                str(r.images_per_request),
                str(r.requests_ok),
                _errors(r.errors),
                _num(r.images_per_s),
                _num(r.requests_per_s),
                _ratio(r.images_per_s, top),
                "-" if label == "no batching" else _ratio(r.images_per_s, base),
                _ms(r.latency.p50_s),
                _ms(r.latency.p90_s),
                _ms(r.latency.p99_s),
                _ms(r.server_queue_mean_s),
                _num(sizes.mean if sizes else None, 2),
                sizes.compact() if sizes else "unavailable",
            )
        )
    return rows


def select_columns(rows: Sequence[Sequence[str]], names: Sequence[str]) -> list[tuple[str, ...]]:
    """The columns of ``rows`` (header first) called ``names``, in that order."""
    keep = [list(rows[0]).index(n) for n in names]
    return [tuple(r[i] for i in keep) for r in rows]


def roof_table(roof: RoofReport) -> list[tuple[str, ...]]:
    """Images/s per batch size for both roofs."""
    rows = [("B", "fwd+bwd img/s", "fwd img/s")]
    forward = {p.batch_size: p.images_per_s for p in roof.forward}
    for p in roof.forward_backward:
        rows.append((str(p.batch_size), _num(p.images_per_s), _num(forward.get(p.batch_size))))
    return rows


def text_table(rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
    head, *body = rows
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in body]
    return "\n".join(lines)


_SECTION = re.compile(r"<!-- bench: (?P<key>.+?) -->\n.*?<!-- /bench -->\n?", flags=re.DOTALL)


def section(key: str, body: str) -> str:
    """A replaceable block: ``body`` between markers naming ``key``."""
    if "\n" in key or "-->" in key:
        raise ValueError(f"bad section key {key!r}")
    return f"<!-- bench: {key} -->\n{body.rstrip()}\n<!-- /bench -->\n"


def replace_section(document: str, key: str, body: str) -> str:
    """``document`` with the block of ``key`` replaced by ``body``, or the block appended."""
    block = section(key, body)
    for match in _SECTION.finditer(document):
        if match.group("key") == key:
            return document[: match.start()] + block + document[match.end() :]
    return document.rstrip("\n") + "\n\n" + block

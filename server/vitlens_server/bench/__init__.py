"""Serving benchmark: closed-loop load on a running server (`load`), the in-process roof of the
same model (`roof`), and their tables (`report`). Run it as ``vitlens bench``."""

from vitlens_server.bench.load import (
    LatencySummary,
    LoadConfig,
    LoadReport,
    run_load,
    summarize,
    sweep,
)
from vitlens_server.bench.scrape import (
    BatchSizeDistribution,
    HistogramSnapshot,
    batch_size_distribution,
    parse_histogram,
)

__all__ = [
    "BatchSizeDistribution",
    "HistogramSnapshot",
    "LatencySummary",
    "LoadConfig",
    "LoadReport",
    "batch_size_distribution",
    "parse_histogram",
    "run_load",
    "summarize",
    "sweep",
]

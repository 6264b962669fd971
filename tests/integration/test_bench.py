"""The serving benchmark: its arithmetic on known inputs, histogram differencing of Prometheus
text, a small closed-loop run against the session server, and the roof on the tiny model."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.tiny import tiny_loaded
from vitlens_server.bench.cli import main as bench_main
from vitlens_server.bench.images import make_images, stamped
from vitlens_server.bench.load import LatencySummary, LoadConfig, Samples, run_load, summarize
from vitlens_server.bench.report import load_table, replace_section, roof_kind
from vitlens_server.bench.roof import batch_ladder, measure_roof
from vitlens_server.bench.scrape import (
    ScrapeError,
    batch_size_distribution,
    fetch_metrics,
    parse_histogram,
)


def _metrics(counts: dict[str, dict[float, int]], sums: dict[str, float]) -> str:
    """Prometheus text of `vitlens_batch_size` per model, from per-bucket (not cumulative)
    counts, plus an unrelated metric whose name shares the prefix."""
    lines = [
        "# HELP vitlens_batch_size Images per model pass.",
        "# TYPE vitlens_batch_size histogram",
    ]
    for model, per_bucket in counts.items():
        running = 0
        for le, n in per_bucket.items():
            running += n
            bound = "+Inf" if math.isinf(le) else f"{le:.1f}"
            lines.append(f'vitlens_batch_size_bucket{{le="{bound}",model="{model}"}} {running}')
        lines.append(f'vitlens_batch_size_count{{model="{model}"}} {running}')
        lines.append(f'vitlens_batch_size_sum{{model="{model}"}} {sums[model]}')
    lines += [
        "# TYPE vitlens_batch_size_total_images counter",
        'vitlens_batch_size_total_images{model="a"} 999',
    ]
    return "\n".join(lines) + "\n"


def _buckets(n1: int, n2: int, n4: int, n8: int, inf: int) -> dict[float, int]:
    return {1.0: n1, 2.0: n2, 4.0: n4, 8.0: n8, math.inf: inf}


# -- arithmetic -------------------------------------------------------------------------------


def test_percentiles_on_1_to_100_ms() -> None:
    # Linear interpolation between order statistics: rank q/100 · (n − 1) of 1..100 ms.
    s = LatencySummary.of([i / 1000 for i in range(100, 0, -1)])  # order must not matter
    assert s.p50_s == pytest.approx(0.0505)
    assert s.p90_s == pytest.approx(0.0901)
    assert s.p99_s == pytest.approx(0.09901)
    assert s.mean_s == pytest.approx(0.0505)
    assert s.max_s == pytest.approx(0.100)
    one = LatencySummary.of([0.25])
    assert one.p50_s == one.p99_s == 0.25
    assert math.isnan(LatencySummary.of([]).p50_s)


def test_throughput_is_successful_work_over_the_window() -> None:
    samples = Samples(
        latencies_s=[0.1, 0.2, 0.3, 0.4],
        images=8,  # 4 requests of 2 images
        errors=Counter({"INVALID_ARGUMENT": 3, "UNAVAILABLE": 1}),
        queue_s=[0.01, 0.03, 0.0, 0.0],
        compute_s=[0.05] * 4,
        started=100.0,
        finished=102.0,
    )
    config = LoadConfig(target="x", method="m", concurrency=3, images_per_request=2)
    r = summarize(samples, config, "model")
    assert r.window_s == 2.0
    assert r.images_per_s == 4.0 and r.requests_per_s == 2.0
    assert (r.requests_ok, r.requests_failed) == (4, 4)
    assert r.errors == {"INVALID_ARGUMENT": 3, "UNAVAILABLE": 1}
    assert r.server_queue_mean_s == pytest.approx(0.01)
    assert r.latency.p50_s == pytest.approx(0.25)


def test_samples_merge_joins_windows_and_counts() -> None:
    a = Samples([0.1], 1, Counter({"X": 1}), [0.0], [0.1], started=5.0, finished=7.0)
    b = Samples([0.2, 0.3], 4, Counter({"X": 2, "Y": 1}), [0.0] * 2, [0.1] * 2, 4.0, 6.0)
    m = a.merge(b)
    assert (m.started, m.finished, m.images) == (4.0, 7.0, 5)
    assert m.errors == Counter({"X": 3, "Y": 1}) and len(m.latencies_s) == 3


def test_roof_kind_and_ratios() -> None:
    assert roof_kind(["forward"]) == "forward"
    assert roof_kind(["forward", "backward"]) == "forward_backward"
    assert roof_kind(["forward", "lrp"]) == "forward_backward"
    cfg = LoadConfig(target="x", method="generic", concurrency=8)
    fast = summarize(Samples([0.1] * 40, 40, Counter(), [], [], 0.0, 1.0), cfg, "m")
    slow = summarize(Samples([0.1] * 2, 2, Counter(), [], [], 0.0, 1.0), cfg, "m")
    header, on, off = load_table([("batching", fast), ("no batching", slow)])
    assert on[header.index("÷ no batching")] == "20.00"
    assert off[header.index("÷ no batching")] == "-"
    assert on[header.index("batch sizes")] == "unavailable"


def test_batch_ladder() -> None:
    assert batch_ladder(1) == [1]
    assert batch_ladder(8) == [1, 2, 4, 8]
    assert batch_ladder(12) == [1, 2, 4, 8, 12]
    with pytest.raises(ValueError):
        batch_ladder(0)


def test_stamped_images_differ_in_bytes_only_where_tagged() -> None:
    from PIL import Image as PILImage

    from vitlens.v1 import tensor_pb2

    raw, png = (
        tensor_pb2.Image.FromString(make_images("random", (3, 16, 16), 1, wire=w)[0])
        for w in ("pixels", "png")
    )
    tags = [bytes([i]) * 16 for i in (1, 2)]
    a, b = (stamped(raw, t).pixels.data for t in tags)
    assert a != b and a[16:] == b[16:] == raw.pixels.data[16:] and a[:16] == tags[0]
    c, d = (stamped(png, t).encoded for t in tags)
    assert c != d
    decoded = [np.asarray(PILImage.open(io.BytesIO(x))) for x in (png.encoded, c, d)]
    assert all(np.array_equal(decoded[0], x) for x in decoded[1:])  # same pixels, other bytes


# -- Prometheus histograms --------------------------------------------------------------------


def test_histogram_difference_is_the_window() -> None:
    before = _metrics(
        {"a": _buckets(5, 0, 1, 0, 0), "b": _buckets(1, 1, 1, 1, 1)}, {"a": 8, "b": 50}
    )
    after = _metrics(
        {"a": _buckets(7, 3, 11, 4, 0), "b": _buckets(9, 9, 9, 9, 9)}, {"a": 96, "b": 0}
    )
    h0 = parse_histogram(before, "vitlens_batch_size", {"model": "a"})
    h1 = parse_histogram(after, "vitlens_batch_size", {"model": "a"})
    assert h1.buckets[-1] == (math.inf, 25.0) and h1.count == 25.0
    window = h1 - h0
    # Per-bucket window counts: sizes 1: 2, 2: 3, 3-4: 10, 5-8: 4, >8: 0; sum 96 − 8 = 88.
    dist = batch_size_distribution(window)
    assert dist.passes == (("1", 2), ("2", 3), ("3-4", 10), ("5-8", 4))
    assert dist.total_passes == 19
    assert dist.mean == pytest.approx(88 / 19)
    assert dist.compact() == "1:2 2:3 3-4:10 5-8:4"


def test_histogram_overflow_bucket_and_label_selection() -> None:
    text = _metrics({"a": _buckets(0, 0, 0, 2, 3), "b": _buckets(1, 0, 0, 0, 0)}, {"a": 60, "b": 1})
    dist = batch_size_distribution(parse_histogram(text, "vitlens_batch_size", {"model": "a"}))
    assert dist.passes[-1] == (">8", 3) and dist.total_passes == 5 and dist.mean == 12.0
    both = parse_histogram(text, "vitlens_batch_size")  # no selection: summed over models
    assert both.count == 6 and both.sum == 61
    with pytest.raises(ScrapeError):
        parse_histogram(text, "vitlens_batch_size", {"model": "zzz"})
    with pytest.raises(ScrapeError):  # a restart between scrapes is detected, not negative
        _ = (
            parse_histogram(
                _metrics({"a": _buckets(1, 0, 0, 0, 0)}, {"a": 1}), "vitlens_batch_size"
            )
            - both
        )


@contextlib.contextmanager
def serving_text(text: Callable[[], str]) -> Iterator[str]:
    """A loopback HTTP endpoint answering ``text()`` to every GET; yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = text().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/metrics"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def test_fetch_metrics_reports_unreachable_endpoint() -> None:
    with serving_text(lambda: _metrics({"m": _buckets(1, 0, 0, 0, 0)}, {"m": 1})) as url:
        assert parse_histogram(fetch_metrics(url), "vitlens_batch_size").count == 1
    with pytest.raises(ScrapeError):
        fetch_metrics(url, timeout_s=2.0)  # closed now


def _cache_hits(text: str, model: str) -> float:
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "vitlens_cache_hits_total" and s.labels.get("model") == model
    )


# -- against the session server ---------------------------------------------------------------


async def test_closed_loop_counts_requests_images_and_batches(server) -> None:
    metrics = server.server.telemetry  # served over HTTP here as `--metrics-port` would
    config = LoadConfig(
        target=server.address,
        model="tiny",
        method="generic",
        concurrency=3,
        requests=7,
        images_per_request=2,
        images="scenes",
        warmup_requests=2,
    )
    with serving_text(metrics.text) as url:
        hits = _cache_hits(metrics.text(), "tiny")
        r = await run_load(dataclasses.replace(config, metrics_url=url))
        assert _cache_hits(metrics.text(), "tiny") == hits  # every image was unique
    assert (r.requests_ok, r.requests_failed, r.errors) == (7, 0, {})
    assert r.images_ok == 14 and r.model == "tiny"
    assert r.window_s > 0 and r.images_per_s == pytest.approx(14 / r.window_s)
    assert 0 < r.latency.p50_s <= r.latency.p90_s <= r.latency.p99_s <= r.latency.max_s
    assert r.latency.max_s <= r.window_s
    assert r.server_compute_mean_s > 0
    # The window's passes computed exactly its images, at most max_batch_size (4) at a time.
    sizes = r.batch_sizes
    assert sizes is not None and r.metrics_note == ""
    assert round(sizes.mean * sizes.total_passes) == 14
    assert sum(n for _, n in sizes.passes) == sizes.total_passes
    assert all(n == 0 for label, n in sizes.passes if label not in ("1", "2", "3-4"))
    assert r.queue_wait_mean_s is not None and r.queue_wait_mean_s >= 0


async def test_repeated_images_would_hit_the_result_cache(server) -> None:
    # The control for the uniqueness check above: the same pool sent twice does hit.
    metrics = server.server.telemetry
    config = LoadConfig(
        target=server.address,
        model="tiny",
        concurrency=2,
        requests=20,  # > the 16 pool images
        images="random",
        warmup_requests=0,
        unique_images=False,
    )
    hits = _cache_hits(metrics.text(), "tiny")
    r = await run_load(config)
    assert r.requests_ok == 20
    assert _cache_hits(metrics.text(), "tiny") - hits >= 4


async def test_client_processes_share_one_request_budget(server) -> None:
    config = LoadConfig(
        target=server.address,
        model="tiny",
        concurrency=3,
        requests=9,
        images="random",
        warmup_requests=2,
        processes=2,
    )
    r = await run_load(config)
    assert r.processes == 2 and (r.requests_ok, r.images_ok, r.errors) == (9, 9, {})
    assert r.window_s > 0 and r.latency.max_s <= r.window_s


def test_bench_command_sweeps_methods_and_concurrencies(server, tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    argv = ["--server", server.address, "--model", "tiny", "--method", "generic,rollout"]
    argv += ["--concurrency", "1,2", "--requests", "3", "--images", "random", "--json", str(out)]
    assert bench_main(argv) == 0
    load = json.loads(out.read_text())["load"]
    points = [(r["method"], r["concurrency"]) for r in load]
    assert points == [("generic", 1), ("generic", 2), ("rollout", 1), ("rollout", 2)]
    assert all(r["requests_ok"] == 3 and r["requests_failed"] == 0 for r in load)
    table = capsys.readouterr().out
    assert table.count("generic") == 2 and table.count("rollout") == 2


def test_load_without_metrics_says_why() -> None:
    r = summarize(Samples(), LoadConfig(target="x"), "m", metrics_note="no metrics URL given")
    assert r.batch_sizes is None and r.images_per_s == 0.0 and r.window_s == 0.0


async def test_errors_are_counted_by_status_code(server) -> None:
    config = LoadConfig(
        target=server.address,
        model="tiny",
        method="no_such_method",
        concurrency=2,
        requests=5,
        images="random",
        wire="png",
        warmup_requests=0,
        metrics_url="http://127.0.0.1:9/metrics",  # nothing listens on the discard port
    )
    r = await run_load(config)
    assert r.requests_ok == 0 and r.images_ok == 0 and r.images_per_s == 0.0
    assert r.errors == {"INVALID_ARGUMENT": 5} and r.requests_failed == 5
    assert math.isnan(r.latency.p50_s)
    assert r.batch_sizes is None and "cannot read metrics" in r.metrics_note


def test_markdown_section_is_replaced_by_key() -> None:
    doc = "# Benchmarks\n\nintro\n"
    doc = replace_section(doc, "cpu|demo|generic", "## generic\nold")
    doc = replace_section(doc, "cpu|demo|rollout", "## rollout\nR")
    doc = replace_section(doc, "cpu|demo|generic", "## generic\nnew")
    assert doc.count("<!-- bench: cpu|demo|generic -->") == 1
    assert "new" in doc and "old" not in doc and "## rollout\nR" in doc
    assert doc.index("generic") < doc.index("rollout")  # replaced in place, not appended


# -- roof -------------------------------------------------------------------------------------


def test_roof_on_the_tiny_model_is_positive() -> None:
    model = tiny_loaded(seed=3)
    roof = measure_roof(
        model, max_batch_size=4, methods=("generic", "rollout"), repeats=2, warmup=1
    )
    assert [p.batch_size for p in roof.forward_backward] == [1, 2, 4]
    assert [p.batch_size for p in roof.forward] == [1, 2, 4]
    for p in (*roof.forward_backward, *roof.forward):
        assert p.seconds > 0 and p.images_per_s == pytest.approx(p.batch_size / p.seconds)
    assert roof.best_forward_backward.images_per_s > 0 and roof.fused_attention
    assert set(roof.explain_latency_s) == {"generic", "rollout"}
    assert all(s > 0 for s in roof.explain_latency_s.values())
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.module.modules())
    assert hooks == 0  # the Explainer's hooks are gone

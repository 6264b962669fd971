"""The batching server over real gRPC: batches form under concurrency (seen in the metrics),
a full queue answers RESOURCE_EXHAUSTED with a retry hint, expired requests never run, and the
metrics endpoint serves Prometheus text."""

from __future__ import annotations

import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import vitlens
from tests.conftest import start_server
from tests.polling import wait_for
from tests.tiny import tiny_loaded
from vitlens_server.config import ServerConfig
from vitlens_server.models import ModelRegistry

DELAY_MS = 1000  # long: a batch flushes when full, well before the delay


@pytest.fixture(scope="module")
def batching_server():
    config = ServerConfig(
        port=0, max_batch_size=4, max_delay_ms=DELAY_MS, max_queue_images=8, metrics_port=0
    )
    running, stop = start_server(config, ModelRegistry([tiny_loaded(seed=5)]))
    yield running
    stop()


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def _sample(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"{name}(?:\{{(.*)\}})? (\S+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total


def test_concurrent_requests_share_passes(batching_server) -> None:
    metrics = batching_server.server.telemetry
    before = _sample(metrics.text(), "vitlens_batch_size_count", kind="explain-backward")
    small = _sample(metrics.text(), "vitlens_batch_size_bucket", kind="explain-backward", le="2.0")
    client = vitlens.Client(batching_server.address, timeout_s=30)
    with client, ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client.explain, _image(i), method="generic") for i in range(8)]
        results = [f.result() for f in futures]
    assert all(r[0].explanations[0].heatmap.shape == (4, 4) for r in results)
    text = metrics.text()
    passes = _sample(text, "vitlens_batch_size_count", kind="explain-backward") - before
    assert passes == 2, text  # 8 single-image requests, batches of 4: two passes
    assert _sample(text, "vitlens_batch_size_bucket", kind="explain-backward", le="2.0") == small
    # requests are counted as their handlers end, which may be just after the callers' answers
    wait_for(
        lambda: (
            _sample(metrics.text(), "vitlens_requests_total", rpc="Explain", method="generic",
                    code="OK") >= 8
        )
    )  # fmt: skip


def test_a_full_queue_answers_resource_exhausted_with_pushback(batching_server) -> None:
    plane = batching_server.server.plane
    client = vitlens.Client(batching_server.address, timeout_s=30)
    with client, ThreadPoolExecutor(1) as pool:
        # 3 images wait up to DELAY_MS for batch-mates; 6 more would exceed the 8-image bound.
        waiting = pool.submit(client.predict, [_image(i) for i in range(3)])
        wait_for(lambda: plane.queued_images("tiny") == 3 or waiting.done())
        with pytest.raises(vitlens.ResourceExhaustedError, match="queue is full") as info:
            client.predict([_image(10 + i) for i in range(6)])
        assert "retry after" in str(info.value) and info.value.retry_after_s > 0
        assert len(waiting.result()) == 3  # the queued request is unharmed


def test_metrics_endpoint_serves_prometheus_text(batching_server) -> None:
    port = batching_server.server.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    for name in (
        "vitlens_requests_total",
        "vitlens_request_seconds_bucket",
        "vitlens_queue_wait_seconds_bucket",
        "vitlens_batch_size_bucket",
        "vitlens_queue_depth_images",
        "vitlens_in_flight_requests",
    ):
        assert name in text, name
    assert 'le="120.0"' in text  # explain latency buckets reach two minutes


def test_repeated_images_are_answered_from_the_cache(server, client) -> None:
    metrics = server.server.telemetry
    hits = _sample(metrics.text(), "vitlens_cache_hits_total", model="tiny")
    first = client.explain(
        [_image(100), _image(101)], model="tiny", method="rollout", ids=["a", "b"]
    )
    again = client.explain(
        [_image(101), _image(102)], model="tiny", method="rollout", ids=["c", "d"]
    )
    other = client.explain(
        _image(101), model="tiny", method="rollout", grid="input"
    )  # other options
    assert [r.id for r in again] == ["c", "d"]
    np.testing.assert_array_equal(
        again[0].explanations[0].heatmap, first[1].explanations[0].heatmap
    )
    assert other[0].explanations[0].heatmap.shape == (32, 32)
    assert _sample(metrics.text(), "vitlens_cache_hits_total", model="tiny") - hits == 1


def test_a_cached_top_k_answer_is_not_reused_for_another_class(client) -> None:
    top = client.explain(_image(200), model="tiny", method="generic", top_k=2)
    second = top[0].explanations[1].target.index
    chosen = client.explain(_image(200), model="tiny", method="generic", target=second)
    assert chosen[0].explanations[0].target.index == second
    np.testing.assert_allclose(
        chosen[0].explanations[0].heatmap, top[0].explanations[1].heatmap, rtol=1e-5
    )

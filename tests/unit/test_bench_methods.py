"""The methods ÷ roof benchmark: its roof arithmetic on known primitives, a small run on the
tiny model, the extra-pass counts methods declare, and the peers kept out of the server."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from tests.tiny import tiny_loaded
from vitlens_server.bench.methods import Primitives, measure_methods, roof_seconds
from vitlens_server.explain import get_method
from vitlens_server.explain.params import parse_params
from vitlens_server.explain.registry import METHODS, ExtraCount, Pass, register_method

PRIMS = Primitives(forward=0.01, forward_backward=0.03)


def _roof(name: str, tokens: int = 196, **options) -> float:
    spec = get_method(name)
    return roof_seconds(spec, parse_params(spec.params, options, method=name), tokens, PRIMS)


@pytest.mark.parametrize(
    ("name", "options", "seconds"),
    [
        ("rollout", {}, 0.01),  # the recording forward
        ("generic", {}, 0.03),  # forward + backward
        ("partial_lrp", {}, 0.01 + 0.02),  # forward + one backward-shaped LRP sweep
        ("transformer_attribution", {}, 0.03 + 0.02),
        ("saliency", {}, 0.01 + 0.03),  # the recording, then one input gradient
        ("saliency", {"mode": "integrated_gradients", "steps": 32}, 0.01 + 32 * 0.03),
        ("saliency", {"mode": "smoothgrad", "samples": 25}, 0.01 + 25 * 0.03),
        ("token_reflection", {}, 0.03 + 0.02 + 196 * 0.01),  # TA, then a forward per token
    ],
)
def test_roofs_add_the_passes_each_method_declares(name: str, options: dict, seconds: float):
    assert _roof(name, **options) == pytest.approx(seconds)


def test_every_method_with_extra_passes_declares_how_many() -> None:
    for spec in METHODS.specs():
        params = parse_params(spec.params, {}, method=spec.name)
        count = spec.extra_count(params, 16)
        assert (Pass.EXTRA in spec.passes) == (count != ExtraCount()), spec.name
    with pytest.raises(ValueError, match="go together"):
        register_method("no_count", passes=Pass.EXTRA, description="", class_specific=False)


def test_a_small_run_measures_every_figure_it_reports() -> None:
    model = tiny_loaded(seed=1)
    lines: list[str] = []
    report = measure_methods(
        model, ["rollout", "generic"], batch_sizes=(1, 2), rounds=1, repeats=1, log=lines.append
    )
    assert set(report.forward) == set(report.forward_backward) == set(report.predict) == {1, 2}
    assert set(report.methods) == {"rollout", "generic"}
    for name in report.methods:
        assert set(report.methods[name]) == {1, 2}
        assert math.isfinite(report.ratio(name)) and report.ratio(name) > 0
        assert report.best_batch(name) in (1, 2)
    assert report.passes == {"rollout": "forward", "generic": "forward + backward"}
    # the roof is the declared passes at the primitives' best rates
    assert report.roofs["generic"] == pytest.approx(max(report.forward_backward.values()))
    assert report.roofs["rollout"] == pytest.approx(max(report.forward.values()))
    assert any("round 1/1" in line for line in lines)


def test_the_server_never_imports_the_peer_libraries() -> None:
    """captum, pytorch-grad-cam and lxt are benchmark-only (scripts/bench_peers.py)."""
    code = (
        "import sys, vitlens_server.app, vitlens_server.explain, vitlens_server.evaluate, "
        "vitlens_server.bench.methods; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('captum', 'pytorch_grad_cam', 'lxt', 'zennit')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_method_mode_is_a_row_of_its_own() -> None:
    from vitlens_server.bench.methods import _passes, method_job

    job = method_job(tiny_loaded(), "saliency:integrated_gradients", 2)
    assert job.params.mode == "integrated_gradients" and job.pixels.shape[0] == 2
    assert _passes(job.method, job.params, 16) == "forward + extra (32 gradients)"
    plain = method_job(tiny_loaded(), "saliency", 1)
    assert _passes(plain.method, plain.params, 16) == "forward + extra (1 gradient)"

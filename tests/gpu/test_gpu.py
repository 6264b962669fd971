"""GPU checks: run with `pytest -m gpu` on a CUDA machine; skipped elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.tiny import tiny_loaded
from tests.unit.image_text_tiny import VIT_CFG, build_open_clip_module, write_open_clip_dir
from vitlens_server.explain import METHODS, Explainer, ExplainJob, TargetSpec, get_method
from vitlens_server.explain.image_text import IMAGE_TEXT_METHODS
from vitlens_server.explain.image_text_batch import ImageTextExplainJob, TextCache, explain_jobs
from vitlens_server.explain.params import parse_params
from vitlens_server.models.image_text import load_image_text_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("name", [s.name for s in METHODS.specs() if not s.needs_mask])
def test_cuda_maps_equal_cpu_maps(name: str) -> None:
    spec = get_method(name)
    params = parse_params(spec.params, {}, method=name)
    x = torch.rand(8, 3, 32, 32)
    target = TargetSpec("top_k", k=2)
    job = ExplainJob(x, spec, params, target, relevance=spec.relevance_matrix)
    cpu = Explainer(tiny_loaded(seed=5)).explain(job)
    torch.backends.cuda.matmul.allow_tf32 = False
    gpu = Explainer(tiny_loaded(seed=5, device="cuda")).explain(job)
    np.testing.assert_array_equal(cpu.targets, gpu.targets)
    np.testing.assert_allclose(gpu.heatmaps, cpu.heatmaps, rtol=1e-3, atol=1e-5)
    if spec.relevance_matrix:
        np.testing.assert_allclose(gpu.relevance, cpu.relevance, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("name", IMAGE_TEXT_METHODS)
def test_cuda_image_text_maps_equal_cpu_maps(name: str, tmp_path) -> None:
    """Every image-text method on a tiny open_clip model: 4 images x 2 texts, CUDA vs CPU."""
    folder = write_open_clip_dir(tmp_path / "clip", VIT_CFG, build_open_clip_module(VIT_CFG))
    job = ImageTextExplainJob(torch.rand(4, 3, 32, 32), ("a red star", "two discs"), name)
    torch.backends.cuda.matmul.allow_tf32 = False
    results = []
    for device in ("cpu", "cuda"):
        model = load_image_text_model(f"open_clip:{folder}", device=device)
        results.append(explain_jobs(TextCache(model), [job])[0])
    cpu, gpu = results
    np.testing.assert_allclose(gpu.heatmaps, cpu.heatmaps, rtol=1e-3, atol=1e-5)
    for cpu_row, gpu_row in zip(cpu.texts, gpu.texts, strict=True):
        for a, b in zip(cpu_row, gpu_row, strict=True):
            assert a.tokens == b.tokens
            np.testing.assert_allclose(b.relevance, a.relevance, rtol=1e-3, atol=1e-5)

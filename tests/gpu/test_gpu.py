"""GPU checks: run with `pytest -m gpu` on a CUDA machine; skipped elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.tiny import tiny_loaded
from vitlens_server.explain import METHODS, Explainer, ExplainJob, TargetSpec, get_method
from vitlens_server.explain.params import parse_params

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

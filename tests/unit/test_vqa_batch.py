"""VQA jobs fused into one explanation: results per job, independent of their batch-mates."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.unit import bimodal_tiny as tiny
from vitlens_server.domain import TargetSpec
from vitlens_server.explain.vqa_batch import (
    VqaExplainJob,
    VqaPredictJob,
    explain_vqa_jobs,
    predict_vqa_jobs,
)
from vitlens_server.models.spec import ModelSpec
from vitlens_server.models.vqa_serving import LoadedVqaModel, load_vqa

QUESTIONS = ("what color is the cat?", "how many dogs?", "is the dog red?")


def _load(path: Path) -> LoadedVqaModel:
    return load_vqa(ModelSpec(name=path.name, architecture="hf-vqa", source=f"hf-vqa:{path}"))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LoadedVqaModel]]:
    root = Path(tmp_path_factory.mktemp("vqa-batch"))
    vilt = tiny.write_dir(root / "vilt", "vilt")
    (vilt / "vitlens.json").write_text(json.dumps({"image_size": 64}))
    lxmert = tiny.write_dir(root / "lxmert", "lxmert", visual_feat_dim=192)
    frontend = {"kind": "vit_patch_tokens", "model": "vitlens-clip", "blocks": 5}
    (lxmert / "vitlens.json").write_text(json.dumps({"frontend": frontend}))
    visual_bert = tiny.write_dir(root / "visual_bert", "visual_bert")
    loaded = {"vilt": _load(vilt), "lxmert": _load(lxmert), "visual_bert": _load(visual_bert)}
    yield loaded
    for model in loaded.values():
        model.adapter.close()


def _pixels(model: LoadedVqaModel, count: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(count, 3, model.image_size, model.image_size, generator=gen)


def _regions(counts: list[int], seed: int = 0) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in counts:
        low = torch.rand(n, 2, generator=gen) * 0.5
        out.append((torch.randn(n, tiny.FEATURES, generator=gen), torch.cat([low, low + 0.4], 1)))
    return tuple(out)


def _same(a, b) -> None:
    np.testing.assert_allclose(a.heatmaps, b.heatmaps, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(a.targets, b.targets)
    for row_a, row_b in zip(a.texts, b.texts, strict=True):
        for x, y in zip(row_a, row_b, strict=True):
            assert x.tokens == y.tokens
            np.testing.assert_allclose(x.relevance, y.relevance, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["vilt", "lxmert"])
def test_fused_jobs_get_what_each_would_get_alone(kind, models) -> None:
    model = models[kind]
    short = VqaExplainJob(_pixels(model, 1, 1), QUESTIONS[1:2], "generic", relevance=True)
    long = VqaExplainJob(
        _pixels(model, 2, 2),
        (QUESTIONS[0], QUESTIONS[2]),
        "generic",
        target=TargetSpec("index", (2,)),
        relevance=True,
    )
    fused = explain_vqa_jobs(model, [short, long])
    alone = [explain_vqa_jobs(model, [job])[0] for job in (short, long)]
    for together, single in zip(fused, alone, strict=True):
        _same(together, single)
        for ranks_a, ranks_b in zip(together.matrices, single.matrices, strict=True):
            for mats_a, mats_b in zip(ranks_a, ranks_b, strict=True):
                for m, n in zip(mats_a, mats_b, strict=True):
                    assert (m.queries, m.keys) == (n.queries, n.keys)
                    np.testing.assert_allclose(m.matrix, n.matrix, rtol=1e-4, atol=1e-6)
    assert fused[1].targets.tolist() == [[2], [2]]
    grid = model.patch_grid
    assert fused[0].heatmaps.shape == (1, 1, *grid)
    assert fused[0].texts[0][0].tokens == ("how", "many", "dog", "##s", "?")


def test_heatmaps_at_input_resolution_and_top_k(models) -> None:
    model = models["vilt"]
    job = VqaExplainJob(
        _pixels(model, 2), QUESTIONS[:2], "rollout", grid="input", target=TargetSpec("top_k", k=3)
    )
    (result,) = explain_vqa_jobs(model, [job])
    assert result.heatmaps.shape == (2, 3, 64, 64)
    assert len(result.texts[0]) == 3 and result.regions is None
    assert result.predictions.indices.shape == (2, 5)


def test_request_regions_get_one_relevance_per_region(models) -> None:
    model = models["visual_bert"]
    job = VqaExplainJob(
        _pixels(model, 2), QUESTIONS[:2], "generic", regions=_regions([3, 5]), relevance=True
    )
    (result,) = explain_vqa_jobs(model, [job])
    assert result.heatmaps.shape == (2, 1, 0, 0)
    assert [r.shape for r in result.regions] == [(1, 3), (1, 5)]
    (alone,) = explain_vqa_jobs(
        model, [VqaExplainJob(_pixels(model, 1), QUESTIONS[:1], "generic", regions=_regions([3]))]
    )
    np.testing.assert_allclose(alone.regions[0], result.regions[0], rtol=1e-4, atol=1e-6)
    joint = result.matrices[0][0][0]
    assert joint.queries == joint.keys == "joint"
    assert joint.matrix.shape == (8 + 3, 8 + 3)  # the first item's own tokens: 8 text, 3 regions


def test_predict_jobs_answer_in_one_pass(models) -> None:
    model = models["lxmert"]
    pixels = _pixels(model, 3)
    jobs = [
        VqaPredictJob(pixels[:1], QUESTIONS[:1], 2),
        VqaPredictJob(pixels[1:], QUESTIONS[1:], 5),
    ]
    first, second = predict_vqa_jobs(model, jobs)
    assert first.indices.shape == (1, 2) and second.indices.shape == (2, 5)
    (alone,) = predict_vqa_jobs(model, [VqaPredictJob(pixels[:1], QUESTIONS[:1], 2)])
    np.testing.assert_allclose(alone.probabilities, first.probabilities, rtol=1e-5)

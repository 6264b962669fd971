"""Image-text methods without a server: batched == per pair, and scheduling by cost class."""

from __future__ import annotations

import asyncio
import itertools
import threading

import pytest
import torch

from tests.unit.image_text_tiny import (
    TIMM_CFG,
    VIT_CFG,
    build_open_clip_module,
    write_hf_dir,
    write_open_clip_dir,
)
from vitlens_server.explain.image_text import IMAGE_TEXT_METHODS, explain_pairs
from vitlens_server.explain.image_text_batch import ImageTextExplainJob
from vitlens_server.explain.methods.reflection import ReflectionParams
from vitlens_server.explain.methods.saliency import SaliencyParams
from vitlens_server.explain.params import NoParams
from vitlens_server.models import ModelSpec, load_model
from vitlens_server.models.image_text import load_image_text_model
from vitlens_server.runtime import image_text_worker
from vitlens_server.runtime.image_text_worker import ImageTextWorker
from vitlens_server.runtime.worker import Lane

PARAMS = {
    "saliency": SaliencyParams(mode="integrated_gradients", steps=2),
    "token_reflection": ReflectionParams(batch_size=7),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("methods")
    vit = write_open_clip_dir(root / "vit", VIT_CFG, build_open_clip_module(VIT_CFG, seed=1))
    timm = write_open_clip_dir(root / "timm", TIMM_CFG, build_open_clip_module(TIMM_CFG, seed=2))
    return {
        "open_clip": f"open_clip:{vit}",
        "timm": f"open_clip:{timm}",
        "hf": f"hf-clip:{write_hf_dir(root / 'hf', seed=3)}",
    }


@pytest.fixture(scope="module")
def models(sources) -> dict[str, object]:
    return {name: load_image_text_model(source) for name, source in sources.items()}


def _explain(model, pixels, texts, pairs, method):
    _, maps = explain_pairs(
        model,
        model.preprocess.normalise(pixels),
        model.tokenize(texts),
        lambda _: pairs,
        method=method,
        params=PARAMS.get(method),
        images=pixels,
    )
    return maps


@pytest.mark.parametrize("kind", ["open_clip", "timm", "hf"])
@pytest.mark.parametrize("method", IMAGE_TEXT_METHODS)
def test_the_grid_in_one_call_equals_one_pair_at_a_time(models, kind, method) -> None:
    model = models[kind]
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    texts = ["a red square", "two blue circles on grey"]
    grid = list(itertools.product(range(3), range(2)))
    batched = _explain(model, pixels, texts, grid, method)
    for (b, m), found in zip(grid, batched, strict=True):
        (alone,) = _explain(model, pixels[b : b + 1], [texts[m]], [(0, 0)], method)
        if method in ("transformer_attribution", "token_reflection"):
            # LRP computes in float32 and its divisions amplify the rounding of batched
            # matmuls into small elements, by amounts that differ between CPUs (4e-3 of one
            # text-token element on one): compared at the scale of each result instead,
            # within 1e-3 of its largest value (measured: at most 8e-5 of it)
            for got, want in ((found.heatmap, alone.heatmap), (found.text, alone.text)):
                atol = 1e-3 * want.abs().max().item()
                torch.testing.assert_close(got, want, rtol=0.0, atol=atol)
        else:
            torch.testing.assert_close(found.heatmap, alone.heatmap, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(found.text, alone.text, rtol=1e-4, atol=1e-6)
        assert torch.isfinite(found.heatmap).all() and torch.isfinite(found.text).all()


def test_saliency_and_reflection_need_the_unnormalised_images(models) -> None:
    model = models["open_clip"]
    pixels = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match="images"):
        explain_pairs(
            model, pixels, model.tokenize(["a"]), lambda _: [(0, 0)], method="token_reflection"
        )


def test_token_reflection_never_waits_behind_in_the_device_lane(sources, monkeypatch) -> None:
    """A token-reflection batch held in the extra lane leaves generic requests running."""
    served = load_model(ModelSpec(name="clip", architecture="open_clip", source=sources["hf"]))
    gate, entered = threading.Event(), threading.Event()
    original = image_text_worker.explain_jobs

    def held(cache, jobs, *, interrupted=None):
        if jobs[0].method == "token_reflection":
            entered.set()
            gate.wait(30)
        return original(cache, jobs, interrupted=interrupted)

    monkeypatch.setattr(image_text_worker, "explain_jobs", held)
    pixels = torch.rand(1, 3, 32, 32)

    def job(method: str, params: object) -> ImageTextExplainJob:
        return ImageTextExplainJob(pixels=pixels, texts=("a cat",), method=method, params=params)

    async def run() -> None:
        worker = ImageTextWorker(served, max_batch_size=4)
        worker.start()
        try:
            slow = asyncio.ensure_future(
                worker.explain(job("token_reflection", ReflectionParams()))
            )
            while not entered.is_set():
                await asyncio.sleep(0.01)
            fast, _ = await asyncio.wait_for(worker.explain(job("generic", NoParams())), 30)
            assert fast.heatmaps.shape == (1, 1, 4, 4) and not slow.done()
            gate.set()
            done, _ = await slow
            assert done.heatmaps.shape == (1, 1, 4, 4)
        finally:
            gate.set()
            await worker.stop()
            worker.close()

    asyncio.run(run())
    assert set(Lane) == {Lane.DEVICE, Lane.EXTRA, Lane.HOST}


def test_a_worker_of_several_lanes_keeps_the_queue_bound(sources) -> None:
    served = load_model(ModelSpec(name="c", architecture="open_clip", source=sources["open_clip"]))
    worker = ImageTextWorker(served, max_queue_images=2)

    async def run() -> None:
        worker.start()
        try:
            job = ImageTextExplainJob(torch.rand(3, 3, 32, 32), ("a",), "saliency")
            with pytest.raises(Exception, match="at most 2"):
                await worker.explain(job)
        finally:
            await worker.stop()
            worker.close()

    asyncio.run(run())


@pytest.mark.parametrize("kind", ["open_clip", "timm", "hf"])
def test_lrp_activations_satisfy_the_block_equations(models, kind) -> None:
    """What the LRP taps record is each block's own computation: x_{l+1} = x_l + attn + mlp,
    and O = A·V at the output projection; the propagation then gives finite R^A per layer."""
    from vitlens_server.explain.image_text_lrp import PairLrp, attention_relevances
    from vitlens_server.models.image_text import capture

    model = models[kind]
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    texts = model.tokenize(["a red square", "a circle"])
    cap = capture(model, model.preprocess.normalise(pixels), texts, lrp=True)
    for tower in cap.recording.towers():
        blocks = tower.blocks
        assert blocks is not None and tower.head_in is not None
        for this, following in itertools.pairwise(blocks):
            torch.testing.assert_close(following.x, this.x + this.attn_branch + this.mlp_branch)
        for layer, block in enumerate(blocks):
            if block.proj_in is not None:  # O = A·V, the input of the output projection
                rec = tower.layers[layer]
                o = (tower.attention(layer) @ rec.v).transpose(1, 2).flatten(2)
                torch.testing.assert_close(block.proj_in, o, rtol=1e-4, atol=1e-5)
    images = cap.recording.images
    pair = PairLrp(model, cap.image_embeds.detach(), cap.text_embeds.detach())
    relevances = attention_relevances(images, pair)
    assert len(relevances) == images.num_layers
    assert all(r.shape == (2, images.graph.num_heads, 17, 17) for r in relevances)
    assert all(torch.isfinite(r).all() for r in relevances)


def test_an_average_pooled_image_tower_refuses_the_lrp_methods(tmp_path) -> None:
    import copy

    cfg = copy.deepcopy(VIT_CFG)
    cfg["vision_cfg"]["pool_type"] = "avg"
    path = write_open_clip_dir(tmp_path / "avg", cfg, build_open_clip_module(cfg, seed=8))
    model = load_image_text_model(f"open_clip:{path}")
    assert "image tower" in model.lrp_problem
    pixels = torch.rand(1, 3, 32, 32)
    for method in ("transformer_attribution", "token_reflection"):
        with pytest.raises(ValueError, match="no LRP rules"):
            explain_pairs(
                model,
                pixels,
                model.tokenize(["a"]),
                lambda _: [(0, 0)],
                method=method,
                images=pixels,
            )
    maps = _explain(model, pixels, ["a"], [(0, 0)], "gradcam")  # the others still apply
    assert maps[0].heatmap.shape == (4, 4)

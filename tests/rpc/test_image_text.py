"""Image-text (CLIP) models served through the one data plane, over real gRPC on loopback.

A tiny random open_clip model in the hub-dir format (labels and template under the config's
"vitlens" key) and a tiny Hugging Face CLIPModel (labels in a vitlens.json sidecar) are served
next to the tiny classifier. Explanations are compared with a reference computed in the test
from the model itself: one pair at a time, A and ∂y/∂A recorded by the adapter's `capture`,
Eq. 5-6 in plain torch — independent of the engine and of the server's batching.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

import vitlens
from tests.conftest import RunningServer, start_server
from tests.tiny import tiny_loaded
from tests.unit.image_text_tiny import (
    VIT_CFG,
    build_open_clip_module,
    write_hf_dir,
    write_open_clip_dir,
)
from vitlens.v1 import vitlens_pb2
from vitlens_server.config import ServerConfig
from vitlens_server.models import ModelRegistry, ModelSpec, load_model
from vitlens_server.models.image_text import capture, load_image_text_model

LABELS = ["red square", "blue circle", "green line"]
TEMPLATE = "a picture of a {}."
TEXTS = ["a red square on black", "two blue circles"]
MAX_TEXTS, MAX_CHARS = 4, 80


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("image_text")
    clip = write_open_clip_dir(root / "clip", VIT_CFG, build_open_clip_module(VIT_CFG, seed=3))
    config = json.loads((clip / "open_clip_config.json").read_text())
    config["vitlens"] = {"labels": LABELS, "prompt_template": TEMPLATE}
    (clip / "open_clip_config.json").write_text(json.dumps(config))
    hf = write_hf_dir(root / "hf", seed=4)
    (hf / "vitlens.json").write_text(json.dumps({"labels": LABELS[:2]}))
    return {"clip": clip, "hf": hf}


@pytest.fixture(scope="module")
def served(dirs) -> RunningServer:
    config = ServerConfig(
        port=0,
        max_images_per_request=8,
        max_batch_size=4,
        max_texts_per_request=MAX_TEXTS,
        max_text_chars=MAX_CHARS,
    )
    specs = [
        ModelSpec(name="clip", architecture="open_clip", source=f"open_clip:{dirs['clip']}"),
        ModelSpec(name="hf", architecture="hf-clip", source=f"hf-clip:{dirs['hf']}"),
    ]
    registry = ModelRegistry([tiny_loaded(seed=11), *(load_model(s) for s in specs)])
    running, stop = start_server(config, registry)
    yield running
    stop()


@pytest.fixture
def client(served):
    with vitlens.Client(served.address, timeout_s=120) as c:
        yield c


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n)]


def reference(model, image: np.ndarray, text: str) -> tuple[np.ndarray, np.ndarray, float]:
    """Eq. 5-6 on one pair: (gh, gw) image map, per-token text relevance, the logit."""
    pixels = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255
    texts = model.tokenize([text])
    cap = capture(model, model.preprocess.normalise(pixels), texts)
    rec = cap.gradients(torch.tensor([0]), torch.tensor([0]))

    def relevance(tower) -> torch.Tensor:
        maps = tower.maps()
        r = torch.eye(maps[0][0].shape[-1])[None]
        for a, grad in maps:
            abar = (grad * a).clamp(min=0).mean(dim=1)  # Eq. 5
            r = r + abar @ r  # Eq. 6
        return torch.einsum("bn,bnm->bm", tower.read_rows, r)[0]

    image_rel = relevance(rec.images)
    graph = model.image_graph
    heatmap = image_rel[graph.num_prefix_tokens :].reshape(graph.grid)
    n = len(texts.tokens[0])
    text_rel = relevance(rec.texts)[1 : n - 1]
    return heatmap.numpy(), text_rel.numpy(), float(cap.logits.detach()[0, 0])


@pytest.fixture(scope="module")
def clip_model(dirs):
    return load_image_text_model(f"open_clip:{dirs['clip']}")


def _status(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(vitlens.VitlensError) as info:
        call()
    err = info.value
    fields = [v.field for v in err.field_violations]
    return err.code, fields[0] if fields else ""


def test_get_model_reports_task_modalities_template_methods(client) -> None:
    info = client.model("clip")
    assert info.task == "image_text_similarity" and info.image_text
    assert info.modalities == {"image": 17, "text": 16}
    assert info.prompt_template == TEMPLATE
    assert info.labels == tuple(LABELS)
    assert info.method_names == (
        "generic",
        "transformer_attribution",
        "gradcam",
        "agcam",
        "saliency",
        "token_reflection",
        "rollout",
        "raw_attention",
    )
    assert all(m.modalities == ("image", "text") for m in info.methods)
    raw = client.stub.GetModel(vitlens_pb2.GetModelRequest(name="clip"))
    assert raw.task == vitlens_pb2.TASK_IMAGE_TEXT_SIMILARITY
    tiny = client.model("tiny")
    assert tiny.task == "classification" and tiny.prompt_template == ""
    assert set(tiny.modalities) == {"image"}
    assert all(m.modalities == ("image",) for m in tiny.methods)


def test_explain_texts_equals_per_pair_reference(client, clip_model) -> None:
    batch = images(3)
    result = client.explain(batch, model="clip", texts=TEXTS, top_k_predictions=2)
    assert len(result) == 3
    for image, explained in zip(batch, result, strict=True):
        assert [e.target.index for e in explained.explanations] == [0, 1]
        assert [e.target.label for e in explained.explanations] == TEXTS
        logits = []
        for m, e in enumerate(explained.explanations):
            heatmap, text_rel, logit = reference(clip_model, image, TEXTS[m])
            np.testing.assert_allclose(e.heatmap, heatmap, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(e.text.relevance, text_rel, rtol=1e-4, atol=1e-6)
            assert e.text.text == TEXTS[m]
            assert e.text.tokens == tuple(TEXTS[m].split())
            assert e.target.logit == pytest.approx(logit, abs=1e-5)
            logits.append(logit)
        probs = torch.tensor(logits).softmax(0).numpy()
        np.testing.assert_allclose(
            [e.target.probability for e in explained.explanations], probs, atol=1e-5
        )
        assert {p.label for p in explained.predictions} == set(TEXTS)


@pytest.mark.parametrize("method", ["rollout", "raw_attention"])
def test_baselines_per_tower(client, method) -> None:
    result = client.explain(images(2), model="clip", method=method, texts=TEXTS, relevance=True)
    for explained in result:
        a, b = explained.explanations
        assert a.heatmap.shape == (4, 4) and a.relevance.shape == (17, 17)
        np.testing.assert_array_equal(a.heatmap, b.heatmap)  # the image tower alone
        assert len(a.text.relevance) == len(a.text.tokens) == 5


def test_generic_relevance_matrix_and_input_grid(client) -> None:
    result = client.explain(images(1), model="clip", texts=TEXTS[:1], relevance=True, grid="input")
    e = result[0].explanations[0]
    assert e.relevance.shape == (17, 17) and e.heatmap.shape == (32, 32)


def test_zero_shot_explain_over_labels(client, clip_model) -> None:
    batch = images(2, seed=5)
    result = client.explain(batch, model="clip", top_k=2)
    prompts = [TEMPLATE.format(label) for label in LABELS]
    for image, explained in zip(batch, result, strict=True):
        assert [p.label for p in explained.predictions[:2]] == [
            e.target.label for e in explained.explanations
        ]
        for e in explained.explanations:
            assert e.target.label == LABELS[e.target.index]
            assert e.text.text == prompts[e.target.index]
            heatmap, text_rel, _ = reference(clip_model, image, prompts[e.target.index])
            np.testing.assert_allclose(e.heatmap, heatmap, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(e.text.relevance, text_rel, rtol=1e-4, atol=1e-6)
    fixed = client.explain(batch, model="clip", target=2)
    assert all(r.explanations[0].target.label == LABELS[2] for r in fixed)


def test_predict_zero_shot_and_prompts(client, clip_model) -> None:
    batch = images(3, seed=7)
    zero = client.predict(batch, model="clip", top_k=3)
    assert all({p.label for p in c.predictions} == set(LABELS) for c in zero)
    prompts = ["a red thing", "a blue thing"]
    classified = client.predict(batch, model="clip", prompts=prompts)
    for image, c in zip(batch, classified, strict=True):
        logits = [reference(clip_model, image, p)[2] for p in prompts]
        top = int(np.argmax(logits))
        assert c.top.index == top and c.top.label == prompts[top]
        assert c.top.logit == pytest.approx(max(logits), abs=1e-5)


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda c: c.explain(images(1), model="tiny", texts=["a cat"]), "texts"),
        (lambda c: c.predict(images(1), model="tiny", prompts=["a cat"]), "prompts"),
        (lambda c: c.explain(images(1), model="clip", texts=["a cat", " "]), "texts[1]"),
        (lambda c: c.explain(images(1), model="clip", texts=["x"] * (MAX_TEXTS + 1)), "texts"),
        (lambda c: c.explain(images(1), model="clip", texts=["y" * (MAX_CHARS + 1)]), "texts[0]"),
        (
            lambda c: c.explain(images(1), model="clip", texts=["a b c d e f g h i j k l m n o"]),
            "texts[0]",
        ),
        (lambda c: c.predict(images(1), model="clip", prompts=["ok", ""]), "prompts[1]"),
        (lambda c: c.explain(images(1), model="clip", texts=["a cat"], target=1), "target"),
        (lambda c: c.explain(images(1), model="clip", method="partial_lrp"), "method"),
        (lambda c: c.explain(images(1), model="clip", target=3), "target"),
        (
            lambda c: c.explain(images(1), model="clip", method="rollout", method_options={"a": 1}),
            "options.method_options",
        ),
    ],
)
def test_refusals(client, call, field) -> None:
    code, found = _status(lambda: call(client))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert found == field


def test_overflow_names_the_token_limit(client) -> None:
    with pytest.raises(vitlens.InvalidArgumentError, match="at most 16 tokens"):
        client.explain(images(1), model="clip", texts=["a b c d e f g h i j k l m n o"])


def test_a_bad_request_never_fails_its_batch_mates(client) -> None:
    def good(i: int):
        return client.explain(images(2, seed=i), model="clip", texts=TEXTS)

    def bad():
        return client.explain(images(1), model="clip", texts=["a b c d e f g h i j k l m n o p"])

    with ThreadPoolExecutor(4) as pool:
        goods = [pool.submit(good, i) for i in range(3)]
        failed = pool.submit(bad)
        assert all(len(f.result()) == 2 for f in goods)
        with pytest.raises(vitlens.InvalidArgumentError):
            failed.result()


def test_hf_clip_served_by_the_same_path(client, dirs) -> None:
    model = load_image_text_model(f"hf-clip:{dirs['hf']}")
    info = client.model("hf")
    assert info.task == "image_text_similarity" and info.labels == tuple(LABELS[:2])
    assert info.prompt_template == "a photo of a {}."
    batch = images(2, seed=9)
    result = client.explain(batch, model="hf", texts=TEXTS)
    for image, explained in zip(batch, result, strict=True):
        for m, e in enumerate(explained.explanations):
            heatmap, text_rel, _ = reference(model, image, TEXTS[m])
            np.testing.assert_allclose(e.heatmap, heatmap, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(e.text.relevance, text_rel, rtol=1e-4, atol=1e-6)
    assert len(client.predict(batch, model="hf")[0].predictions) == 2


def test_async_client_texts_and_prompts(served) -> None:
    import asyncio

    async def run():
        async with vitlens.AsyncClient(served.address, timeout_s=120) as c:
            explained = await c.explain(images(1), model="clip", texts=TEXTS)
            classified = await c.predict(images(1), model="clip", prompts=TEXTS)
            return explained, classified

    explained, classified = asyncio.run(run())
    assert explained[0].explanations[1].text.text == TEXTS[1]
    assert classified[0].top.label in TEXTS


def test_a_failing_request_inside_a_batch_leaves_the_others(client, monkeypatch) -> None:
    """Requests with equal texts batch together; one whose pass fails is retried alone."""
    from vitlens_server.explain import image_text_batch

    original = image_text_batch.explain_pairs

    def fragile(model, pixels, *args, **kwargs):
        if bool((pixels == pixels[:, :, :1, :1]).all(dim=(1, 2, 3)).any()):  # a flat image
            raise RuntimeError("boom")
        return original(model, pixels, *args, **kwargs)

    monkeypatch.setattr(image_text_batch, "explain_pairs", fragile)
    flat = [np.zeros((32, 32, 3), dtype=np.uint8)]
    with ThreadPoolExecutor(4) as pool:
        goods = [
            pool.submit(client.explain, images(1, seed=i), model="clip", texts=TEXTS)
            for i in range(3)
        ]
        bad = pool.submit(client.explain, flat, model="clip", texts=TEXTS)
        assert all(len(f.result()[0].explanations) == 2 for f in goods)
        with pytest.raises(vitlens.InternalError):
            bad.result()


def test_sdk_refuses_one_string_for_texts() -> None:
    from vitlens.client import build_explain_request, build_predict_request

    with pytest.raises(TypeError, match="sequence of strings"):
        build_explain_request(images(1), texts="a cat")
    with pytest.raises(TypeError, match="sequence of strings"):
        build_predict_request(images(1), prompts="a cat")
    assert list(build_explain_request(images(1), texts=["a", "b"]).texts) == ["a", "b"]

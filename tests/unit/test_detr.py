"""DETR on the relevance engine: the graph, seed 003's rules, batched = per-detection, loading.

A tiny random DETR is saved with ``save_pretrained`` and loaded back by `load_detr` (the format
users' checkpoints come in). The references recompute everything independently: ∂y/∂A from an
ordinary backward pass of one detection's logit with ``retain_grad`` on the maps the attention
modules return (the input pixels and the decoder's zero start require grad, so the first decoder
self-attention is in the graph too), the rules in float64 numpy.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers.models.detr.modeling_detr import DetrCrossAttention, DetrSelfAttention

from tests.unit.detr_tiny import NUM_QUERIES, save_tiny_detr, tiny_pixels
from vitlens_server.explain.detection import (
    DETECTION_METHODS,
    explain_detections,
    select_detections,
)
from vitlens_server.models.detection import DetrLoadError, load_detr, preprocessing


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    return load_detr(save_tiny_detr(tmp_path_factory.mktemp("detr")))


def _reference_maps(detector, pixels, query: int, label: int):
    """(A, ∂y/∂A) per edge, float64 numpy (h, q, k), for image 0's detection ``query``."""
    kept: dict[int, torch.Tensor] = {}

    def keep(module, _args, output):
        output[1].retain_grad()
        kept[id(module)] = output[1]

    modules = [detector.module.get_submodule(e.label) for e in detector.graph().edges]
    handles = [m.register_forward_hook(keep) for m in modules]
    try:
        with torch.enable_grad():
            x = pixels[:1].clone().requires_grad_(True)
            queries = torch.zeros(1, NUM_QUERIES, 32, requires_grad=True)  # DETR's zero start
            out = detector.module(
                pixel_values=x, decoder_inputs_embeds=queries, output_attentions=True
            )
            out.logits[0, query, label].backward()
    finally:
        for handle in handles:
            handle.remove()
    maps = [kept[id(m)] for m in modules]
    return [(m[0].detach().double().numpy(), m.grad[0].double().numpy()) for m in maps]


def _call_order(detector):
    """The attention modules in the order a forward pass calls them."""
    model = detector.module.model
    calls = [layer.self_attn for layer in model.encoder.layers]
    for layer in model.decoder.layers:
        calls += [layer.self_attn, layer.encoder_attn]
    return calls


def _normalised(r: np.ndarray) -> np.ndarray:
    """Eq. 8-9 with the zero-row rule: R̄ = (R − I)/rowsum + I, rows summing to 0 stay 0."""
    eye = np.eye(len(r))
    hat = r - eye
    sums = hat.sum(1, keepdims=True)
    return hat / np.where(sums == 0, 1, sums) + eye


def _generic_reference(detector, layers, query: int) -> tuple[np.ndarray, np.ndarray]:
    """Row ``query`` of R^{qi} and of R^{qq} by Eq. 5, 6, 7 and 10, written out."""
    n = layers[0][0].shape[-1]
    r_ii, r_qq, r_qi = np.eye(n), np.eye(NUM_QUERIES), np.zeros((NUM_QUERIES, n))
    for edge, (a, g) in zip(detector.graph().edges, layers, strict=True):
        bar = np.clip(g * a, 0, None).mean(0)  # Eq. 5
        if edge.kind == "self" and edge.queries == "image":
            r_ii = r_ii + bar @ r_ii  # Eq. 6
        elif edge.kind == "self":
            r_qq, r_qi = r_qq + bar @ r_qq, r_qi + bar @ r_qi  # Eq. 6, 7
        else:
            r_qi = r_qi + _normalised(r_qq).T @ bar @ _normalised(r_ii)  # Eq. 10
    return r_qi[query], r_qq[query]


def _confident(detector, pixels) -> list[torch.Tensor]:
    with torch.no_grad():
        logits, _ = detector.predict(pixels)
    return list(select_detections(logits, threshold=0.0, most=3))


def test_graph_names_the_attention_modules_in_call_order(detector):
    edges = detector.graph().edges
    assert [e.kind for e in edges] == ["self", "self", "self", "cross", "self", "cross"]
    assert [detector.module.get_submodule(e.label) for e in edges] == _call_order(detector)
    for edge in edges:
        kind = DetrCrossAttention if edge.kind == "cross" else DetrSelfAttention
        assert isinstance(detector.module.get_submodule(edge.label), kind)


def test_generic_follows_seed_003_rules(detector):
    pixels = tiny_pixels(2)
    explained = explain_detections(
        detector, pixels, DETECTION_METHODS["generic"], select=_confident(detector, pixels)
    )
    for rank in range(2):
        query = int(explained.queries[0][rank])
        label = int(explained.classes[0][rank])
        layers = _reference_maps(detector, pixels, query, label)
        image, queries = _generic_reference(detector, layers, query)
        np.testing.assert_allclose(explained.image[0][rank].numpy(), image, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(
            explained.query_relevance[0][rank].numpy(), queries, rtol=1e-4, atol=1e-6
        )
        assert image.max() > 0  # the map is not trivially zero


def test_rollout_and_raw_attention_follow_their_definitions(detector):
    pixels = tiny_pixels(1)
    select = [torch.tensor([0, 3])]
    layers = _reference_maps(detector, pixels, 0, 0)
    edges = detector.graph().edges
    raw = explain_detections(detector, pixels, DETECTION_METHODS["raw_attention"], select=select)
    last_cross = layers[-1][0].mean(0)
    np.testing.assert_allclose(raw.image[0].numpy(), last_cross[[0, 3]], rtol=1e-5, atol=1e-7)

    def rolled(kind: str) -> np.ndarray:
        out = None
        for edge, (a, _) in zip(edges, layers, strict=True):
            if edge.kind == "self" and edge.queries == kind:
                step = a.mean(0) + np.eye(a.shape[-1])
                step /= step.sum(1, keepdims=True)
                out = step if out is None else step @ out
        return out

    expected = rolled("queries").T @ last_cross @ rolled("image")  # Eq. 12
    got = explain_detections(detector, pixels, DETECTION_METHODS["rollout"], select=select)
    np.testing.assert_allclose(got.image[0].numpy(), expected[[0, 3]], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", sorted(DETECTION_METHODS))
def test_batched_detections_equal_each_detection_alone(detector, name):
    pixels = tiny_pixels(2, seed=1)
    select = [torch.tensor([4, 0, 2]), torch.tensor([1])]
    method = DETECTION_METHODS[name]
    together = explain_detections(detector, pixels, method, select=select, batched=True)
    looped = explain_detections(detector, pixels, method, select=select, batched=False)
    for b, queries in enumerate(select):
        for rank, query in enumerate(queries.tolist()):
            alone = explain_detections(
                detector, pixels[b : b + 1], method, select=[torch.tensor([query])]
            )
            for got in (together, looped):
                torch.testing.assert_close(
                    got.image[b][rank], alone.image[0][0], rtol=1e-4, atol=1e-6
                )
                torch.testing.assert_close(
                    got.query_relevance[b][rank], alone.query_relevance[0][0], rtol=1e-4, atol=1e-6
                )
    assert together.grid == (3, 3) and together.heatmaps(0).shape == (3, 3, 3)


def test_an_image_without_detections_gets_none(detector):
    pixels = tiny_pixels(2)
    out = explain_detections(
        detector, pixels, DETECTION_METHODS["generic"], select=[torch.tensor([1]), torch.tensor([])]
    )
    assert out.image[1].shape == (0, 9) and out.query_relevance[1].shape == (0, NUM_QUERIES)
    empty = explain_detections(
        detector, pixels, DETECTION_METHODS["generic"], select=lambda _: [[], []]
    )
    assert [t.shape[0] for t in empty.image] == [0, 0]


def test_select_detections_keeps_confident_queries_most_probable_first():
    logits = torch.full((1, 4, 3), -10.0)
    logits[0, 0, 2] = 10.0  # "no object"
    logits[0, 1, 0], logits[0, 2, 1], logits[0, 3, 0] = 3.0, 10.0, 10.0
    logits[0, 3, 1] = 9.0
    found = select_detections(logits, threshold=0.5)
    probs = logits.softmax(-1)[0, :, :2].amax(-1)
    assert found[0].tolist() == sorted(
        (q for q in range(4) if probs[q] > 0.5), key=lambda q: -probs[q]
    )
    assert select_detections(logits, threshold=0.5, most=1)[0].tolist() == [found[0][0].item()]


def test_select_rejects_queries_out_of_range(detector):
    with pytest.raises(ValueError, match="indices below 5"):
        explain_detections(
            detector, tiny_pixels(1), DETECTION_METHODS["rollout"], select=[torch.tensor([5])]
        )


def test_loading_refuses_what_it_cannot_load(tmp_path):
    with pytest.raises(DetrLoadError, match=r"no config\.json"):
        load_detr(tmp_path)
    directory = save_tiny_detr(tmp_path / "pretrained")
    config = json.loads((directory / "config.json").read_text())
    config["backbone_config"]["use_pretrained_backbone"] = True
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(DetrLoadError, match="downloads the backbone"):
        load_detr(directory)
    other = save_tiny_detr(tmp_path / "wider", d_model=48)
    (other / "model.safetensors").replace(tmp_path / "model.safetensors")
    save_tiny_detr(tmp_path / "narrow")
    (tmp_path / "model.safetensors").replace(tmp_path / "narrow" / "model.safetensors")
    with pytest.raises(DetrLoadError, match=r"does not fit|cannot load"):
        load_detr(tmp_path / "narrow")
    (tmp_path / "narrow" / "model.safetensors").unlink()
    with pytest.raises(DetrLoadError, match="safetensors weights only"):
        load_detr(tmp_path / "narrow")


def test_preprocessing_reads_the_image_processor_settings(tmp_path):
    assert preprocessing(tmp_path).height == 800  # DETR's defaults without a file
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "size": {"height": 224, "width": 160},
                "image_mean": [0.5] * 3,
                "image_std": [0.25] * 3,
            }
        )
    )
    found = preprocessing(tmp_path)
    assert (found.height, found.width, found.mean, found.std) == (224, 160, (0.5,) * 3, (0.25,) * 3)

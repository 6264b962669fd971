"""LRP through a DETR (`explain.detection_lrp`): conservation sublayer by sublayer and overall,
R^A per edge, and the LRP methods batched = each detection alone."""

from __future__ import annotations

import pytest
import torch

from tests.unit.detr_tiny import save_tiny_detr, tiny_pixels
from vitlens_server.explain.detection import DETECTION_METHODS, explain_detections
from vitlens_server.explain.detection_lrp import detr_attention_relevances, record_detr_lrp
from vitlens_server.models.detection import load_detr


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    return load_detr(save_tiny_detr(tmp_path_factory.mktemp("detr"), seed=2))


# The first decoder self-attention reads DETR's zero start: its residual, queries, keys and
# values carry no relevance (a zero input takes none), so its relevance is left at the query
# position embeddings and at biases, and conservation is checked everywhere else.
ZERO_START = "model.decoder.layers.0.self_attn"


def _walk(detector, queries, classes):
    trace: dict[str, torch.Tensor] = {}
    with torch.no_grad(), record_detr_lrp(detector) as tape:
        run = detector.run(tiny_pixels(2, seed=5))
    found = detr_attention_relevances(detector, tape, run.maps, queries, classes, trace=trace)
    return run, found, trace


def _total(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).sum(1)  # per image


def test_every_sublayer_conserves_relevance(detector):
    run, found, trace = _walk(detector, torch.tensor([1, 3]), torch.tensor([0, 2]))
    assert [r.shape for r in found] == [m.shape for m in run.maps]
    checked = 0
    for key in trace:
        path, where = key.rsplit(":", 1)
        if where != "out" or path in ("input", ZERO_START):
            continue
        out = _total(trace[key])
        if path.endswith(".mlp"):
            parts = trace[f"{path}:skip"] + trace[f"{path}:inner"]
            torch.testing.assert_close(_total(parts), out, rtol=1e-3, atol=1e-5)
        else:
            pos = sum(_total(trace[f"{path}.{p}_proj:pos"]) for p in "qk")
            parts = _total(trace[f"{path}:skip"]) + _total(trace[f"{path}:query"])
            torch.testing.assert_close(
                parts + _total(trace[f"{path}:kv"]) + pos, out, rtol=1e-3, atol=1e-5
            )
        checked += 1
    assert checked == 2 * 2 + 3 * 2 - 1  # encoder: mlp, self; decoder: mlp, cross, self; 2 layers
    start = trace[f"{ZERO_START}:out"]  # all of it is left at the position embeddings and biases
    assert _total(trace[f"{ZERO_START}:skip"] + trace[f"{ZERO_START}:kv"]).abs().max() == 0
    assert (_total(start) > 0).all()


def test_relevance_starts_at_one_and_the_ra_depend_on_the_class(detector):
    _, first, trace = _walk(detector, torch.tensor([1, 3]), torch.tensor([0, 2]))
    top = trace["model.decoder.layers.1.mlp:out"]
    torch.testing.assert_close(_total(top), torch.ones(2), rtol=1e-4, atol=1e-5)
    assert top[0, 1].abs().sum() > 0 and top[0, [0, 2, 3, 4]].abs().sum() == 0  # one query only
    _, other, _ = _walk(detector, torch.tensor([1, 3]), torch.tensor([1, 0]))
    assert not torch.allclose(first[-1], other[-1])


@pytest.mark.parametrize("name", ["partial_lrp", "transformer_attribution"])
def test_lrp_methods_batched_equal_each_detection_alone(detector, name):
    pixels, select = tiny_pixels(2, seed=1), [torch.tensor([4, 0]), torch.tensor([2])]
    method = DETECTION_METHODS[name]
    together = explain_detections(detector, pixels, method, select=select)
    for b, queries in enumerate(select):
        for rank, query in enumerate(queries.tolist()):
            alone = explain_detections(
                detector, pixels[b : b + 1], method, select=[torch.tensor([query])]
            )
            torch.testing.assert_close(
                together.image[b][rank], alone.image[0][0], rtol=1e-4, atol=1e-6
            )


def test_generic_with_lrp_averaging_differs_from_gradient_averaging(detector):
    pixels, select = tiny_pixels(1, seed=3), [torch.tensor([0, 1])]
    method = DETECTION_METHODS["generic"]
    lrp = explain_detections(detector, pixels, method, select=select, averaging="lrp")
    grad = explain_detections(detector, pixels, method, select=select)
    assert lrp.image[0].shape == grad.image[0].shape and not torch.allclose(
        lrp.image[0], grad.image[0]
    )
    with pytest.raises(ValueError, match="averaging"):
        explain_detections(detector, pixels, method, select=select, averaging="mean")

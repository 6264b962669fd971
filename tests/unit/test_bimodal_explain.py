"""Bi-modal explanations: one forward, one backward per target rank, each method's readout."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.unit import bimodal_tiny as tiny
from vitlens_server.explain.bimodal import BIMODAL_METHODS, explain_bimodal, resolve_targets
from vitlens_server.explain.graph import LayerMaps, propagate
from vitlens_server.models.bimodal import BimodalInputs, BimodalModel, load_bimodal_model
from vitlens_server.models.bimodal.records import BimodalRecording


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, BimodalModel]]:
    root = tmp_path_factory.mktemp("bimodal-explain")
    loaded = {
        kind: load_bimodal_model(tiny.write_dir(Path(root) / kind, kind))
        for kind in tiny.ARCHITECTURES
    }
    yield loaded
    for model in loaded.values():
        model.close()


def _inputs(model: BimodalModel, kind: str) -> BimodalInputs:
    ids, mask, _ = model.tokenize(tiny.QUESTIONS)
    return BimodalInputs(ids, mask, **tiny.batch(kind))


def _item(inputs: BimodalInputs, b: int) -> BimodalInputs:
    """Item ``b`` alone, its text padding kept (the batch's T)."""
    fields = {k: None if v is None else v[b : b + 1] for k, v in vars(inputs).items()}
    return BimodalInputs(**fields)


@pytest.mark.parametrize("kind", tiny.ARCHITECTURES)
@pytest.mark.parametrize("name", list(BIMODAL_METHODS))
def test_each_rank_is_read_at_the_answer_token_and_padding_gets_none(
    kind: str, name: str, models: dict[str, BimodalModel]
) -> None:
    model = models[kind]
    inputs = _inputs(model, kind)
    out = explain_bimodal(model, inputs, BIMODAL_METHODS[name], top_k=2)
    b, t = inputs.ids.shape
    assert out.text.shape == (b, 2, t)
    assert out.image.shape == (b, 2, out.tokens.image_valid.shape[1])
    assert torch.equal(out.targets, out.logits.topk(2, dim=1).indices)
    assert not out.text[~out.tokens.text_valid[:, None].expand(-1, 2, -1)].any()
    assert not out.image[~out.tokens.image_valid[:, None].expand(-1, 2, -1)].any()
    assert out.image.abs().sum() > 0 and out.text.abs().sum() > 0
    if not BIMODAL_METHODS[name].class_specific:
        torch.testing.assert_close(out.text[:, 0], out.text[:, 1])


@pytest.mark.parametrize("kind", tiny.ARCHITECTURES)
def test_generic_is_the_engine_on_the_recorded_maps(
    kind: str, models: dict[str, BimodalModel]
) -> None:
    model = models[kind]
    inputs = _inputs(model, kind)
    targets = torch.tensor([3, 1])
    out = explain_bimodal(model, inputs, BIMODAL_METHODS["generic"], targets=targets)
    with model.record() as rec:
        logits = model(inputs)
    maps = rec.layer_maps(logits[torch.arange(2), targets])
    text, image = model.readout(propagate(model.graph(rec.tokens), maps), rec.tokens)
    torch.testing.assert_close(out.text[:, 0], text)
    torch.testing.assert_close(out.image[:, 0], image)
    assert out.targets.tolist() == [[3], [1]]


@pytest.mark.parametrize("kind", tiny.ARCHITECTURES)
def test_one_backward_pass_per_rank_serves_the_whole_batch(
    kind: str, models: dict[str, BimodalModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    original = BimodalRecording.gradients

    def counted(self, target, **kwargs):
        calls.append(int(target.numel()))
        return original(self, target, **kwargs)

    monkeypatch.setattr(BimodalRecording, "gradients", counted)
    model = models[kind]
    explain_bimodal(model, _inputs(model, kind), BIMODAL_METHODS["generic"], top_k=3)
    assert calls == [2, 2, 2]  # three ranks, each one pass for both items
    calls.clear()
    explain_bimodal(model, _inputs(model, kind), BIMODAL_METHODS["rollout"], top_k=3)
    assert calls == []  # attention-only methods take no backward pass


@pytest.mark.parametrize("kind", tiny.ARCHITECTURES)
def test_an_item_is_explained_alike_alone_and_in_a_batch(
    kind: str, models: dict[str, BimodalModel]
) -> None:
    model = models[kind]
    inputs = _inputs(model, kind)
    together = explain_bimodal(model, inputs, BIMODAL_METHODS["generic"], top_k=1)
    for b in range(2):
        alone = explain_bimodal(model, _item(inputs, b), BIMODAL_METHODS["generic"], top_k=1)
        torch.testing.assert_close(alone.text[0], together.text[b], atol=1e-5, rtol=1e-4)
        m = alone.image.shape[-1]  # a ViLT item alone has no padding slots
        torch.testing.assert_close(alone.image[0], together.image[b, :, :m], atol=1e-5, rtol=1e-4)


def test_gradcam_weights_heads_by_their_mean_gradient(models: dict[str, BimodalModel]) -> None:
    model = models["vilt"]
    inputs = _inputs(model, "vilt")
    targets = torch.tensor([0, 2])
    out = explain_bimodal(model, inputs, BIMODAL_METHODS["gradcam"], targets=targets)
    with model.record() as rec:
        logits = model(inputs)
    last: LayerMaps = rec.layer_maps(logits[torch.arange(2), targets])[-1]
    weights = last.gradient.mean(dim=(2, 3), keepdim=True)
    cam = (weights * last.attention).mean(dim=1).clamp(min=0)  # (B, N, N)
    row = cam[:, 0]  # the text CLS
    tokens = rec.tokens
    expected_text = row[:, tokens.text_positions].masked_fill(~tokens.text_valid, 0)
    expected_image = row[:, tokens.image_positions].masked_fill(~tokens.image_valid, 0)
    torch.testing.assert_close(out.text[:, 0], expected_text)
    torch.testing.assert_close(out.image[:, 0], expected_image)


@pytest.mark.parametrize("kind", tiny.ARCHITECTURES)
def test_lrp_methods_read_the_lrp_relevance_of_every_map(
    kind: str, models: dict[str, BimodalModel]
) -> None:
    from vitlens_server.explain.bimodal_lrp import attention_relevances
    from vitlens_server.explain.graph import attribution
    from vitlens_server.models.bimodal.lrp_taps import record_lrp

    model = models[kind]
    inputs = _inputs(model, kind)
    targets = torch.tensor([1, 4])
    out = explain_bimodal(
        model, inputs, BIMODAL_METHODS["transformer_attribution"], targets=targets
    )
    with record_lrp(model) as rec:
        logits = model(inputs)
    grads = rec.gradients(logits[torch.arange(2), targets])
    rel = attention_relevances(model, rec, targets)
    layers = [LayerMaps(r, g) for r, g in zip(rel, grads, strict=True)]
    text, image = model.readout(attribution(model.graph(rec.tokens), layers), rec.tokens)
    torch.testing.assert_close(out.text[:, 0], text)
    torch.testing.assert_close(out.image[:, 0], image)
    generic = BIMODAL_METHODS["generic"]
    plain = explain_bimodal(model, inputs, generic, targets=targets)
    lrp = explain_bimodal(model, inputs, generic, targets=targets, averaging="lrp")
    assert not torch.allclose(plain.image, lrp.image)  # Eq. 13 averaging differs from Eq. 5


def test_matrices_on_request_and_target_forms() -> None:
    logits = torch.tensor([[0.1, 0.9, 0.5], [0.7, 0.2, 0.3]])
    assert resolve_targets(logits, None, 2).tolist() == [[1, 2], [0, 2]]
    assert resolve_targets(logits, torch.tensor([2, 2]), 1).tolist() == [[2], [2]]
    assert resolve_targets(logits, torch.tensor([[0, 1], [1, 0]]), 1).shape == (2, 2)


def test_matrices_are_kept_when_asked(models: dict[str, BimodalModel]) -> None:
    model = models["lxmert"]
    out = explain_bimodal(
        model, _inputs(model, "lxmert"), BIMODAL_METHODS["rollout"], top_k=2, matrices=True
    )
    assert out.matrices is not None and len(out.matrices) == 2
    r_ti = out.matrices[0].matrix("text", "image")
    assert r_ti.shape == (2, out.text.shape[-1], out.image.shape[-1])
    with pytest.raises(ValueError, match="averaging"):
        explain_bimodal(model, _inputs(model, "lxmert"), BIMODAL_METHODS["generic"], averaging="x")

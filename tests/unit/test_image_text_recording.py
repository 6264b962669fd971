"""Both towers' recorded attention equals the libraries' own, and ∂y/∂A (y a chosen similarity
logit) equals autograd through an explicitly materialised A; the hooks leave no trace."""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.unit.image_text_tiny import (
    TIMM_CFG,
    VIT_CFG,
    build_open_clip_module,
    write_hf_dir,
    write_open_clip_dir,
)
from vitlens_server.models.image_text import (
    ImageTextModel,
    capture,
    load_image_text_model,
    record_pairs,
)

TEXTS = ["a photo of a cat", "two red squares left of a big circle"]
PAIRS = (torch.tensor([0, 1, 1]), torch.tensor([1, 0, 1]))  # image 1 in two pairs, text 1 too


def _pixels(n: int = 2) -> Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(11))


def _load(path: str) -> ImageTextModel:
    model = load_image_text_model(path)
    model.module.double()  # exact comparisons; the hooks stay on the same modules
    return model


@pytest.fixture(scope="module")
def open_clip_vit(tmp_path_factory) -> ImageTextModel:
    path = tmp_path_factory.mktemp("oc") / "vit"
    write_open_clip_dir(path, VIT_CFG, build_open_clip_module(VIT_CFG, seed=1))
    return _load(f"open_clip:{path}")


@pytest.fixture(scope="module")
def open_clip_timm(tmp_path_factory) -> ImageTextModel:
    path = tmp_path_factory.mktemp("oc") / "timm"
    write_open_clip_dir(path, TIMM_CFG, build_open_clip_module(TIMM_CFG, seed=2))
    return _load(f"open_clip:{path}")


@pytest.fixture(scope="module")
def hf_path(tmp_path_factory) -> Path:
    return write_hf_dir(tmp_path_factory.mktemp("hf") / "clip", seed=3)


# --- references: the libraries' attention with A materialised, autograd through it ----------


def _explicit_mha(block: nn.Module, maps: list[Tensor], library: list[Tensor]) -> None:
    """Replace an open_clip block's attention by a plain one that keeps A (and, for comparison,
    what ``nn.MultiheadAttention`` itself reports with ``need_weights=True``)."""
    attn = block.attn

    def attention(q_x, k_x=None, v_x=None, attn_mask=None):
        b, n, e = q_x.shape
        q, k, v = F.linear(q_x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.view(b, n, attn.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-2, -1) * attn.head_dim**-0.5
        a = (scores if attn_mask is None else scores + attn_mask).softmax(-1)  # (B, h, N, N)
        maps.append(a)
        weights = attn(
            q_x, q_x, q_x, need_weights=True, average_attn_weights=False, attn_mask=attn_mask
        )
        library.append(weights[1].detach())
        return attn.out_proj((a @ v).transpose(1, 2).reshape(b, n, e))

    block.attention = attention


def open_clip_reference(model: ImageTextModel, pixels: Tensor, ids: Tensor, pairs):
    """Logits, and per tower (A, ∂y/∂A, the library's own A) per layer, on a copy."""
    ref = copy.deepcopy(model.module).requires_grad_(True)
    maps = {"image": [], "text": []}
    library = {"image": [], "text": []}
    visual = ref.visual
    if hasattr(visual, "trunk"):  # timm tower: its own unfused path keeps A

        def keep(_m: nn.Module, _i: tuple, out: Tensor) -> None:
            maps["image"].append(out)
            library["image"].append(out.detach())

        for block in visual.trunk.blocks:
            block.attn.fused_attn = False
            block.attn.attn_drop.register_forward_hook(keep)
    else:
        for block in visual.transformer.resblocks:
            _explicit_mha(block, maps["image"], library["image"])
    for block in ref.transformer.resblocks:
        _explicit_mha(block, maps["text"], library["text"])
    images = ref.encode_image(pixels, normalize=True)
    texts = ref.encode_text(ids, normalize=True)
    logits = ref.logit_scale.exp() * images @ texts.T
    y = logits[pairs[0], pairs[1]].sum()
    grads = torch.autograd.grad(y, maps["image"] + maps["text"])
    n = len(maps["image"])
    return logits.detach(), {
        "image": list(zip(maps["image"], grads[:n], library["image"], strict=True)),
        "text": list(zip(maps["text"], grads[n:], library["text"], strict=True)),
    }


def _eager_in_float64(module, query, key, value, attention_mask, scaling, dropout=0.0, **_):
    """transformers' ``eager_attention_forward`` with the softmax in the inputs' dtype (the
    library's takes it in float32, which would cap the comparison at float32 precision)."""
    weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = weights.softmax(dim=-1)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def hf_reference(path: Path, pixels: Tensor, ids: Tensor, valid: Tensor, pairs):
    """The same from transformers' eager attention (``output_attentions=True``)."""
    from transformers import CLIPModel

    ref = CLIPModel.from_pretrained(path, local_files_only=True, attn_implementation="eager")
    ref = ref.double().eval().requires_grad_(True)
    image_out = ref.get_image_features(pixel_values=pixels, output_attentions=True)
    text_out = ref.get_text_features(
        input_ids=ids, attention_mask=valid.long(), output_attentions=True
    )
    images = F.normalize(image_out.pooler_output, dim=-1)
    texts = F.normalize(text_out.pooler_output, dim=-1)
    logits = ref.logit_scale.exp() * images @ texts.T
    maps = list(image_out.attentions) + list(text_out.attentions)
    grads = torch.autograd.grad(logits[pairs[0], pairs[1]].sum(), maps)
    n = len(image_out.attentions)
    return logits.detach(), {
        "image": list(zip(maps[:n], grads[:n], maps[:n], strict=True)),
        "text": list(zip(maps[n:], grads[n:], maps[n:], strict=True)),
    }


def _check_against(rec, want: dict) -> None:
    for tower in rec.towers():
        reference = want[tower.graph.tower]
        assert tower.num_layers == len(reference) == tower.graph.num_layers
        for (a, da), (want_a, want_da, library_a) in zip(tower.maps(), reference, strict=True):
            torch.testing.assert_close(want_a.detach(), library_a)  # the reference is the library's
            torch.testing.assert_close(a, want_a.detach())
            torch.testing.assert_close(da, want_da)


# --- the towers ------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["open_clip_vit", "open_clip_timm"])
def test_open_clip_maps_and_gradients_match_explicit_attention(fixture, request) -> None:
    model: ImageTextModel = request.getfixturevalue(fixture)
    x, texts = _pixels().double(), model.tokenize(TEXTS)
    captured = capture(model, x, texts)
    rec = captured.gradients(*PAIRS)
    logits, want = open_clip_reference(model, x, texts.ids, PAIRS)
    torch.testing.assert_close(captured.logits.detach(), logits)
    _check_against(rec, want)
    assert all(layer.out_grad is None for layer in captured.recording.texts.layers)  # unchanged


def test_hf_maps_and_gradients_match_eager_attention(hf_path, monkeypatch) -> None:
    from transformers.models.clip import modeling_clip

    model = _load(f"hf-clip:{hf_path}")
    assert model.module.config._attn_implementation == "sdpa"  # recording keeps the fused kernel
    x, texts = _pixels().double(), model.tokenize(TEXTS)
    rec = capture(model, x, texts).gradients(*PAIRS)
    _, float32_softmax = hf_reference(hf_path, x, texts.ids, texts.valid, PAIRS)
    for tower in rec.towers():  # the library's own eager attention, to its float32 softmax
        for (a, _), (want_a, *_) in zip(
            tower.maps(), float32_softmax[tower.graph.tower], strict=True
        ):
            torch.testing.assert_close(a, want_a.detach(), rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(modeling_clip, "eager_attention_forward", _eager_in_float64)
    _, want = hf_reference(hf_path, x, texts.ids, texts.valid, PAIRS)
    _check_against(rec, want)
    assert rec.texts.mask.shape == (2, 1, 16, 16)  # causal + each text's padding


def test_text_attention_is_causal_and_nothing_after_the_eot_matters(open_clip_vit) -> None:
    model = open_clip_vit
    texts = model.tokenize(TEXTS)
    rec, _ = record_pairs(model, _pixels().double(), texts)
    eot = texts.pooled_index
    for a, da in rec.texts.maps():
        assert torch.equal(a.triu(1), torch.zeros_like(a))
        for m in range(len(TEXTS)):
            assert not da[m, :, eot[m] + 1 :].any()  # rows after the EOT never reach it
    read = rec.texts.read_rows
    torch.testing.assert_close(read, F.one_hot(eot, 16).double())
    image_read = rec.images.read_rows
    assert image_read.shape == (2, 17) and image_read[:, 0].eq(1).all() and image_read.sum() == 2


def test_pairs_get_their_own_gradients(open_clip_vit) -> None:
    """record_pairs: y_p = logits[p, p]; each pair's gradients equal its recording alone."""
    model = open_clip_vit
    x, texts = _pixels().double(), model.tokenize(TEXTS)
    rec, logits = record_pairs(model, x, texts)
    for p in range(2):
        alone, alone_logit = record_pairs(model, x[p : p + 1], model.tokenize(TEXTS[p : p + 1]))
        torch.testing.assert_close(logits[p : p + 1], alone_logit)
        for tower, single in zip(rec.towers(), alone.towers(), strict=True):
            mine = tower.narrow(slice(p, p + 1))
            for layer in range(tower.num_layers):
                torch.testing.assert_close(mine.attention(layer), single.attention(layer))
                torch.testing.assert_close(mine.attention_grad(layer), single.attention_grad(layer))


def test_average_pooled_image_tower_reads_the_patch_rows(tmp_path) -> None:
    cfg = {**VIT_CFG, "vision_cfg": {**VIT_CFG["vision_cfg"], "pool_type": "avg"}}
    write_open_clip_dir(tmp_path / "avg", cfg, build_open_clip_module(cfg))
    model = load_image_text_model(f"open_clip:{tmp_path / 'avg'}")
    assert model.image_graph.readout == "avg"
    rec, _ = record_pairs(model, _pixels(1), model.tokenize(TEXTS[:1]))
    want = torch.cat([torch.zeros(1), torch.full((16,), 1 / 16)])
    torch.testing.assert_close(rec.images.read_rows[0], want)


# --- hygiene ----------------------------------------------------------------------------------


def test_recording_leaves_no_trace(open_clip_vit) -> None:
    model = open_clip_vit
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    x, texts = _pixels().double(), model.tokenize(TEXTS)
    with torch.no_grad():
        plain = model.similarity(model.encode_images(x), model.encode_texts(texts))
    _, logits = record_pairs(model, x, texts)
    torch.testing.assert_close(logits, plain.diagonal())
    assert all(p.grad is None and not p.requires_grad for p in model.module.parameters())
    with model.record() as idle:
        pass
    assert idle.images.num_layers == 0 and idle.texts.num_layers == 0
    with model.record() as rec, torch.no_grad():
        model.encode_images(x)
        with pytest.raises(RuntimeError, match="already ran in this recording"):
            model.encode_images(x)
    assert rec.images.num_layers == 2 and rec.texts.num_layers == 0
    assert not rec.images.layers[0].out.requires_grad  # no graph under no_grad
    with pytest.raises(RuntimeError, match="no graph"):
        capture(model, x, texts, gradients=False).gradients(*PAIRS)
    for key, value in model.module.state_dict().items():
        torch.testing.assert_close(value, before[key])


def test_close_removes_every_hook(tmp_path) -> None:
    write_open_clip_dir(tmp_path / "m", VIT_CFG, build_open_clip_module(VIT_CFG))
    model = load_image_text_model(f"open_clip:{tmp_path / 'm'}")

    def hooks() -> int:
        modules = model.module.modules()
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)

    assert hooks() == 0  # on the towers only while recording: Predict runs them bare
    with model.record():
        attention = hooks()
        assert attention > 0
    with model.record(lrp=True):
        assert hooks() > attention  # the LRP taps join recordings that ask for them
    assert hooks() == 0
    model.close()
    with model.record():
        assert hooks() == 0  # closed: nothing attaches again


def test_threads_record_their_own_passes(open_clip_vit) -> None:
    model = open_clip_vit
    texts = model.tokenize(TEXTS)
    x = _pixels().double()
    results: dict[int, Tensor] = {}
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            for _ in range(3):
                rec, _ = record_pairs(
                    model, x[index : index + 1], texts.narrow(slice(index, index + 1))
                )
                results[index] = rec.images.attention(1)
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for index in range(2):
        alone, _ = record_pairs(model, x[index : index + 1], texts.narrow(slice(index, index + 1)))
        torch.testing.assert_close(results[index], alone.images.attention(1))

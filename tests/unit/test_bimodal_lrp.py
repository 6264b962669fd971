"""LRP relevance of the attention maps of the bi-modal adapters (`explain.bimodal_lrp`).

Tiny saved ViLT, VisualBERT and LXMERT models (`bimodal_tiny`), loaded through
`load_bimodal_model` and run in float64. Checked: R^A per edge in edge order with the maps'
shapes; conservation (each sublayer's residual and attention rules, the head, the whole walk:
Σ relevance at the embeddings = 1 per item); padding gets exactly 0 and an item's relevances
do not depend on its batch; ViLT's layers against the timm ViT LRP of `explain.relevance` on a
timm ViT whose weights are mapped into ViLT (exact on the image tokens); LXMERT (one layer of
each kind) against the rules re-derived in numpy from the weights, one item at a time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tiny import tiny_vit
from tests.unit import bimodal_tiny as tiny
from tests.unit.bimodal_lrp_numpy import NumpyLxmert
from tests.unit.image_text_tiny import sharpen
from vitlens_server.explain import relevance
from vitlens_server.explain.bimodal_lrp import (
    attention_relevances,
    encoder_relevances,
    head_relevance,
)
from vitlens_server.explain.recording import record
from vitlens_server.models.bimodal import BimodalInputs, BimodalModel, load_bimodal_model
from vitlens_server.models.bimodal.lrp_taps import record_lrp

F64 = torch.float64
CLOSE = {"rtol": 1e-7, "atol": 1e-10}


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, BimodalModel]]:
    root = tmp_path_factory.mktemp("bimodal_lrp")
    loaded = {}
    for kind in tiny.ARCHITECTURES:
        model = load_bimodal_model(tiny.write_dir(root / kind, kind))
        model.module.to(F64)
        loaded[kind] = model
    yield loaded
    for model in loaded.values():
        model.close()


def _inputs(model: BimodalModel, kind: str, items: slice = slice(None)) -> BimodalInputs:
    """The tiny batch (B = 2, padded) or some of its items, each alone with no padding."""
    ids, mask, _ = model.tokenize(tiny.QUESTIONS[items])
    visual = {k: v[items] for k, v in tiny.batch(kind).items()}
    if "regions" in visual:
        visual["regions"] = visual["regions"].to(F64)
        visual["boxes"] = visual["boxes"].to(F64)
        if items != slice(None):  # alone: the padded region is dropped, not masked
            real = visual["region_mask"][0].bool()
            visual = {k: v[:, real] for k, v in visual.items()}
    else:
        visual["pixels"] = visual["pixels"].to(F64)
    return BimodalInputs(ids, mask, **visual)


def _run(model: BimodalModel, inputs: BimodalInputs):
    with record_lrp(model) as rec:
        logits = model.forward(inputs)
    return logits.detach(), rec


def _real(rec, inputs: BimodalInputs, b: int) -> dict[str, torch.Tensor]:
    """Per token set, the positions of item ``b``'s real tokens (text padding and image
    padding slots left out)."""
    tokens = rec.tokens
    keep = {name: torch.ones(size, dtype=torch.bool) for name, size in tokens.sizes.items()}
    keep[tokens.text_set][tokens.text_positions[inputs.text_mask[b] == 0]] = False
    keep[tokens.image_set][tokens.image_positions[~tokens.image_valid[b]]] = False
    return {name: k.nonzero().squeeze(1) for name, k in keep.items()}


def _sum(t: torch.Tensor) -> torch.Tensor:
    """(B, ...) → (B,) per-item total."""
    return t.flatten(1).sum(1)


# ---------------------------------------------------------------- every architecture


@pytest.mark.parametrize("kind", tiny.ARCHITECTURES)
def test_one_relevance_per_edge_in_edge_order(kind: str, models: dict[str, BimodalModel]) -> None:
    model = models[kind]
    logits, rec = _run(model, _inputs(model, kind))
    found = attention_relevances(model, rec, logits.argmax(-1))
    edges = model.graph(rec.tokens).edges
    assert len(found) == len(edges) == len(rec.maps)
    for rel, attn in zip(found, rec.maps, strict=True):
        assert rel.shape == attn.shape and rel.dtype == F64 and not rel.requires_grad
        assert rel.abs().sum() > 0 or kind == "lxmert"
    if kind == "lxmert":  # the last cross layer's image side never reaches the answer
        last = [i for i, e in enumerate(edges) if e.queries == "image"][-2:]
        assert all((found[i] == 0).all() for i in last)
        assert all(found[i].abs().sum() > 0 for i in range(len(edges)) if i not in last)


@pytest.mark.parametrize("kind", tiny.ARCHITECTURES)
def test_relevance_is_conserved(kind: str, models: dict[str, BimodalModel]) -> None:
    model = models[kind]
    logits, rec = _run(model, _inputs(model, kind))
    top = head_relevance(model, rec, logits.argmin(-1))  # a non-predicted answer too
    ones = torch.ones(2, dtype=F64)
    torch.testing.assert_close(sum(_sum(t) for t in top.values()), ones, **CLOSE)  # α1β0
    rows = rec.tokens.readout_rows
    at_rows = top[rec.tokens.text_set][torch.arange(2), rows]
    torch.testing.assert_close(_sum(at_rows), ones, **CLOSE)  # nothing off the answer token
    trace: dict[str, torch.Tensor] = {}
    found = encoder_relevances(model, rec, top, trace=trace)
    torch.testing.assert_close(sum(_sum(t) for t in found.inputs.values()), ones, **CLOSE)
    sublayers = {key.rsplit(":", 1)[0] for key in trace}
    calls = {key for key in sublayers if "dropout[" in key}  # every attention call
    assert len(calls) == len(rec.maps)
    selfs = sum(edge.kind == "self" for edge in model.graph().edges)
    assert len(sublayers - calls) == selfs  # a feed-forward sublayer per self-attention layer
    for key in sublayers:
        out = _sum(trace[f"{key}:out"])
        parts = [_sum(v) for k, v in trace.items() if k.startswith(f"{key}:") and k != f"{key}:out"]
        assert len(parts) in (2, 3)  # FFN: skip + inner; attention: skip + query + kv
        torch.testing.assert_close(sum(parts), out, **CLOSE)


@pytest.mark.parametrize("kind", tiny.ARCHITECTURES)
def test_padding_gets_nothing_and_items_do_not_depend_on_their_batch(
    kind: str, models: dict[str, BimodalModel]
) -> None:
    model = models[kind]
    inputs = _inputs(model, kind)
    logits, rec = _run(model, inputs)
    targets = torch.tensor([1, 3])
    in_batch = attention_relevances(model, rec, targets)
    edges = model.graph(rec.tokens).edges
    for b in range(2):
        alone_inputs = _inputs(model, kind, slice(b, b + 1))
        alone_logits, alone_rec = _run(model, alone_inputs)
        torch.testing.assert_close(alone_logits[0], logits[b], **CLOSE)
        alone = attention_relevances(model, alone_rec, targets[b : b + 1])
        real, real_alone = _real(rec, inputs, b), _real(alone_rec, alone_inputs, 0)
        for edge, rel, rel_alone in zip(edges, in_batch, alone, strict=True):
            q, k = real[edge.queries], real[edge.keys]
            block = rel[b][:, q][:, :, k]
            want = rel_alone[0][:, real_alone[edge.queries]][:, :, real_alone[edge.keys]]
            torch.testing.assert_close(block, want, **CLOSE)
            pad = torch.ones(rel.shape[-2:], dtype=torch.bool)
            pad[q[:, None], k] = False
            assert (rel[b][:, pad] == 0).all()  # padding rows and columns: exactly 0
    assert (inputs.text_mask[1] == 0).any() and (~rec.tokens.image_valid[1]).any()  # padded


def test_needs_a_recording_with_the_lrp_taps(models: dict[str, BimodalModel]) -> None:
    model = models["visual_bert"]

    def hooks() -> int:
        return sum(len(m._forward_hooks) for m in model.module.modules())

    before = hooks()
    with model.record() as plain:
        model.forward(_inputs(model, "visual_bert"))
    with pytest.raises(RuntimeError, match="record_lrp"):
        attention_relevances(model, plain, torch.tensor([0, 1]))
    with record_lrp(model) as rec:
        assert hooks() > before
        model.forward(_inputs(model, "visual_bert"))
    assert hooks() == before and rec.lrp is not None
    assert len(rec.lrp.inputs["cls"]) == 1


# ---------------------------------------------------------------- ViLT against timm's ViT LRP


def _vit_as_vilt(vit: torch.nn.Module, path: Path) -> BimodalModel:
    """A ViLT whose image side is ``vit`` (weights mapped as `training.vqa_model`'s
    ``clip_visual_to_vilt``, timm's fused qkv split into query, key, value)."""
    import transformers as tf

    width, depth = vit.embed_dim, len(vit.blocks)
    config = tf.ViltConfig(
        vocab_size=len(tiny.WORDS),
        hidden_size=width,
        num_hidden_layers=depth,
        num_attention_heads=vit.blocks[0].attn.num_heads,
        intermediate_size=vit.blocks[0].mlp.fc1.out_features,
        layer_norm_eps=vit.norm.eps,
        image_size=vit.patch_embed.img_size[0],
        patch_size=vit.patch_embed.patch_size[0],
        num_labels=len(tiny.ANSWERS),
        id2label=dict(enumerate(tiny.ANSWERS)),
        label2id={a: i for i, a in enumerate(tiny.ANSWERS)},
    )
    vilt = sharpen(tf.ViltForQuestionAnswering(config))
    weights = {
        "vilt.embeddings.patch_embeddings.projection": vit.patch_embed.proj,
        "vilt.layernorm": vit.norm,
    }
    for i, block in enumerate(vit.blocks):
        p = f"vilt.encoder.layer.{i}."
        weights |= {
            p + "attention.output.dense": block.attn.proj,
            p + "layernorm_before": block.norm1,
            p + "layernorm_after": block.norm2,
            p + "intermediate.dense": block.mlp.fc1,
            p + "output.dense": block.mlp.fc2,
        }
    state = {
        f"{k}.{n}": getattr(m, n).detach() for k, m in weights.items() for n in ("weight", "bias")
    }
    for i, block in enumerate(vit.blocks):
        p = f"vilt.encoder.layer.{i}.attention.attention."
        w, b = block.attn.qkv.weight.detach().chunk(3), block.attn.qkv.bias.detach().chunk(3)
        for j, name in enumerate(("query", "key", "value")):
            state |= {f"{p}{name}.weight": w[j], f"{p}{name}.bias": b[j]}
    emb = "vilt.embeddings."
    state[emb + "cls_token"] = vit.cls_token.detach()
    state[emb + "position_embeddings"] = vit.pos_embed.detach()
    state[emb + "token_type_embeddings.weight"] = torch.zeros(2, width)
    vilt.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    vilt.save_pretrained(path)
    model = load_bimodal_model(tiny.write_vocab(path))
    model.module.to(F64)
    return model


def test_vilt_layers_are_timm_vit_lrp_on_the_image_tokens(tmp_path: Path) -> None:
    """Text keys masked, so the image tokens run exactly the ViT; from the ViT's relevance at
    its last block, ViLT's walk gives the ViT's R^A on the image block, 0 on the text."""
    vit = tiny_vit(seed=2, dtype=F64)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # timm initialises biases 0 and norms 1: make them matter
        for name, param in vit.named_parameters():
            if name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen, dtype=F64))
            elif "norm" in name:
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=gen, dtype=F64))
            param.copy_(param.float())  # ViLT is saved in float32: the same weights
    model = _vit_as_vilt(vit, tmp_path / "vilt")
    pixels = torch.randn(2, 3, 32, 32, generator=gen, dtype=F64)
    ids, mask, _ = model.tokenize(["what color", "how"])
    with record_lrp(model) as rec:
        model.forward(BimodalInputs(ids, torch.zeros_like(mask), pixels=pixels))
    t = ids.shape[1]  # the image CLS; patches after it in raster order, as timm's
    targets = torch.tensor([2, 4])
    vit_rec = record(vit, pixels, lrp=True)
    for layer, attn in enumerate(rec.maps):
        torch.testing.assert_close(attn[:, :, t:, t:], vit_rec.attention(layer), **CLOSE)
    top = relevance.output_relevance(vit_rec, targets)  # (B, 17, D)
    joint = top.new_zeros(2, rec.tokens.sizes["joint"], top.shape[-1])
    joint[:, t:] = top
    found = encoder_relevances(model, rec, {"joint": joint})
    want = relevance.attention_relevances(vit_rec, targets)
    for rel, rel_vit in zip(found.attention, want, strict=True):
        torch.testing.assert_close(rel[:, :, t:, t:], rel_vit, **CLOSE)
        assert rel[:, :, :t].abs().sum() == 0 and rel[:, :, :, :t].abs().sum() == 0
    below = top
    for layer in reversed(range(len(vit.blocks))):
        below, _ = relevance.block_relevance(vit_rec, layer, below)
    torch.testing.assert_close(found.inputs["joint"][:, t:], below, **CLOSE)


# ---------------------------------------------------------------- LXMERT against numpy


def test_lxmert_matches_the_rules_written_out_in_numpy(tmp_path: Path) -> None:
    """One language, one vision and one cross layer, 2 heads of width 4, B = 2 with padding:
    every R^A and the embeddings' relevance against `bimodal_lrp_numpy`, item by item."""
    import transformers as tf

    config = tf.LxmertConfig(
        vocab_size=len(tiny.WORDS),
        hidden_size=8,
        num_attention_heads=2,
        intermediate_size=16,
        l_layers=1,
        r_layers=1,
        x_layers=1,
        visual_feat_dim=tiny.FEATURES,
        visual_pos_dim=4,
        num_qa_labels=len(tiny.ANSWERS),
        num_object_labels=3,
        num_attr_labels=3,
        max_position_embeddings=64,
    )
    sharpen(tf.LxmertForQuestionAnswering(config), seed=3).save_pretrained(tmp_path)
    tiny.write_vocab(tmp_path)
    (tmp_path / "vitlens.json").write_text(json.dumps({"answers": list(tiny.ANSWERS)}))
    model = load_bimodal_model(tmp_path)
    model.module.to(F64)
    inputs = _inputs(model, "lxmert")
    streams: dict[str, torch.Tensor] = {}  # each stream's embeddings

    def keep(name: str):
        def hook(_m: torch.nn.Module, args: tuple) -> None:
            streams[name] = args[0]

        return hook

    encoder = model.module.lxmert.encoder
    hooks = [
        encoder.layer[0].register_forward_pre_hook(keep("text")),
        encoder.r_layers[0].register_forward_pre_hook(keep("image")),
    ]
    try:
        logits, rec = _run(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    targets = torch.tensor([4, 0])
    found = encoder_relevances(model, rec, head_relevance(model, rec, targets))
    for b in range(2):
        real = _real(rec, inputs, b)
        t, i = real["text"], real["image"]
        ref = NumpyLxmert(model.module)
        text_in, image_in = streams["text"][b, t].numpy(), streams["image"][b, i].numpy()
        np.testing.assert_allclose(ref.forward(text_in, image_in), logits[b].numpy(), **CLOSE)
        want, text, image = ref.back(int(targets[b]))
        for edge, rel, rel_ref in zip(model.graph().edges, found.attention, want, strict=True):
            got = rel[b][:, real[edge.queries]][:, :, real[edge.keys]]
            np.testing.assert_allclose(got.numpy(), rel_ref, **CLOSE)
        np.testing.assert_allclose(found.inputs["text"][b, t].numpy(), text, **CLOSE)
        np.testing.assert_allclose(found.inputs["image"][b, i].numpy(), image, **CLOSE)


def test_a_float32_model_gets_float32_relevances(
    tmp_path: Path, models: dict[str, BimodalModel]
) -> None:
    """As loaded for serving (float32): the same relevances as the float64 walk, in float32."""
    model = load_bimodal_model(tiny.write_dir(tmp_path / "vilt", "vilt"))
    inputs = _inputs(model, "vilt")
    inputs = BimodalInputs(inputs.ids, inputs.text_mask, inputs.pixels.float(), inputs.pixel_mask)
    _, rec = _run(model, inputs)
    found = attention_relevances(model, rec, torch.tensor([0, 2]))
    _, rec64 = _run(models["vilt"], _inputs(models["vilt"], "vilt"))
    want = attention_relevances(models["vilt"], rec64, torch.tensor([0, 2]))
    for rel, rel64 in zip(found, want, strict=True):
        assert rel.dtype == torch.float32
        torch.testing.assert_close(rel.double(), rel64, rtol=1e-3, atol=1e-5)
    model.close()

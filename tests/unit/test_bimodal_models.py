"""The bi-modal VQA adapters (ViLT, VisualBERT, LXMERT) on tiny saved Hugging Face models.

Each model is written with ``save_pretrained`` + a vocab.txt and loaded through
`load_bimodal_model`. Checked per architecture: the logits are the library model's own; the
recorded maps are the declared edges' maps, in order, with their shapes; one backward pass gives
∂y/∂A for every edge; the engine's relevance on those maps equals seed 003's equations written
out by hand (float64 numpy, one item at a time) for that architecture, read at the answer row
and split into text and image parts. Also ViLT's token → patch-cell bookkeeping, the loading
errors and hook removal. B = 2 with padding in the second item everywhere.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.unit import bimodal_tiny as tiny
from vitlens_server.explain.graph import propagate
from vitlens_server.models.bimodal import (
    BimodalInputs,
    BimodalLoadError,
    BimodalModel,
    load_bimodal_model,
)

TIGHT = {"rtol": 1e-9, "atol": 1e-12}  # float64 engine vs float64 reference


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bimodal")
    return {kind: tiny.write_dir(root / kind, kind) for kind in tiny.ARCHITECTURES}


@pytest.fixture(scope="module")
def models(dirs: dict[str, Path]) -> Iterator[dict[str, BimodalModel]]:
    loaded = {kind: load_bimodal_model(path) for kind, path in dirs.items()}
    yield loaded
    for model in loaded.values():
        model.close()


def _inputs(model: BimodalModel, kind: str) -> BimodalInputs:
    ids, mask, _ = model.tokenize(tiny.QUESTIONS)
    return BimodalInputs(ids, mask, **tiny.batch(kind))


def _recorded(model: BimodalModel, inputs: BimodalInputs):
    with model.record() as rec:
        logits = model.forward(inputs)
    return logits, rec


def _hf_kwargs(kind: str, inputs: BimodalInputs) -> dict:
    """The library call a user of transformers would write for ``inputs``."""
    text = {"input_ids": inputs.ids, "attention_mask": inputs.text_mask}
    if kind == "vilt":
        return {**text, "pixel_values": inputs.pixels, "pixel_mask": inputs.pixel_mask}
    if kind == "visual_bert":
        return {
            **text,
            "visual_embeds": inputs.regions,
            "visual_attention_mask": inputs.region_mask,
            "visual_token_type_ids": torch.ones(inputs.regions.shape[:2], dtype=torch.long),
        }
    return {
        **text,
        "visual_feats": inputs.regions,
        "visual_pos": inputs.boxes,
        "visual_attention_mask": inputs.region_mask,
    }


def _key_valid(model: BimodalModel, inputs: BimodalInputs, tokens, name: str) -> torch.Tensor:
    """(B, |name|) bool: the keys the model does not mask in token set ``name``."""
    text = inputs.text_mask.bool()
    image = tokens.image_valid
    if name == "text":
        return text
    if name == "image":
        return image
    if model.visual_input == "pixels":  # text, image CLS (always valid), patches
        return torch.cat([text, torch.ones(len(text), 1, dtype=torch.bool), image], dim=1)
    return torch.cat([text, image], dim=1)


# ---------------------------------------------------------------- seed 003, by hand


def _bar(attn: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """Eq. 5 for one item: mean over heads of (∇A ⊙ A)⁺, (q, k)."""
    return np.mean([np.maximum(g * a, 0.0) for a, g in zip(attn, grad, strict=True)], axis=0)


def _norm(r: np.ndarray) -> np.ndarray:
    """Eq. 8-9 for one item: R̄ = (R - I) row-normalised + I; a zero row stays 0."""
    hat = r - np.eye(len(r))
    sums = hat.sum(axis=1, keepdims=True)
    return np.divide(hat, sums, out=np.zeros_like(hat), where=sums != 0) + np.eye(len(r))


def _single_stream_ref(bars: list[np.ndarray]) -> dict[str, np.ndarray]:
    """ViLT / VisualBERT: Eq. 6-7 on the joint set only, R ← R + Ā R from R = I."""
    r = np.eye(len(bars[0]))
    for a in bars:
        r = r + a @ r
    return {"joint": r}


def _two_stream_ref(bars: list[np.ndarray], layers: tuple[int, int, int]) -> dict:
    """LXMERT: Eq. 6-7 per stream; each cross layer's co-attention both ways by Eq. 10-11,
    both computed from the relevances before it, then Eq. 6-7 per stream again."""
    language, vision, cross = layers
    t, i = len(bars[0]), len(bars[language])
    r_tt, r_ii, r_ti, r_it = np.eye(t), np.eye(i), np.zeros((t, i)), np.zeros((i, t))
    maps = iter(bars)
    for _ in range(language):
        a = next(maps)
        r_tt, r_ti = r_tt + a @ r_tt, r_ti + a @ r_ti
    for _ in range(vision):
        a = next(maps)
        r_ii, r_it = r_ii + a @ r_ii, r_it + a @ r_it
    for _ in range(cross):
        a_ti, a_it, a_tt, a_ii = (next(maps) for _ in range(4))
        add_ti, add_tt = _norm(r_tt).T @ a_ti @ _norm(r_ii), a_ti @ r_it  # Eq. 10, 11 (text)
        add_it, add_ii = _norm(r_ii).T @ a_it @ _norm(r_tt), a_it @ r_ti  # Eq. 10, 11 (image)
        r_ti, r_tt, r_it, r_ii = r_ti + add_ti, r_tt + add_tt, r_it + add_it, r_ii + add_ii
        r_tt, r_ti = r_tt + a_tt @ r_tt, r_ti + a_tt @ r_ti
        r_ii, r_it = r_ii + a_ii @ r_ii, r_it + a_ii @ r_it
    assert next(maps, None) is None
    return {("text", "text"): r_tt, ("text", "image"): r_ti, ("image", "image"): r_ii}


# ---------------------------------------------------------------- per architecture


@pytest.mark.parametrize("kind", tiny.ARCHITECTURES)
def test_logits_are_the_library_models(kind: str, models: dict[str, BimodalModel]) -> None:
    model = models[kind]
    inputs = _inputs(model, kind)
    logits = model.forward(inputs)
    assert logits.shape == (2, len(tiny.ANSWERS)) and model.answers == tiny.ANSWERS
    with torch.no_grad():
        out = model.module(**_hf_kwargs(kind, inputs))
    if kind == "vilt":  # HF draws a random patch order: equal up to float rounding
        torch.testing.assert_close(logits, out.logits, rtol=0, atol=1e-5)
        emb = model.module.vilt.embeddings
        x, x_mask, _ = emb.visual_embed(inputs.pixels, inputs.pixel_mask, max_image_length=-1)
        with torch.no_grad():
            hf = model.module(
                input_ids=inputs.ids,
                attention_mask=inputs.text_mask,
                image_embeds=x,
                pixel_mask=x_mask,
            ).logits
        torch.testing.assert_close(logits, hf, rtol=0, atol=1e-5)
        assert torch.equal(model.forward(inputs), logits)  # the adapter's order is fixed
    else:
        want = out.logits if kind == "visual_bert" else out.question_answering_score
        assert torch.equal(logits, want)
    assert not logits[0].allclose(logits[1])


@pytest.mark.parametrize("kind", tiny.ARCHITECTURES)
def test_maps_are_the_declared_edges_in_order(kind: str, models: dict[str, BimodalModel]) -> None:
    model = models[kind]
    inputs = _inputs(model, kind)
    _, rec = _recorded(model, inputs)
    tokens, graph = rec.tokens, model.graph(rec.tokens)
    heads = model.module.config.num_attention_heads
    assert len(rec.maps) == len(graph.edges)
    for edge, attn in zip(graph.edges, rec.maps, strict=True):
        q, k = tokens.sizes[edge.queries], tokens.sizes[edge.keys]
        assert attn.shape == (2, heads, q, k), edge.describe()
        assert attn.requires_grad
        valid = _key_valid(model, inputs, tokens, edge.keys)[:, None, None, :]  # (B, 1, 1, k)
        torch.testing.assert_close(attn.sum(-1), torch.ones(2, heads, q))
        assert (attn.masked_select(~valid.expand_as(attn)) == 0).all(), edge.describe()
    with torch.no_grad():  # the maps transformers returns are the recorded ones
        out = model.module(**(_hf_kwargs(kind, inputs) | {"output_attentions": True}))
    if kind == "lxmert":
        index = {"text": [0, 1], "image": [2, 3], "cross": [4, 8]}  # edges, see two_stream_graph
        returned = {
            "text": out.language_attentions,
            "image": out.vision_attentions,
            "cross": out.cross_encoder_attentions,
        }
        for name, edges in index.items():
            for edge, want in zip(edges, returned[name], strict=True):
                torch.testing.assert_close(rec.maps[edge], want)
        assert [e.label for e in graph.edges[4:6]] == [graph.edges[4].label] * 2  # one module
        assert graph.steps[4] == graph.edges[4:6]  # both ways in one step
    elif kind == "visual_bert":
        for attn, want in zip(rec.maps, out.attentions, strict=True):
            torch.testing.assert_close(attn, want)


@pytest.mark.parametrize("kind", tiny.ARCHITECTURES)
def test_every_edge_has_its_gradient(kind: str, models: dict[str, BimodalModel]) -> None:
    model = models[kind]
    inputs = _inputs(model, kind)
    logits, rec = _recorded(model, inputs)
    target = logits[torch.arange(2), logits.argmax(dim=1)]
    direct = torch.autograd.grad(target.sum(), rec.maps, retain_graph=True, allow_unused=True)
    grads = rec.gradients(target)
    assert len(grads) == len(rec.maps)
    unused = {9, 11} if kind == "lxmert" else set()  # last cross layer: image <- text, image self
    for n, (attn, grad, raw) in enumerate(zip(rec.maps, grads, direct, strict=True)):
        assert grad.shape == attn.shape
        if n in unused:
            assert raw is None and (grad == 0).all()
        else:
            assert raw is not None and torch.equal(grad, raw) and grad.abs().sum() > 0, n
    assert all(p.grad is None for p in model.module.parameters())


@pytest.mark.parametrize("kind", tiny.ARCHITECTURES)
def test_relevance_follows_seed_003(kind: str, models: dict[str, BimodalModel]) -> None:
    model = models[kind]
    inputs = _inputs(model, kind)
    logits, rec = _recorded(model, inputs)
    tokens = rec.tokens
    target = logits[torch.arange(2), torch.tensor([2, 4])]
    layer_maps = rec.layer_maps(target)
    result = propagate(model.graph(tokens), layer_maps, dtype=torch.float64)
    text, image = model.readout(result, tokens)
    assert text.shape == inputs.ids.shape and image.shape == tokens.image_valid.shape
    config = model.module.config
    for b in range(2):
        bars = [
            _bar(m.attention[b].double().numpy(), m.gradient[b].double().numpy())
            for m in layer_maps
        ]
        if model.architecture == "single_stream":
            ref = _single_stream_ref(bars)
            np.testing.assert_allclose(
                result.matrix("joint", "joint")[b].numpy(), ref["joint"], **TIGHT
            )
            row = ref["joint"][int(tokens.readout_rows[b])]
            text_ref, image_ref = row[tokens.text_positions], row[tokens.image_positions]
        else:
            ref = _two_stream_ref(bars, (config.l_layers, config.r_layers, config.x_layers))
            for (q, k), want in ref.items():
                np.testing.assert_allclose(result.matrix(q, k)[b].numpy(), want, **TIGHT)
            text_ref, image_ref = ref["text", "text"][0], ref["text", "image"][0]
        text_ref = np.where(tokens.text_valid[b].numpy(), text_ref, 0)
        image_ref = np.where(tokens.image_valid[b].numpy(), image_ref, 0)
        np.testing.assert_allclose(text[b].numpy(), text_ref, **TIGHT)
        np.testing.assert_allclose(image[b].numpy(), image_ref, **TIGHT)
    # the excluded tokens: CLS, SEP (and the padding of the second question), padded images
    assert (text[:, 0] == 0).all() and text[0, 7] == 0 and (text[1, 6:] == 0).all()
    assert (text[:, 1:6] > 0).all() and (image[0] > 0).all()
    assert (image[1][~tokens.image_valid[1]] == 0).all() and not image[0].allclose(image[1])
    if kind == "visual_bert":  # the head reads the last token before SEP, not CLS
        assert tokens.readout_rows.tolist() == [6, 5]


# ---------------------------------------------------------------- ViLT patch bookkeeping


def test_vilt_patch_tokens_map_back_to_their_grid_cells(models: dict[str, BimodalModel]) -> None:
    model = models["vilt"]
    ids, mask, _ = model.tokenize(tiny.QUESTIONS)
    pixels = torch.zeros(2, 3, *tiny.IMAGE_HW)
    cells = [(2, 5), (1, 3)]  # one bright patch per image; the second image is 4 x 4 real
    for b, (r, c) in enumerate(cells):
        pixels[b, :, 16 * r : 16 * (r + 1), 16 * c : 16 * (c + 1)] = 5.0
    pixel_mask = tiny.batch("vilt")["pixel_mask"]
    inputs = BimodalInputs(ids, mask, pixels=pixels, pixel_mask=pixel_mask)
    seen: dict[str, torch.Tensor] = {}

    def keep_input(_m: torch.nn.Module, args: tuple) -> None:
        seen["hidden"] = args[0].detach()  # (B, N, D), the first layer's input

    hook = model.module.vilt.encoder.layer[0].register_forward_pre_hook(keep_input)
    try:
        _, rec = _recorded(model, inputs)
    finally:
        hook.remove()
    tokens = rec.tokens
    assert tokens.grid == (4, 6) and tokens.image_valid.sum(dim=1).tolist() == [24, 16]
    raster = [(r, c) for r in range(4) for c in range(6)]
    assert [tuple(x) for x in tokens.patch_cells[0].tolist()] == raster
    assert [tuple(x) for x in tokens.patch_cells[1, :16].tolist()] == [
        (r, c) for r in range(4) for c in range(4)
    ]
    norms = seen["hidden"][:, tokens.image_positions].norm(dim=-1)  # (B, L)
    found = norms.masked_fill(~tokens.image_valid, -1).argmax(dim=1)
    for b, cell in enumerate(cells):
        assert tuple(tokens.patch_cells[b, found[b]].tolist()) == cell
        onehot = torch.zeros(2, tokens.image_valid.shape[1])
        onehot[b, found[b]] = 1.0
        grid = tokens.to_grid(onehot)
        assert grid.shape == (2, 4, 6) and grid[b, cell[0], cell[1]] == 1 and grid.sum() == 1
    assert (tokens.patch_cells[1, 16:] == -1).all()  # padding slots
    assert torch.equal(model.tokens(inputs).patch_cells, tokens.patch_cells)
    _, again = _recorded(model, inputs)  # the same tokens and maps on every call
    assert all(torch.equal(a, b) for a, b in zip(rec.maps, again.maps, strict=True))


def test_tokenize_uses_the_vocabulary(models: dict[str, BimodalModel]) -> None:
    ids, mask, tokens = models["lxmert"].tokenize(tiny.QUESTIONS)
    assert tokens[1] == ("[CLS]", "how", "many", "dog", "##s", "?", "[SEP]")
    assert ids.shape == (2, 8) and mask.sum(dim=1).tolist() == [8, 7] and ids[1, 7] == 0
    ids, _, _ = models["vilt"].tokenize(["what " * 60])
    assert ids.shape == (1, 40)  # ViLT's max_position_embeddings


# ---------------------------------------------------------------- recording and hooks


def test_one_forward_per_recording_and_close_removes_every_hook(dirs: dict[str, Path]) -> None:
    model = load_bimodal_model(dirs["lxmert"])

    def hooks() -> int:
        return sum(len(m._forward_hooks) for m in model.module.modules())

    assert hooks() == 0  # on the model only while it records: Predict runs it bare
    inputs = _inputs(model, "lxmert")
    with model.record():
        assert hooks() == 2 + 2 + 2 * 3  # l + r self layers, 3 modules per cross layer
        model.forward(inputs)
        with pytest.raises(RuntimeError, match="already ran"):
            model.forward(inputs)
    model.close()
    assert hooks() == 0
    with model.record(), pytest.raises(RuntimeError, match="no attention map"):
        model.forward(inputs)


def test_gradients_need_a_pass_with_grad(models: dict[str, BimodalModel]) -> None:
    model = models["visual_bert"]
    with torch.no_grad(), model.record() as rec:
        logits = model.forward(_inputs(model, "visual_bert"))
    assert len(rec.maps) == 2 and not rec.maps[0].requires_grad
    with pytest.raises(RuntimeError, match="grad enabled"):
        rec.gradients(logits[:, 0])


# ---------------------------------------------------------------- loading


def _broken(case: str, dirs: dict[str, Path], tmp_path: Path) -> Path:
    path = shutil.copytree(dirs["lxmert" if "answers" in case else "visual_bert"], tmp_path / case)
    if case == "no-config":
        (path / "config.json").unlink()
    elif case == "bin-only":
        (path / "model.safetensors").rename(path / "pytorch_model.bin")
    elif case == "no-tokenizer":
        (path / "vocab.txt").unlink()
    elif case == "model-type":
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    elif case == "answers-sidecar":
        (path / "vitlens.json").write_text(json.dumps({"answers": ["yes", "no", "2"]}))
    elif case == "answers-id2label":  # LXMERT's head: num_qa_labels 5, id2label of 2
        config = json.loads((path / "config.json").read_text())
        config["id2label"] = {"0": "yes", "1": "no"}
        config["label2id"] = {"yes": 0, "no": 1}
        (path / "config.json").write_text(json.dumps(config))
    elif case == "no-head":
        from transformers import VisualBertModel

        shutil.rmtree(path)
        VisualBertModel(tiny.build("visual_bert").config).save_pretrained(path)
        tiny.write_vocab(path)
    return path


@pytest.mark.parametrize(
    ("case", "named"),
    [
        ("no-config", "config.json"),
        ("bin-only", "pytorch_model.bin"),
        ("no-tokenizer", "vocab.txt"),
        ("model-type", "config.json"),
        ("answers-sidecar", "vitlens.json"),
        ("answers-id2label", "num_qa_labels"),
        ("no-head", "model.safetensors"),
    ],
)
def test_load_errors_name_the_file(
    case: str, named: str, dirs: dict[str, Path], tmp_path: Path
) -> None:
    path = _broken(case, dirs, tmp_path)
    with pytest.raises(BimodalLoadError, match=named):
        load_bimodal_model(path)


def test_answers_from_the_sidecar(dirs: dict[str, Path], tmp_path: Path) -> None:
    path = shutil.copytree(dirs["vilt"], tmp_path / "vilt")
    (path / "vitlens.json").write_text(json.dumps({"answers": list("abcde")}))
    model = load_bimodal_model(path)
    try:
        assert model.answers == tuple("abcde") and model.architecture == "single_stream"
    finally:
        model.close()

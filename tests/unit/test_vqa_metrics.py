"""VQA metrics (`evaluate.vqa_metrics`) on the tiny saved ViLT, VisualBERT and LXMERT models.

Token perturbation: the removal reaches the library model as its own "absent" input (a hook on
the library module reads the masks it is called with; removed tokens equal a hand-built library
call: fewer pixels for ViLT, a shorter question for VisualBERT); positive and negative
perturbation remove opposite tokens; counts are ⌊p·n_b⌋ of each item's own valid tokens, never
padding; step 0 is the unperturbed accuracy. Question segmentation and the region ↔ grid
helpers on hand-built tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.unit import bimodal_tiny as tiny
from vitlens_server.data.captions import crisp_scene_config
from vitlens_server.data.questions import scene_questions
from vitlens_server.data.scenes import render_scene
from vitlens_server.evaluate.perturbation import perturbation_auc
from vitlens_server.evaluate.vqa_metrics import (
    grid_to_regions,
    patch_grid,
    question_masks,
    question_segmentation,
    regions_to_grid,
    token_perturbation,
    token_ranks,
)
from vitlens_server.models.bimodal import BimodalInputs, BimodalModel, load_bimodal_model

KINDS = tiny.ARCHITECTURES
VALID = {  # image tokens of the two items: ViLT 4 x 6 and 4 x 4 patches; padded regions
    "vilt": (24, 16),
    "visual_bert": (3, 2),
    "lxmert": (4, 3),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, BimodalModel]]:
    root: Path = tmp_path_factory.mktemp("vqa_metrics")
    loaded = {kind: load_bimodal_model(tiny.write_dir(root / kind, kind)) for kind in KINDS}
    yield loaded
    for model in loaded.values():
        model.close()


def _inputs(model: BimodalModel, kind: str, questions=tiny.QUESTIONS) -> BimodalInputs:
    ids, mask, _ = model.tokenize(questions)
    return BimodalInputs(ids, mask, **tiny.batch(kind))


def _relevance(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


class _Spy:
    """Records the removal masks `token_perturbation` asks for and the library calls' kwargs."""

    def __init__(self, model: BimodalModel, monkeypatch: pytest.MonkeyPatch) -> None:
        self.removals: list[torch.Tensor] = []
        self.calls: list[dict] = []
        original = model.remove_tokens

        def remove_tokens(inputs, **removal):
            self.removals.extend(removal.values())
            return original(inputs, **removal)

        monkeypatch.setattr(model, "remove_tokens", remove_tokens)
        self._handle = model.module.register_forward_pre_hook(self._call, with_kwargs=True)

    def _call(self, module, args, kwargs) -> None:
        self.calls.append({k: v.clone() for k, v in kwargs.items() if torch.is_tensor(v)})

    def close(self) -> None:
        self._handle.remove()


@pytest.fixture
def spy(models, monkeypatch):
    made: list[_Spy] = []

    def make(kind: str) -> _Spy:
        made.append(_Spy(models[kind], monkeypatch))
        return made[-1]

    yield make
    for s in made:
        s.close()


# ---------------------------------------------------------------- removal order


def test_token_ranks_order_ties_and_padding() -> None:
    relevance = torch.tensor([[0.2, 0.9, 0.2, 0.5, 9.0]])
    valid = torch.tensor([[True, True, True, True, False]])  # the 9.0 is padding
    positive = token_ranks(relevance, valid, descending=True)
    negative = token_ranks(relevance, valid, descending=False)
    assert positive.tolist() == [[2, 0, 3, 1, 4]]  # 0.9, 0.5, then the tied 0.2s left first
    assert negative.tolist() == [[0, 3, 1, 2, 4]]  # the tied 0.2s left first, then 0.5, 0.9


@pytest.mark.parametrize("modality", ["text", "image"])
@pytest.mark.parametrize("kind", KINDS)
def test_counts_are_per_item_and_never_padding(models, spy, kind: str, modality: str) -> None:
    model = models[kind]
    inputs = _inputs(model, kind)
    tokens = model.tokens(inputs)
    valid = tokens.text_valid if modality == "text" else tokens.image_valid
    totals = (6, 5) if modality == "text" else VALID[kind]
    assert valid.sum(dim=1).tolist() == list(totals)
    relevance = _relevance(tuple(valid.shape)).masked_fill(~valid, 100.0)  # padding looks best
    watch = spy(kind)
    token_perturbation(
        model, inputs, relevance, modality=modality, positive=True, answers=None, steps=(0.5, 1.0)
    )
    half, every = watch.removals
    assert half.sum(dim=1).tolist() == [n // 2 for n in totals]
    assert torch.equal(every, valid)  # p = 1 removes every valid token and nothing else
    assert not (half & ~valid).any()


@pytest.mark.parametrize("modality", ["text", "image"])
@pytest.mark.parametrize("kind", KINDS)
def test_positive_and_negative_remove_opposite_tokens(models, spy, kind, modality) -> None:
    model = models[kind]
    inputs = _inputs(model, kind)
    tokens = model.tokens(inputs)
    valid = tokens.text_valid if modality == "text" else tokens.image_valid
    relevance = _relevance(tuple(valid.shape), seed=1)
    watch = spy(kind)
    for positive in (True, False):
        token_perturbation(
            model, inputs, relevance, modality=modality, positive=positive, steps=(0.5,)
        )
    top, bottom = watch.removals
    for b in range(2):
        scores = relevance[b][valid[b]]
        k = int(top[b].sum())
        assert k == int(bottom[b].sum()) > 0
        assert torch.equal(relevance[b][top[b]].sort().values, scores.topk(k).values.sort().values)
        assert torch.equal(
            relevance[b][bottom[b]].sort().values,
            scores.topk(k, largest=False).values.sort().values,
        )
        assert not (top[b] & bottom[b]).any()


# ---------------------------------------------------------------- what the library model sees


@pytest.mark.parametrize("kind", KINDS)
def test_text_removal_reaches_the_library_call(models, spy, kind: str) -> None:
    model = models[kind]
    inputs = _inputs(model, kind)
    valid = model.tokens(inputs).text_valid
    relevance = _relevance(tuple(valid.shape), seed=2)
    watch = spy(kind)
    token_perturbation(model, inputs, relevance, modality="text", positive=True, steps=(0.5, 1.0))
    plain, half, every = watch.calls  # the unperturbed call, then one per step
    removed = watch.removals[0]
    assert torch.equal(plain["attention_mask"], inputs.text_mask)
    if kind == "visual_bert":  # dropped: the kept tokens close up, right-padded
        for b in range(2):
            kept = inputs.ids[b][inputs.text_mask[b].bool() & ~removed[b]]
            n = len(kept)
            assert torch.equal(half["input_ids"][b, :n], kept)
            assert half["attention_mask"][b].tolist() == [1] * n + [0] * (8 - n)
    else:  # masked in place
        assert torch.equal(half["input_ids"], inputs.ids)
        assert torch.equal(half["attention_mask"], inputs.text_mask.masked_fill(removed, 0))
    # everything but CLS and SEP removed: two real tokens per item
    assert every["attention_mask"].sum(dim=1).tolist() == [2, 2]
    sep = model.tokenizer.sep_token_id
    kept_ids = every["input_ids"][every["attention_mask"].bool()].view(2, 2)
    assert kept_ids.tolist() == [[model.tokenizer.cls_token_id, sep]] * 2


def test_visual_bert_text_removal_equals_the_shorter_question(models) -> None:
    model = models["visual_bert"]
    inputs = _inputs(model, "visual_bert")
    remove = torch.zeros_like(inputs.text_mask, dtype=torch.bool)
    remove[0, 5] = True  # "cat" of "[CLS] what color is the cat ? [SEP]"
    with torch.no_grad():
        dropped = model.forward(model.remove_tokens(inputs, text=remove))
        shorter = model.forward(
            _inputs(model, "visual_bert", ("what color is the ?", "how many dogs?"))
        )
        plain = model.forward(inputs)
    torch.testing.assert_close(dropped, shorter, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(dropped[0], plain[0], atol=1e-4)


@pytest.mark.parametrize("kind", ["visual_bert", "lxmert"])
def test_region_removal_is_the_region_mask(models, spy, kind: str) -> None:
    model = models[kind]
    inputs = _inputs(model, kind)
    relevance = _relevance(tuple(model.tokens(inputs).image_valid.shape), seed=3)
    watch = spy(kind)
    token_perturbation(model, inputs, relevance, modality="image", positive=False, steps=(0.5,))
    removed = watch.removals[0]
    seen = watch.calls[1]["visual_attention_mask"]
    assert torch.equal(seen, inputs.region_mask.masked_fill(removed, 0))
    with torch.no_grad():  # the library's own call with that mask gives the same answer logits
        own = model.forward(replace(inputs, region_mask=seen))
        via = model.forward(model.remove_tokens(inputs, image=removed))
    torch.testing.assert_close(via, own)


def test_vilt_patch_removal_is_its_token_mask(models, spy) -> None:
    model = models["vilt"]
    inputs = _inputs(model, "vilt")
    tokens = model.tokens(inputs)
    relevance = _relevance(tuple(tokens.image_valid.shape), seed=4)
    watch = spy("vilt")
    token_perturbation(model, inputs, relevance, modality="image", positive=True, steps=(0.25,))
    removed = watch.removals[0]  # (B, L) patch slots
    seen = watch.calls[1]["pixel_mask"]  # the (B, 1+L) image token mask on the embeds path
    assert seen.shape == (2, 1 + tokens.image_valid.shape[1])
    assert torch.equal(seen[:, 0], torch.ones(2, dtype=seen.dtype))  # image CLS kept
    assert torch.equal(seen[:, 1:].bool(), tokens.image_valid & ~removed)
    assert torch.equal(watch.calls[1]["image_embeds"], watch.calls[0]["image_embeds"])


def test_vilt_patch_removal_equals_padding_those_pixels(models) -> None:
    """A removed patch reads as that patch's pixels being padding (away from row and column 0,
    whose real counts set the position-embedding grid)."""
    model = models["vilt"]
    inputs = _inputs(model, "vilt")
    tokens = model.tokens(inputs)
    cells = [(1, 2), (2, 1)]  # item 0: cell (1, 2); item 1: cell (2, 1)
    remove = torch.zeros_like(tokens.image_valid)
    pixel_mask = inputs.pixel_mask.clone()
    for b, (r, c) in enumerate(cells):
        slot = (tokens.patch_cells[b] == torch.tensor([r, c])).all(dim=1).nonzero().item()
        remove[b, slot] = True
        pixel_mask[b, r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16] = 0
    with torch.no_grad():
        masked = model.forward(model.remove_tokens(inputs, image=remove))
        padded = model.forward(replace(inputs, pixel_mask=pixel_mask))
        plain = model.forward(inputs)
    torch.testing.assert_close(masked, padded, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(masked, plain, atol=1e-4)


def test_patch_mask_is_checked(models) -> None:
    model = models["vilt"]
    inputs = _inputs(model, "vilt")
    with pytest.raises(ValueError, match="patch_mask must be"):
        model.forward(replace(inputs, patch_mask=torch.ones(2, 5, dtype=torch.bool)))
    regions = _inputs(models["lxmert"], "lxmert")
    with pytest.raises(ValueError, match="patch_mask is for pixel inputs"):
        replace(regions, patch_mask=torch.ones(2, 4, dtype=torch.bool))


# ---------------------------------------------------------------- hits and AUC


@pytest.mark.parametrize("kind", KINDS)
def test_step_zero_is_the_unperturbed_accuracy(models, kind: str) -> None:
    model = models[kind]
    inputs = _inputs(model, kind)
    with torch.no_grad():
        predicted = model.forward(inputs).argmax(dim=1)
    truth = torch.stack([predicted[0], (predicted[1] + 1) % len(tiny.ANSWERS)])  # a hit, a miss
    tokens = model.tokens(inputs)
    image = _relevance(tuple(tokens.image_valid.shape), seed=5)
    hits = token_perturbation(
        model, inputs, image, modality="image", positive=False, answers=truth, steps=(0.5,)
    )
    assert hits.shape == (2, 2) and hits.dtype == torch.bool
    assert hits[:, 0].tolist() == [True, False]
    relevance = _relevance(tuple(tokens.text_valid.shape), seed=5)
    own = token_perturbation(model, inputs, relevance, modality="text", positive=True)
    assert own.shape == (2, 10) and own[:, 0].all()  # answers=None: the model's own answer
    auc = perturbation_auc(own)
    assert auc.shape == (2,) and bool(((auc >= 0) & (auc <= 90)).all())


def test_bad_arguments_are_refused(models) -> None:
    model = models["lxmert"]
    inputs = _inputs(model, "lxmert")
    relevance = _relevance((2, 4))
    with pytest.raises(ValueError, match="modality"):
        token_perturbation(model, inputs, relevance, modality="audio", positive=True)
    with pytest.raises(ValueError, match="text relevance must be"):
        token_perturbation(model, inputs, relevance, modality="text", positive=True)
    with pytest.raises(ValueError, match="not in"):
        token_perturbation(model, inputs, relevance, modality="image", positive=True, steps=(1.5,))


# ---------------------------------------------------------------- question segmentation


def _blocks(grid: torch.Tensor, scale: int) -> torch.Tensor:
    return grid.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)


def test_question_segmentation_scores_and_empty_masks() -> None:
    grid = torch.zeros(3, 4, 6)
    grid[0, 1:3, 2:5] = 1
    grid[1, 0, 0:2] = 1
    masks = _blocks(grid, 8).bool()  # (3, 32, 48); item 2 is empty
    exact = question_segmentation(masks.double() + 0.01 * torch.rand(3, 32, 48), masks)
    assert exact.valid.tolist() == [True, True, False]
    torch.testing.assert_close(exact.scores["iou"][:2], torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(
        exact.scores["pixel_accuracy"][:2], torch.ones(2, dtype=torch.float64)
    )
    assert all(torch.isnan(exact.scores[key][2]) for key in exact.scores)
    inverted = question_segmentation(1 - masks.double(), masks)
    assert inverted.scores["iou"][:2].tolist() == [0.0, 0.0]
    on_grid = question_segmentation(grid, masks)  # (gh, gw) maps, upsampled bilinearly
    assert bool((on_grid.scores["iou"][:2] > 0.8).all())
    assert bool((on_grid.scores["ap_foreground"][:2] > 0.99).all())


def test_question_masks_of_generated_questions() -> None:
    scene = render_scene(3, two_object=True, config=crisp_scene_config(64))
    questions = scene_questions(scene)
    about = next(q for q in questions if len(q.about) == 1)
    nothing = next(q for q in questions if not q.about)
    masks = question_masks([scene, scene], [about, nothing])
    assert masks.shape == (2, 64, 64) and masks.dtype == torch.bool
    assert torch.equal(masks[0], torch.from_numpy(scene.masks[about.about[0]]))
    assert not masks[1].any()
    assert question_segmentation(masks.double(), masks).valid.tolist() == [True, False]


# ---------------------------------------------------------------- regions on a patch grid


def test_regions_to_grid_round_trip_in_raster_order() -> None:
    values = torch.arange(12.0).view(2, 6)
    grid = regions_to_grid(values, (2, 3))
    assert grid[0].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert torch.equal(grid_to_regions(grid), values)
    with pytest.raises(ValueError, match="for a 2 x 2 grid"):
        regions_to_grid(values, (2, 2))


def test_patch_grid_recognises_patch_squares() -> None:
    rows, cols = 2, 3
    squares = torch.tensor(
        [
            [c / cols, r / rows, (c + 1) / cols, (r + 1) / rows]
            for r in range(rows)
            for c in range(cols)
        ]
    )
    assert patch_grid(squares) == (2, 3)
    assert patch_grid(squares.expand(4, -1, -1).half()) == (2, 3)  # float16 export
    assert patch_grid(squares.flip(0)) is None  # not raster order
    assert patch_grid(tiny.batch("lxmert")["boxes"]) is None  # detector-like boxes
